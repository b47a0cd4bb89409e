"""The tokenizer a GGUF file describes in its metadata, rebuilt as a Hugging Face `tokenizer.json`.

A GGUF carries no tokenizer file: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), its kind
(`tokenizer.ggml.model`) and the rest as metadata. Two kinds are rebuilt here, the ones of the models
we run:

- `gpt2`: byte-level BPE (SmolLM2, Qwen2, Llama 3), with the merges from `tokenizer.ggml.merges` and
  the pre-tokenizer (how text is split before BPE) named by `tokenizer.ggml.pre`;
- `llama`: sentencepiece-style BPE (Llama 2, Mistral), which stores no merges but a score per token;
  the merges are recovered from the scores, as transformers does, and unknown bytes fall back to
  `<0xNN>` tokens.

`check_tokenizer` refuses other kinds from two metadata strings, and damaged metadata (a missing
vocabulary, a special token id outside it, a merge of unknown tokens), before anything slow runs.
"""

from __future__ import annotations

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from nanomedusa.errors import NanoMedusaError

# Llama 3's split (contractions, words, 1-3 digits, punctuation, whitespace). GPT-2's own split needs
# no pattern here: it is built into ByteLevel(use_regex=True).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with single digits.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# `tokenizer.ggml.pre` -> the pre-tokenizer of the model's original tokenizer.json.
_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # SmolLM (like StarCoder) cuts every digit apart *before* the GPT-2 split, so "  42" is "ĠĠ 4 2".
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _split_then_bytes(_QWEN2_SPLIT),  # DeepSeek-R1 distilled into Qwen2.5
}
# Llama 3 emits a whole word when it is in the vocabulary, whatever the merges say (llama.cpp does too).
_IGNORE_MERGES = {"llama-bpe"}
_KINDS = ("gpt2", "llama")
# The special tokens a GGUF names by id (`tokenizer.ggml.{role}_token_id`) that tokenizer_config looks up: one
# outside the vocabulary is damage. (An end-of-turn id outside it is only dropped, as llama.cpp drops it.)
_SPECIAL_ROLES = ("bos", "eos", "unknown", "padding")
_SPACE = "▁"  # sentencepiece's visible space


def check_tokenizer(meta: dict, source: str) -> None:
    """Refuse a tokenizer kind or pre-tokenizer that `build_tokenizer` cannot rebuild, or damaged metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in _KINDS:
        raise NanoMedusaError(
            f"{source} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') and sentencepiece-style ('llama') "
            f"vocabularies can be converted, so use the model's Hugging Face checkpoint."
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind == "gpt2" and pre not in _PRE_TOKENIZERS:
        raise NanoMedusaError(
            f"{source} uses the pre-tokenizer {pre!r}; only {', '.join(sorted(_PRE_TOKENIZERS))} are supported, "
            f"so use the model's Hugging Face checkpoint."
        )
    damage = _damage(meta, kind)
    if damage:
        raise NanoMedusaError(f"{source} {damage}; re-download or re-convert the GGUF.")


def _damage(meta: dict, kind: str) -> str | None:
    """What is missing or wrong in the metadata the tokenizer is rebuilt from, or None if nothing is."""
    needed = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges" if kind == "gpt2" else "tokenizer.ggml.scores")
    for key in needed:
        if key not in meta:
            return f"lacks {key}"
    tokens = meta["tokenizer.ggml.tokens"]
    for role in _SPECIAL_ROLES:
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            return f"gives tokenizer.ggml.{role}_token_id as {token_id}, outside its {len(tokens)} tokens"
    if kind == "gpt2":
        vocab = set(tokens)
        for merge in meta["tokenizer.ggml.merges"]:
            parts = merge.split(" ")
            # The tokenizers library refuses a merge unless both parts and their join are tokens.
            if len(parts) != 2 or not {*parts, "".join(parts)} <= vocab:
                return f"has the merge {merge!r}, which does not join two of its tokens into a third"
    return None


def build_tokenizer(meta: dict, source: str) -> Tokenizer:
    """The tokenizer the GGUF describes: its vocabulary and merges, pre-tokenizer, decoder and special tokens."""
    check_tokenizer(meta, source)
    byte_level = meta["tokenizer.ggml.model"] == "gpt2"
    tokenizer = _byte_level_bpe(meta) if byte_level else _sentencepiece_bpe(meta)

    # Control tokens (<|im_start|>, <s>) and user-defined ones are matched whole in the raw text, as llama.cpp does.
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    control = [t for t, token_type in zip(tokens, types) if token_type == gguf.TokenType.CONTROL]
    user = [t for t, token_type in zip(tokens, types) if token_type == gguf.TokenType.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    tokenizer.post_processor = _post_processor(meta, byte_level)
    return tokenizer


def tokenizer_config(meta: dict, max_length: int) -> dict:
    """tokenizer_config.json: the special tokens by name, whether BOS/EOS are added, and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    roles = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    named = {
        name: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
        for name, key in roles.items()
        if f"tokenizer.ggml.{key}_token_id" in meta
    }
    chat = {"chat_template": meta["tokenizer.chat_template"]} if "tokenizer.chat_template" in meta else {}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": _adds(meta, "bos"),
        "add_eos_token": _adds(meta, "eos"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        **chat,
    }


def _byte_level_bpe(meta: dict) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre")
    vocab = {token: index for index, token in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict) -> Tokenizer:
    """Llama 2 / Mistral: "▁" for spaces (one in front of the text too, unless the file says not to),
    BPE merges in the order of the merged token's score, bytes outside the vocabulary as <0xNN> tokens."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _merges_by_score(tokens, meta["tokenizer.ggml.scores"], vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _merges_by_score(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens is a merge, ranked by the merged token's score
    (best first), then by the longer left and right part, as transformers' `generate_merges` does."""
    candidates = []
    for token, score in zip(tokens, scores):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(score, left, right) for left, right in splits]
    # A stable sort on the descending key keeps equal merges in vocabulary order, like transformers' reverse sort.
    candidates.sort(key=lambda merge: (-merge[0], -len(merge[1]), -len(merge[2])))
    return [(left, right) for _, left, right in candidates]


def _adds(meta: dict, end: str) -> bool:
    """Whether encoding adds BOS/EOS: the file's flag, else llama.cpp's default (BOS for sentencepiece vocabularies)."""
    default = end == "bos" and meta.get("tokenizer.ggml.model") == "llama"
    return bool(meta.get(f"tokenizer.ggml.add_{end}_token", default))


def _post_processor(meta: dict, byte_level: bool) -> processors.PostProcessor | None:
    """Add BOS/EOS around encoded text where the GGUF says to (`_adds`)."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {
        end: meta[f"tokenizer.ggml.{end}_token_id"]
        for end in ("bos", "eos")
        if _adds(meta, end) and f"tokenizer.ggml.{end}_token_id" in meta
    }
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    if ids:
        bos, eos = ([tokens[ids[end]]] if end in ids else [] for end in ("bos", "eos"))
        single = [*bos, "$A", *eos]
        pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
        specials = [(tokens[i], i) for i in ids.values()]
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials))
    return processors.Sequence(steps) if len(steps) > 1 else (steps[0] if steps else None)

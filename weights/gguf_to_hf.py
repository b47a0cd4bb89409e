"""Convert a llama.cpp GGUF file into a Hugging Face checkpoint directory.

nanomedusa loads Hugging Face checkpoints only (config.json + model.safetensors + tokenizer.json). Some
models, the default SmolLM2-135M-Instruct among them, are at hand only as GGUF, so this module rewrites
one into that layout, once:

    convert_gguf("m.Q4_1.gguf", "out/")  # -> out/{config.json, model.safetensors, tokenizer.json, ...}
    convert_cached("m.Q4_1.gguf")        # -> weights/cache/m.Q4_1-<key>/, converted on first use only

What llama.cpp changed on the way into GGUF, and is undone here:
- names: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (`_hf_name`);
- values: quantised blocks are dequantised (`_dequantize`), so the checkpoint holds the *quantised*
  model at full precision, not the original release's weights;
- layout: q/k rows are reordered for llama.cpp's interleaved RoPE (`_unpermute_rope_rows`);
- tokenizer: vocab and merges live in metadata and are rebuilt into a `tokenizer.json` (`build_tokenizer`).
Only `llama` architecture files with a byte-level BPE vocabulary are accepted; anything else is
refused with a NanoMedusaError naming what is supported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from nanomedusa.errors import NanoMedusaError

CACHE_ROOT = Path(__file__).resolve().parent / "cache"

Q = gguf.GGMLQuantizationType
# Block formats gguf-py can both dequantize and (for our tests) quantize; K-quants and i-quants are refused.
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Llama 3's split (contractions, words, 1-3 digits, punctuation, whitespace). GPT-2's own split needs
# no pattern here: it is built into ByteLevel(use_regex=True).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
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
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}
# Llama 3 emits a whole word when it is in the vocabulary, whatever the merges say (llama.cpp does too).
_IGNORE_MERGES = {"llama-bpe"}


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True
) -> Path:
    """Write a Hugging Face Llama checkpoint for `gguf_path` into `out_dir` (which must not exist) and return it.

    float32 (the default) keeps the dequantised values exactly; float16/bfloat16 halve the size but round them.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise NanoMedusaError(f"no GGUF file at {gguf_path}; check the path.")
    if out_dir.exists():
        raise NanoMedusaError(f"{out_dir} already exists; delete it or choose another output directory.")
    if dtype not in SUPPORTED_DTYPES:
        choices = ", ".join(map(str, SUPPORTED_DTYPES))
        raise NanoMedusaError(f"cannot write weights as {dtype}; choose one of {choices}.")

    reader = gguf.GGUFReader(gguf_path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    source = gguf_path.name
    # Everything that can refuse the file runs before the slow part.
    config = hf_config(meta, reader.tensors, source, dtype)
    _check_tensor_types(reader.tensors, source)
    names = [_hf_name(tensor.name, source) for tensor in reader.tensors]
    tokenizer = build_tokenizer(meta, source)

    state = {}
    bar = tqdm(reader.tensors, desc=f"Converting {source}", unit="tensor", disable=not progress)
    for tensor, name in zip(bar, names):
        weight = _dequantize(tensor)
        if name.endswith("q_proj.weight"):
            weight = _unpermute_rope_rows(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _unpermute_rope_rows(weight, config["num_key_value_heads"])
        state[name] = weight.to(dtype).contiguous()
    _check_complete(state, config, source)

    # Build beside the target and rename at the end: a killed conversion leaves a hidden `.partial`
    # folder, never an `out_dir` that looks finished.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "config.json", config)
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(meta, config))
        _write_json(staging / "generation_config.json", _generation_config(config))
        (staging / "README.md").write_text(_model_card(gguf_path, meta, reader.tensors, dtype))
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def convert_cached(gguf_path: str | Path, cache_root: str | Path | None = None, progress: bool = True) -> Path:
    """The converted checkpoint for `gguf_path` under `cache_root` (default weights/cache), converting on first use.

    The folder is named after the file and a hash of its contents, so two different files that share
    a name never share a checkpoint, and re-downloading the same file reuses it.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise NanoMedusaError(f"no GGUF file at {gguf_path}; check the --model path.")
    out_dir = Path(cache_root or CACHE_ROOT) / f"{gguf_path.stem}-{content_key(gguf_path)}"
    if out_dir.is_dir():  # only ever appears complete, see convert_gguf
        return out_dir
    return convert_gguf(gguf_path, out_dir, progress=progress)


def content_key(path: Path, chunk: int = 1 << 20) -> str:
    """A short hash of a file's size, first and last MiB: the header (metadata) and some tensor data."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(path.stat().st_size - chunk, 0))
        digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


def hf_config(meta: dict, tensors: list, source: str, dtype: torch.dtype) -> dict:
    """config.json for a LlamaForCausalLM with the GGUF's hyper-parameters."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise NanoMedusaError(
            f"{source} is a GGUF of architecture {arch!r}; only 'llama' GGUF files can be converted, "
            f"so use a Llama-family GGUF or the model's Hugging Face checkpoint."
        )

    def need(key: str):
        if key not in meta:
            raise NanoMedusaError(f"{source} lacks the GGUF key {key!r}; re-export it with a current llama.cpp.")
        return meta[key]

    hidden, n_heads = need("llama.embedding_length"), need("llama.attention.head_count")
    head_dim = meta.get("llama.attention.key_length", hidden // n_heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise NanoMedusaError(
            f"{source} rotates only {meta['llama.rope.dimension_count']} of {head_dim} head dimensions; "
            f"partial RoPE is not supported, so use a model that rotates whole heads."
        )
    names = {t.name: t for t in tensors}
    if "token_embd.weight" not in names:
        raise NanoMedusaError(f"{source} has no token_embd.weight tensor; re-export the complete model.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(names["token_embd.weight"].shape[1]),  # GGUF shapes are [in, out]
        "hidden_size": hidden,
        "intermediate_size": need("llama.feed_forward_length"),
        "num_hidden_layers": need("llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": need("llama.context_length"),
        "rms_norm_eps": _f32(need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, source),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def build_tokenizer(meta: dict, source: str) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF describes: its vocab, merges, pre-tokenizer and special tokens."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NanoMedusaError(
            f"{source} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') vocabularies can be converted, "
            f"so use the model's Hugging Face checkpoint."
        )
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise NanoMedusaError(
            f"{source} uses the pre-tokenizer {pre!r}; only {', '.join(sorted(_PRE_TOKENIZERS))} are supported, "
            f"so use the model's Hugging Face checkpoint."
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>) and user-defined ones are matched whole in the raw text, as llama.cpp does.
    types = meta.get("tokenizer.ggml.token_type", [])
    control = [t for t, token_type in zip(tokens, types) if token_type == gguf.TokenType.CONTROL]
    user = [t for t, token_type in zip(tokens, types) if token_type == gguf.TokenType.USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    tokenizer.post_processor = _post_processor(meta, tokens)
    return tokenizer


def _post_processor(meta: dict, tokens: list[str]) -> processors.PostProcessor:
    """Add BOS/EOS around encoded text when the GGUF says to (`add_bos_token` / `add_eos_token`)."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    ids = {
        end: meta[f"tokenizer.ggml.{end}_token_id"]
        for end in ("bos", "eos")
        if meta.get(f"tokenizer.ggml.add_{end}_token") and f"tokenizer.ggml.{end}_token_id" in meta
    }
    if not ids:
        return byte_level
    bos, eos = ([tokens[ids[end]]] if end in ids else [] for end in ("bos", "eos"))
    single = [*bos, "$A", *eos]
    pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
    specials = [(tokens[i], i) for i in ids.values()]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return processors.Sequence([byte_level, template])


def _tokenizer_config(meta: dict, config: dict) -> dict:
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
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        **chat,
    }


def _generation_config(config: dict) -> dict:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config[key] is not None}


def _model_card(gguf_path: Path, meta: dict, tensors: list, dtype: torch.dtype) -> str:
    counts: dict[str, int] = {}
    for tensor in tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    by_count = sorted(counts, key=lambda name: -counts[name])
    types = ", ".join(f"{counts[name]} x {name}" for name in by_count)
    quantised = [name for name in by_count if name not in ("F32", "F16", "BF16")]
    dtype_name = str(dtype).removeprefix("torch.")
    if quantised:
        note = (
            f"**These are not the original full-precision (bf16/fp16) weights.** The GGUF is the "
            f"{'/'.join(quantised)} quantised release ({types}); every tensor was dequantised to {dtype_name}, "
            f"so this checkpoint computes what the quantised model computes, which differs slightly from the original."
        )
    else:
        note = f"The GGUF stores floating-point tensors ({types}); they were converted to {dtype_name}."
    return (
        f"# {gguf_path.stem}\n\n"
        f"Converted by nanomedusa (`weights/gguf_to_hf.py`) from the GGUF file `{gguf_path.name}` "
        f"({meta.get('general.name', 'unnamed')}, license: {meta.get('general.license', 'unstated')}).\n\n"
        f"{note}\n"
    )


def _check_tensor_types(tensors: list, source: str) -> None:
    for tensor in tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise NanoMedusaError(
                f"tensor {tensor.name} in {source} is stored as {tensor.tensor_type.name}, which cannot be "
                f"dequantized (supported: {', '.join(t.name for t in SUPPORTED_TYPES)}); "
                f"use a GGUF quantised to one of those types."
            )


def _check_complete(state: dict, config: dict, source: str) -> None:
    layers = range(config["num_hidden_layers"])
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in layers for part in _LAYER_NAMES.values()
    }
    missing = sorted(expected - state.keys())
    if missing:
        raise NanoMedusaError(
            f"{source} lacks {len(missing)} tensors (first: {missing[0]}); re-export the complete model."
        )


def _hf_name(name: str, source: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise NanoMedusaError(
        f"{source} holds the tensor {name!r}, which has no Hugging Face Llama equivalent; "
        f"use the model's Hugging Face checkpoint."
    )


def _dequantize(tensor) -> torch.Tensor:
    """The tensor's values as float32, in Hugging Face's [out, in] order (GGUF lists shapes innermost first)."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, it interleaves the two rotated halves (x0 y0 x1 y1 ...)
    for its RoPE; Hugging Face's rotate_half wants them apart (x0 x1 ... y0 y1 ...)."""
    rows, cols = weight.shape  # [n_heads * head_dim, hidden]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_scaling(meta: dict, source: str) -> dict | None:
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(meta["llama.rope.scaling.factor"])}
    raise NanoMedusaError(
        f"{source} uses {kind!r} RoPE scaling; only linear scaling converts, "
        f"so use the model's Hugging Face checkpoint."
    )


def _f32(value: float) -> float:
    """GGUF stores float32: keep its shortest decimal (1e-05), not the widened double (9.99999974e-06)."""
    return float(str(np.float32(value)))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

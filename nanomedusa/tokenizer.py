"""Text <-> token ids for a Hugging Face checkpoint directory, without transformers.

`Tokenizer.from_dir(path)` reads the checkpoint's own tokenizer files:

- `tokenizer.model` (sentencepiece, Llama-2 / Mistral / Vicuna) through the `sentencepiece` library, or
- `tokenizer.json` (e.g. byte-level BPE of SmolLM2 / Llama-3) through the `tokenizers` library,

plus `tokenizer_config.json` (bos/eos tokens, `add_bos_token`, added tokens, `chat_template`) and
`generation_config.json` / `config.json` for bos/eos ids. `encode` gives the same ids as
`transformers.AutoTokenizer.from_pretrained(path)(text)["input_ids"]` (transformers 5): special-token
strings in the text become their ids, and BOS is prepended by the checkpoint's default.

`stream_decoder()` turns ids into printable text one token at a time, and `apply_chat_template` /
`encode_chat` build prompts through the presets in `chat_template.py`.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece
import tokenizers

from .chat_template import ChatFormat, Message
from .errors import NanoMedusaError
from .files import check_utf8, read_utf8

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")

# Appended to a serialized sentencepiece ModelProto, this is one more `normalizer_spec` (field 3) holding
# precompiled_charsmap="" (field 2), add_dummy_prefix=false (3), remove_extra_whitespaces=false (4).
# Protobuf merges repeated sub-messages field by field, so only these three settings change: the
# processor then does no normalisation at all, like transformers' Llama tokenizer, and we add the
# leading "▁" ourselves where transformers does.
_RAW_NORMALIZER = b"\x1a\x06\x12\x00\x18\x00\x20\x00"


class _Backend(Protocol):
    vocab_size: int
    added_tokens: list[str]

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...


class _SentencePieceBackend:
    """`tokenizer.model` with transformers' Llama conventions rather than sentencepiece's own:
    no normalisation, added/special tokens split out of the text first, and one "▁" prepended only to the
    text at the very start of the input (to every text span with `legacy: true`, never with
    `add_prefix_space: false`) unless it already starts with a space."""

    def __init__(self, model_file: Path, config: dict, added: dict[int, tuple[str, bool]]):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_file.read_bytes() + _RAW_NORMALIZER)
        except RuntimeError:  # sentencepiece's parse error, a C++ status line
            raise NanoMedusaError(f"{model_file} is not a sentencepiece model; restore it from the original "
                                  f"checkpoint.") from None
        sp = self._sp
        self._tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self._bytes = {i: int(self._tokens[i][3:-1], 16) for i in range(len(self._tokens)) if sp.is_byte(i)}
        self.special_ids = {i for i in range(len(self._tokens)) if sp.is_control(i) or sp.is_unknown(i)}
        for token_id, (content, special) in added.items():
            self._tokens.extend([""] * (token_id + 1 - len(self._tokens)))
            self._tokens[token_id] = content
            if special:
                self.special_ids.add(token_id)
        self._added = {self._tokens[i]: i for i in sorted(self.special_ids | set(added)) if self._tokens[i]}
        self.added_tokens = list(self._added)
        self.vocab_size = len(self._tokens)
        self.default_bos = sp.bos_id() if sp.bos_id() >= 0 else None
        self.default_eos = sp.eos_id() if sp.eos_id() >= 0 else None
        # Longest first, so that "<|im_start|>" is not read as "<|im_start" plus text when both exist.
        alternatives = sorted(self._added, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        if config.get("add_prefix_space") is False:
            self._prepend = "never"
        else:
            self._prepend = "always" if config.get("legacy") else "first"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        # re.split with one capture group alternates text (even index) and added tokens (odd index).
        for i, part in enumerate(self._splitter.split(text)):
            if i % 2:
                ids.append(self._added[part])
            elif part:
                prepend = self._prepend == "always" or (self._prepend == "first" and i == 0)
                if prepend and not part.startswith((" ", "▁")):
                    part = " " + part
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size or (skip_special_tokens and i in self.special_ids):
                continue
            if i in self._bytes:
                out.append(self._bytes[i])
            else:
                out += self._tokens[i].replace("▁", " ").encode()
        text = out.decode("utf-8", errors="replace")
        # Undo the "▁" that encode prepends; transformers strips it from the start of the whole text.
        return text[1:] if self._prepend != "never" and text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        token_id = self._sp.piece_to_id(token)
        return None if self._sp.is_unknown(token_id) and token != self._tokens[token_id] else token_id

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokens[token_id] if 0 <= token_id < self.vocab_size else None


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _as_byte_tokens(text: str) -> list[str]:
    """Each character of `text` as its UTF-8 byte tokens ("é" -> "<0xC3>", "<0xA9>"), U+FFFD as itself."""
    return [t for c in text for t in (["\ufffd"] if c == "\ufffd" else [f"<0x{b:02X}>" for b in c.encode()])]


class _TokenizersBackend:
    """`tokenizer.json` through the `tokenizers` library, which is what transformers runs for it."""

    def __init__(self, json_file: Path):
        try:
            self._tk = tokenizers.Tokenizer.from_file(str(json_file))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise NanoMedusaError(f"{json_file} is not a tokenizer the tokenizers library can read ({e}); restore it "
                                  f"from the original checkpoint.") from None
        added = self._tk.get_added_tokens_decoder()  # {id: AddedToken}
        self.added_tokens = [t.content for t in added.values()]
        self._special_ids = {i for i, t in added.items() if t.special}
        vocab = self._tk.get_vocab(with_added_tokens=True)  # {token: id}
        self.vocab_size = max(vocab.values()) + 1
        # Ids the file's post-processor puts around a single text, e.g. [bos] for Llama-3, [] for GPT-2.
        self.post_processor_ids = self._tk.encode("", add_special_tokens=True).ids
        # A sentencepiece model converted to tokenizer.json (Llama, Mistral, a GGUF's) spells rare characters in
        # byte tokens "<0xE6>": {id: byte} when its decoder turns them back into bytes, else empty.
        decoder = self._tk.decoder  # (its own JSON alone: the whole file's would take 50 ms to write out again)
        byte_fallback = decoder is not None and b'"ByteFallback"' in decoder.__getstate__()
        self._bytes = {i: int(m[1], 16) for t, i in vocab.items() if byte_fallback and (m := _BYTE_TOKEN.fullmatch(t))}

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Ids outside the vocabulary are skipped, as the sentencepiece backend skips them (the library raises an
        # OverflowError on a negative one).
        ids = [i for i in ids if 0 <= i < self.vocab_size and not (skip_special_tokens and i in self._special_ids)]
        runs = [(is_bytes, list(run)) for is_bytes, run in itertools.groupby(ids, key=self._bytes.__contains__)]
        texts = [bytes(self._bytes[i] for i in run).decode("utf-8", errors="replace") if is_bytes else None
                 for is_bytes, run in runs]  # each run of byte tokens as text
        if not any(text and "\ufffd" in text for text in texts):
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        # A run of byte tokens that is not UTF-8 (a character cut off at max_new_tokens, stray bytes): the library
        # turns every byte of such a run into U+FFFD, so a byte arriving later would change text already streamed
        # (the "日" of a cut-off "日本" vanished). Such runs decode as the sentencepiece backend decodes them
        # instead, one U+FFFD for each bad sequence and the characters around it kept: the library's decoder gets
        # each character of the run as its byte tokens and each bad sequence as the token U+FFFD.
        tokens = []
        for (_, run), text in zip(runs, texts):
            tokens += [self._tk.id_to_token(i) for i in run] if text is None else _as_byte_tokens(text)
        return self._tk.decoder.decode(tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)


def load_tokenizer(path: str | Path, chat_format: str = "auto", note: bool = True) -> Tokenizer:
    """The tools' way to load a checkpoint's tokenizer (generate.py, train.py, tree tuning, calibration): in
    --chat-format's format, with a note on stderr where messages then go in as plain text because the checkpoint's
    template was missing or unknown (`note=False`: none, e.g. on all but one rank)."""
    tokenizer = Tokenizer.from_dir(path, chat_preset=chat_format)
    if note and (text := tokenizer.chat.plain_text_note()):
        print(f"[note] {text}.", file=sys.stderr)
    return tokenizer


class StreamDecoder:
    """Turns token ids, pushed one at a time, into text pieces that are safe to print.

    Each push re-decodes a short window of recent ids and returns what the newest ids added. Decoding in
    context is what gets sentencepiece's "▁" spaces and multi-token characters (byte-fallback pieces like
    `<0xE2>`, or partial bytes in byte-level BPE) right; text ending in U+FFFD is an unfinished character
    and is held back until the ids that complete it arrive (or `flush`). The pieces concatenate to
    `decode(all ids)`.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: ids before it no longer change how later ids decode
        self._read = 0  # ids before this have already been returned as text

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back, e.g. an incomplete character at the end of generation."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise NanoMedusaError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint.") from e
    if not isinstance(data, dict):
        raise NanoMedusaError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it from the "
                              f"original checkpoint.")
    return data


def _token_str(value, where: str) -> str | None:
    """tokenizer_config.json writes a token either as a string or as {"content": ..., ...}."""
    token = value.get("content") if isinstance(value, dict) else value
    if token is not None and not isinstance(token, str):
        raise NanoMedusaError(f"{where} is {value!r}, not a token's text; restore the file from the original "
                              f"checkpoint.")
    return token


def _as_list(value, where: str) -> list[int]:
    ids = [] if value is None else list(value) if isinstance(value, list) else [value]
    if not all(isinstance(i, int) for i in ids):
        raise NanoMedusaError(f"{where} is {value!r}, not token ids; restore the file from the original checkpoint.")
    return ids


def _added_tokens(path: Path, config: dict) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) for tokens added on top of a sentencepiece vocabulary."""
    added = {}
    for token_id, token in config.get("added_tokens_decoder", {}).items():
        special = token.get("special", True) if isinstance(token, dict) else True
        added[int(token_id)] = (_token_str(token, f"{path / 'tokenizer_config.json'}'s token {token_id}"),
                                bool(special))
    # Older checkpoints list them in added_tokens.json instead ({content: id}).
    for content, token_id in _read_json(path / "added_tokens.json").items():
        added.setdefault(int(token_id), (content, True))
    return added


def _chat_template(path: Path, config: dict) -> str | None:
    """The Jinja chat template, from chat_template.jinja / chat_template.json / tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return read_utf8(path / "chat_template.jinja")
    separate = _read_json(path / "chat_template.json")
    source = "chat_template.json" if "chat_template" in separate else "tokenizer_config.json"
    template = separate.get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # several named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise NanoMedusaError(f"the chat template in {path / source} is {template!r}, not text; restore the file "
                              f"from the original checkpoint.")
    return template


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, streaming decode and chat prompts."""

    def __init__(self, backend: _Backend, bos_id: int | None, eos_ids: list[int], add_bos: bool, chat: ChatFormat):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos  # what encode() does when not told
        self.chat = chat

    @classmethod
    def from_dir(cls, path: str | Path, chat_preset: str | None = None) -> Tokenizer:
        """Load the tokenizer of the Hugging Face checkpoint in `path`; `chat_preset` (a preset's name,
        `--chat-format`) overrides detection, which None or "auto" leave on."""
        path = Path(path)
        if not path.is_dir():
            raise NanoMedusaError(
                f"Tokenizer directory {path} does not exist; pass the checkpoint directory that holds "
                f"{' or '.join(TOKENIZER_FILES)}."
            )
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")
        model = _read_json(path / "config.json")

        if (path / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(path / "tokenizer.model", config, _added_tokens(path, config))
            default_bos, default_eos = backend.default_bos, backend.default_eos
            # transformers 4 and sentencepiece itself default to BOS for Llama tokenizers.
            add_bos = config.get("add_bos_token", True)
        elif (path / "tokenizer.json").is_file():
            backend = _TokenizersBackend(path / "tokenizer.json")
            default_bos = default_eos = None
            add_bos = None  # decided by the file's post-processor below
        else:
            raise NanoMedusaError(
                f"No tokenizer.model or tokenizer.json in {path}; copy the checkpoint's tokenizer files there."
            )

        # The tokenizer's own bos/eos strings first: they are what transformers adds and stops on.
        where = path / "tokenizer_config.json"
        bos_token = _token_str(config.get("bos_token"), f"{where}'s bos_token")
        eos_token = _token_str(config.get("eos_token"), f"{where}'s eos_token")
        bos_candidates = [backend.token_to_id(bos_token) if bos_token else None]
        bos_candidates += [generation.get("bos_token_id"), model.get("bos_token_id"), default_bos]
        bos_id = next((i for i in bos_candidates if i is not None), None)
        # Generation stops on any of them (e.g. Llama-3-Instruct lists both <|end_of_text|> and <|eot_id|>).
        eos_candidates = [backend.token_to_id(eos_token) if eos_token else None]
        eos_candidates += (_as_list(generation.get("eos_token_id"), f"{path / 'generation_config.json'}'s eos_token_id")
                           + _as_list(model.get("eos_token_id"), f"{path / 'config.json'}'s eos_token_id"))
        eos_ids = (list(dict.fromkeys(i for i in eos_candidates if i is not None))
                   or _as_list(default_eos, "the sentencepiece model's eos id"))

        if add_bos is None:
            # With a tokenizer.json, transformers ignores add_bos_token and runs the file's post-processor.
            add_bos = backend.post_processor_ids[:1] == [bos_id]

        bos_str = bos_token or (backend.id_to_token(bos_id) if bos_id is not None else None)
        eos_str = eos_token or (backend.id_to_token(eos_ids[0]) if eos_ids else None)
        chat = ChatFormat.from_checkpoint(
            _chat_template(path, config), backend.added_tokens, bos_str or "", eos_str or "",
            None if chat_preset == "auto" else chat_preset,
        )
        return cls(backend, bos_id, eos_ids, bool(add_bos), chat)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._backend.vocab_size

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; `add_bos=None` follows the checkpoint (as transformers does)."""
        check_utf8("the text", text)
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.decode)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return self.chat.render(messages, add_generation_prompt)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Prompt ids ready for generation: the rendered chat, with BOS added only if the text lacks it."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

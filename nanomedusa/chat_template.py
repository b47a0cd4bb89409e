"""Chat prompt formats, rendered by small Python functions instead of Jinja.

A Hugging Face checkpoint ships its prompt format as a Jinja `chat_template`. Running it would need jinja2
and would execute template code from the checkpoint, so nanomedusa recognises which well-known format a
template implements and renders it with one of these presets. They approximate the Jinja templates; for
the common cases below they reproduce character for character what
`transformers`' `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` renders:

- `chatml`:  `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, generation prompt
  `<|im_start|>assistant\\n`. A default system prompt written into the checkpoint's template (SmolLM2,
  Qwen2) is extracted and used when the conversation does not start with a system message.
- `llama2`:  `{bos}[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} {eos}` (Llama-2-chat).
  Contents are stripped; the format has no separate generation prompt.
- `mistral`: `{bos}[INST] {user} [/INST]{assistant}{eos}[INST] ...` (Mistral/Mixtral-Instruct v0.1: one BOS, no
  spaces around answers). Every template with `[INST]` but no Llama-2 `<<SYS>>` block gets it, though only v0.1's
  layout is reproduced exactly (later Mistral templates space `[/INST]` and the answer otherwise). Its template
  refuses a system message; this preset puts one before the first user message, `{system}\\n\\n{user}`
  (Mistral's v0.3 template puts it before the last one instead, which would change an earlier turn's text, and so
  the chat's cached prompt, every turn).
- `llama3`:  `{bos}<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` per message,
  generation prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n` (no Llama-3.1 date preamble).
- `vicuna`:  FastChat v1.1, `{system} USER: {user} ASSISTANT: {assistant}{eos}USER: ...`, ending in
  `ASSISTANT:`, with Vicuna's standard system prompt unless the conversation brings its own.
- `zephyr`:  `<|{role}|>\\n{content}{eos}\\n` per message, generation prompt `<|assistant|>\\n`.
- `plain`:   the message contents joined by newlines, no markup (base models).

`detect_preset` picks a preset from a template string (or, without one, from the special tokens); a template
it does not recognise gives `plain`, which generate.py points out (`--chat-format` picks a preset by name);
`ChatFormat` bundles the preset with the checkpoint's bos/eos strings and default system prompt. The
tokenizer builds one per checkpoint; nothing else in nanomedusa knows about prompt formats.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .errors import NanoMedusaError

Message = dict[str, str]

ROLES = ("system", "user", "assistant")
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# First marker found in the template wins; the order only matters for templates that mix formats.
_TEMPLATE_MARKERS = (
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<<SYS>>", "llama2"),  # Llama-2-chat's system block, before Mistral's [INST] without one
    ("[INST]", "mistral"),
    ("<|user|>", "zephyr"),
    ("USER:", "vicuna"),
)
# Without a template, only these tokens say something reliable about how the model was tuned.
_VOCAB_MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"))

# A constant system turn inside a Jinja string literal: the newline is either literal or the escape `\n`,
# and the text may not contain quotes or braces (that would be template code, e.g. `' + message['content']`).
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")
# Else one whose text has a quote ("You're ..."): a whole Jinja string literal, escapes and all, that holds the turn.
_STRING_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", re.S)
_SYSTEM_TURN = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def detect_preset(chat_template: str | None, special_tokens: Iterable[str] = ()) -> str:
    """The preset whose markers appear in `chat_template`; without a template, the one whose markers are among
    `special_tokens`; else `plain`. A template of another format (DeepSeek's, Gemma's) is `plain` even where the
    vocabulary has ChatML's tokens, which say less about the model's tuning than its own template does."""
    if chat_template:
        return next((name for marker, name in _TEMPLATE_MARKERS if marker in chat_template), "plain")
    tokens = set(special_tokens)
    for marker, name in _VOCAB_MARKERS:
        if marker in tokens:
            return name
    return "plain"


def extract_chatml_system(chat_template: str | None) -> str | None:
    """The default system prompt hard-coded in a ChatML template, or None if it has none."""
    if match := _CHATML_SYSTEM.search(chat_template or ""):
        return match.group(1).replace("\\n", "\n")
    for literal in _STRING_LITERAL.finditer(chat_template or ""):
        text = re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)),
                      literal.group(1) if literal.group(1) is not None else literal.group(2))
        if turn := _SYSTEM_TURN.search(text):
            return turn.group(1)
    return None


def _split_system(messages: Sequence[Message]) -> tuple[str | None, Sequence[Message]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _chatml(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    if messages[0]["role"] != "system" and fmt.default_system is not None:
        messages = [{"role": "system", "content": fmt.default_system}, *messages]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _llama2(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    system, turns = _split_system(messages)
    parts = []
    for i, m in enumerate(turns):
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            parts.append(f"{fmt.bos_token}[INST] {content.strip()} [/INST]")
        elif m["role"] == "assistant":
            parts.append(f" {content.strip()} {fmt.eos_token}")
    return "".join(parts)


def _mistral(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    system, turns = _split_system(messages)
    parts = [fmt.bos_token]
    for i, m in enumerate(turns):
        content = f"{system}\n\n{m['content']}" if i == 0 and system is not None else m["content"]
        parts.append(f"[INST] {content} [/INST]" if m["role"] == "user" else f"{content}{fmt.eos_token}")
    return "".join(parts)


def _llama3(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    body = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    )
    prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else ""
    return fmt.bos_token + body + prompt


def _vicuna(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    system, turns = _split_system(messages)
    text = (fmt.default_system if system is None else system) + " "
    for m in turns:
        if m["role"] == "user":
            text += f"USER: {m['content']} "
        elif m["role"] == "assistant":
            text += f"ASSISTANT: {m['content']}{fmt.eos_token}"
    return text + ("ASSISTANT:" if add_generation_prompt else "")


def _zephyr(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}{fmt.eos_token}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def _plain(fmt: ChatFormat, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return "\n".join(m["content"] for m in messages)


PRESETS: dict[str, Callable[[ChatFormat, Sequence[Message], bool], str]] = {
    "chatml": _chatml,
    "llama2": _llama2,
    "mistral": _mistral,
    "llama3": _llama3,
    "vicuna": _vicuna,
    "zephyr": _zephyr,
    "plain": _plain,
}


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise NanoMedusaError("The conversation is empty; pass at least one {'role': 'user', 'content': ...} message.")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise NanoMedusaError(
                f"Chat message {m!r} is malformed; give each message as a dict with 'role' in "
                f"{', '.join(ROLES)} and a string 'content'."
            )


@dataclass(frozen=True)
class ChatFormat:
    """A preset plus what the checkpoint fills into it (bos/eos strings, default system prompt)."""

    preset: str = "plain"
    bos_token: str = ""
    eos_token: str = ""
    default_system: str | None = None
    # where the preset came from: "given", "template", "vocabulary", or, for plain text found by default, "unknown
    # template" (a template of a format without a preset) or "none" (neither a template nor telling tokens)
    origin: str = "given"

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise NanoMedusaError(f"Unknown chat preset {self.preset!r}; use one of {', '.join(PRESETS)}.")

    @classmethod
    def from_checkpoint(
        cls,
        chat_template: str | None,
        special_tokens: Iterable[str] = (),
        bos_token: str = "",
        eos_token: str = "",
        preset: str | None = None,
    ) -> ChatFormat:
        """Detect the preset (unless given) and pull the default system prompt out of `chat_template`."""
        if preset:
            origin = "given"
        else:
            preset = detect_preset(chat_template, special_tokens)
            found = "template" if chat_template else "vocabulary"
            origin = found if preset != "plain" else "unknown template" if chat_template else "none"
        default_system = {"chatml": extract_chatml_system(chat_template), "vicuna": VICUNA_SYSTEM}.get(preset)
        return cls(preset, bos_token, eos_token, default_system, origin)

    def plain_text_note(self) -> str | None:
        """Why messages go in as plain text where no format was given and none was found (else None): the tools
        print it, since a chat model fed plain text answers worse, and train.py's heads learn from such prompts."""
        if self.origin not in ("unknown template", "none"):
            return None
        why = ("has no chat template" if self.origin == "none"
               else "has a chat template of a format nanomedusa has no preset for")
        return (f"the checkpoint {why}, so messages go in as plain text, without role markers; if the model was "
                f"tuned on one of these formats, pass --chat-format {'|'.join(p for p in PRESETS if p != 'plain')}")

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` (a list of {'role', 'content'} dicts)."""
        _check_messages(messages)
        return PRESETS[self.preset](self, messages, add_generation_prompt)

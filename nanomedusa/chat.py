"""A multi-turn chat in the terminal that keeps the conversation's KV cache from one turn to the next.

    python generate.py --interactive                    # type a message, Enter; /help lists the commands
    python generate.py --interactive --prompt "Hi!"     # the first turn from the command line
    printf 'Hi!\\nAnd in French?\\n' | python generate.py --interactive   # piped: one line per turn

Each turn renders the whole conversation with the model's chat template (`Tokenizer.encode_chat`),
compares the ids with those whose keys/values fill the cache's first slots, and prefills only from the
first difference: usually the new user message with its turn markers, plus the previous answer's
end-of-turn token (decoding samples the last token but never runs it through the model). Comparing ids,
rather than assuming the cache lines up with the template, keeps the cache exactly what a fresh prompt
would hold: a decoded answer can re-encode to other ids than the model produced, and `/system` or dropped
turns change the start of the prompt. The answers are then those of running each turn as one growing
prompt from scratch (`tests/test_chat.py` checks it).

The cache is sized once for the session (`context` slots), so it is never reallocated and the CUDA graphs
captured on it (prefill per padded length, the decode or Medusa step) serve every turn. After a Medusa
turn the slots past the accepted tokens hold rejected tree nodes; they lie past the cached ids, so the
next prefill overwrites them before anything reads them. When a turn would not fit (prompt +
max_new_tokens + tree nodes), the oldest turns are dropped with a notice and what remains is prefilled again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from .chat_template import Message
from .errors import USER_ERRORS, NanoMedusaError
from .files import check_utf8
from .decoder import CACHE_BUCKET, round_up
from .generation import GenerationResult
from .tokenizer import Tokenizer

# The default context on a CPU, where a cache of the model's whole context would be large for the memory it
# stays in (float32: 377 MB for SmolLM2's 8192 tokens, 4 GB for a 7B's 4096). Attention reads only the slots in
# use there (kernels/tree_attention.py), so a larger --context costs memory, not speed.
CPU_CONTEXT = 2048

# The settings, and a system message, must leave room for a user message of at least this many tokens: one that
# left room for an empty message only would refuse every real one as too long.
MESSAGE_ROOM = 16

# decode(prompt_ids, max_new_tokens, on_tokens=..., cached_len=...) -> GenerationResult: `generation.generate`
# or `medusa_generation.generate_medusa` with the decoder and the other arguments bound.
Decode = Callable[..., GenerationResult]

HELP = """commands:
  /reset        forget the conversation (a /system message stays)
  /system TEXT  set the system message (/system alone: back to the model's default)
  /stats        speed of the last answer, accepted length, context used
  /exit         quit (Ctrl-D too)
Ctrl-C stops an answer and keeps the conversation; at the prompt it drops the line.
A message that starts with / is sent as //message."""


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Turn:
    """What one answer cost."""

    prompt_tokens: int  # the whole conversation's prompt for this turn
    prefilled: int  # of those, the ones run through the model this turn (the rest came from the cache)
    first_token_seconds: float  # from the message to its first answer token (encode, prefill, first sample)
    seconds: float  # from the message to the end of the answer
    answer_tokens: int
    result: GenerationResult | None  # None when Ctrl-C stopped the answer


class ChatSession:
    """One conversation: its messages, and the ids whose keys/values fill the cache's first slots.

    `decode` answers (see `Decode`); `extra` is the cache room a step needs past the answer (a Medusa
    tree's nodes); `context` caps the cache (default: the model's context, at most CPU_CONTEXT on a CPU)."""

    def __init__(self, model, tokenizer: Tokenizer, decode: Decode, max_new_tokens: int, extra: int = 0,
                 context: int | None = None, system: str | None = None,
                 notify: Callable[[str], None] = lambda text: print(f"[chat] {text}", file=sys.stderr, flush=True)):
        limit = model.config.max_position_embeddings
        if context is not None and context > limit:
            notify(f"the model's context is {limit} tokens, so the chat keeps {limit}, not {context}")
        context = context or (limit if model.device.type == "cuda" else min(limit, CPU_CONTEXT))
        # A whole number of CACHE_BUCKETs: Decoder.size_cache rounds a run's need up to one, and must
        # find this cache large enough rather than reallocate it.
        self.context = min(round_up(context, CACHE_BUCKET), limit)
        model.setup_cache(self.context)
        self.tokenizer, self.decode, self.notify = tokenizer, decode, notify
        self.max_new_tokens = max_new_tokens
        self.extra = extra
        self.reserve = max_new_tokens + extra  # the room an answer needs on top of its prompt
        self.system = None
        if self._shortest_prompt() + MESSAGE_ROOM + self.reserve > self.context:  # the settings are wrong
            fix = ("lower --max-new-tokens" + (" or use a smaller tree" if extra else "")
                   + (" or raise --context" if self.context < limit else ""))
            raise NanoMedusaError(f"{self._answer_room()} leaves no room for a message in a chat context of "
                                  f"{self.context} tokens; {fix}.")
        self.set_system(system)
        self.messages: list[Message] = []  # user and assistant turns, alternating, oldest first
        self.cached: list[int] = []  # the ids in cache slots 0 .. len-1
        self.used = 0  # tokens of the conversation so far (prompt + answer of the last turn)
        self.last: Turn | None = None

    def _answer_room(self) -> str:
        """What the cache keeps free for an answer, in words."""
        tree = f" and a tree of {self.extra} nodes" if self.extra else ""
        return f"an answer of {self.max_new_tokens} tokens{tree}"

    def _shortest_prompt(self, system: str | None = None) -> int:
        """Tokens of a prompt whose user message is empty: the template's markers and the system message."""
        turns = [{"role": "system", "content": system}] if system is not None else []
        return len(self.tokenizer.encode_chat(turns + [{"role": "user", "content": ""}]))

    def set_system(self, system: str | None) -> None:
        """Set the system message (None: the model's default), unless it leaves no room for a message."""
        room = self.context - self.reserve - MESSAGE_ROOM  # what the prompt may take besides a short message
        if system is not None and (shortest := self._shortest_prompt(system)) > room:
            raise NanoMedusaError(f"this system message makes every prompt at least {shortest} tokens long, which "
                                  f"leaves too little of the {self.context}-token context for a message and "
                                  f"{self._answer_room()}; shorten it.")
        self.system = system

    def reset(self) -> None:
        """Forget the conversation. The cached ids stay: the next prompt reuses what it shares with them."""
        self.messages, self.used, self.last = [], 0, None

    def conversation(self, messages: list[Message] | None = None) -> list[Message]:
        """The system message (when set) and `messages` (default: the conversation's)."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + (self.messages if messages is None else messages)

    def say(self, text: str, on_text: Callable[[str], None] = lambda text: None) -> str:
        """Answer one user message, streaming the answer's text to `on_text`; returns the answer.
        Ctrl-C (KeyboardInterrupt) ends the answer early: what came so far is kept as the answer."""
        earlier = list(self.messages)
        try:
            return self._answer(text, on_text)
        except USER_ERRORS:  # a refused message leaves the conversation as it was
            self.messages = earlier
            raise

    def _answer(self, text: str, on_text: Callable[[str], None]) -> str:
        began = time.perf_counter()
        prompt = self._fit({"role": "user", "content": text})
        start = min(common_prefix(self.cached, prompt), len(prompt) - 1)  # the last id must run: its logits
        self.cached = self.cached[:start]  # all that an interrupted answer surely leaves intact
        answer: list[int] = []
        stream = self.tokenizer.stream_decoder()
        first_token = 0.0

        def on_tokens(ids: list[int]) -> None:
            nonlocal first_token
            first_token = first_token or time.perf_counter() - began
            answer.extend(ids)
            on_text("".join(stream.push(i) for i in ids))

        result = None
        try:
            result = self.decode(prompt, self.max_new_tokens, on_tokens=on_tokens, cached_len=start)
            self.cached = prompt + result.tokens[:-1]  # the last token was sampled, never run through the model
        except KeyboardInterrupt:
            self.notify("stopped")
        on_text(stream.flush())
        reply = self.tokenizer.decode(answer)  # without special tokens: the end-of-turn mark is the template's
        self.messages.append({"role": "assistant", "content": reply})
        self.used = len(prompt) + len(answer)
        seconds = time.perf_counter() - began
        self.last = Turn(len(prompt), len(prompt) - start, first_token, seconds, len(answer), result)
        return reply

    def _fit(self, message: Message) -> list[int]:
        """Add the user message and return the conversation's prompt ids, first dropping the oldest turns
        while prompt + reserve exceeds the context. A message that cannot fit even alone is refused."""
        alone = self.tokenizer.encode_chat(self.conversation([message]))
        if len(alone) + self.reserve > self.context:
            system = (" and the system message" if self.system is not None else " and the model's default system "
                      "prompt" if self.tokenizer.chat.default_system is not None else "")
            raise NanoMedusaError(f"this message takes {len(alone)} tokens with the chat template{system}, which "
                                  f"leaves too little of the {self.context}-token context for {self._answer_room()}; "
                                  f"send a shorter one.")
        self.messages.append(message)
        dropped = 0
        while len(prompt := self.tokenizer.encode_chat(self.conversation())) + self.reserve > self.context:
            del self.messages[:2]  # the oldest user message and its answer
            dropped += 1
        if dropped:
            self.notify(f"the context of {self.context} tokens is full: dropped the oldest {dropped} turn(s)")
        return prompt

    def stats(self) -> str:
        context = f"context used: {self.used} of {self.context} tokens"
        turn = self.last
        if turn is None:
            return f"no answer yet; {context}"
        line = (f"last answer: {turn.answer_tokens} tokens in {turn.seconds:.2f} s, first after "
                f"{turn.first_token_seconds * 1000:.0f} ms (prefilled {turn.prefilled} of {turn.prompt_tokens} "
                f"prompt tokens)")
        if turn.result is None:
            return f"{line}, stopped; {context}"
        r = turn.result
        decode_seconds = r.seconds - r.prefill_seconds
        return (f"{line}; prefill {r.prefill_seconds * 1000:.0f} ms, decode {decode_seconds:.2f} s = "
                f"{r.decode_tokens_per_second:.1f} tokens/s, mean accepted length {r.mean_accepted:.2f}; {context}")


def read_lines(stdin: TextIO, first: str | None = None) -> Iterator[str]:
    """The user's lines: `first`, then stdin (with line editing and a prompt at a terminal) until EOF. At a
    terminal Ctrl-C drops the line being typed, as a shell does (Ctrl-D or /exit quits); from a pipe it ends."""
    if first is not None:
        yield first
    while True:
        try:
            line = input(_prompt()) if stdin.isatty() else stdin.readline()
        except EOFError:
            if stdin.isatty():  # (the shell's prompt then starts a line of its own)
                print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            if not stdin.isatty():
                return
            print(file=sys.stderr)
            continue
        if not (line or stdin.isatty()):  # the end of a pipe (input() gives "" for an empty line)
            return
        yield line.rstrip("\n")


def _prompt() -> str:
    """input()'s prompt, which it writes to stdout: where stdout is a file (`> answers.txt`), the prompt goes to
    stderr instead, so that the file holds the answers alone."""
    if sys.stdout.isatty():
        return "> "
    print("> ", end="", file=sys.stderr, flush=True)
    return ""


def run_chat(session: ChatSession, first: str | None = None, stdin: TextIO = sys.stdin,
             out: TextIO = sys.stdout, verbose: bool = False) -> None:
    """The chat loop: each line is a message or a command; answers stream to `out`, notices go to stderr. A line
    refused is one error line and the chat goes on, except `first` (--prompt's): its error ends the run, so that a
    script's one turn that failed does not exit as done."""
    if stdin.isatty():
        print("Chat: type a message and Enter; /help lists the commands.", file=sys.stderr)
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 then reach the line's check, in every locale
        stdin.reconfigure(errors="surrogateescape")

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    def handle(line: str) -> bool:
        """Act on one line; False for /exit. A user's error is raised, with the conversation as it was."""
        check_utf8("this line", line)
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            session.reset()
            session.notify("the conversation is cleared")
        elif command == "/system":
            session.set_system(rest.strip() or None)  # (refused, the system message stays as it was)
            session.notify(f"system message {'set' if session.system else 'back to the default'}")
        elif command == "/stats":
            print(session.stats(), file=sys.stderr)
        elif command == "/help":
            print(HELP, file=sys.stderr)
        elif command.startswith("/") and not command.startswith("//"):
            print(f"unknown command {command}; /help lists the commands (send a message that starts with / as "
                  f"//message).", file=sys.stderr)
        else:
            try:
                session.say(line[1:] if line.startswith("//") else line, write)
            except KeyboardInterrupt:  # Ctrl-C outside the decoding (which say() handles): the session goes on
                pass
            write("\n")
            if verbose:
                print(f"[chat] {session.stats()}", file=sys.stderr)
        return True

    for i, line in enumerate(read_lines(stdin, first)):
        line = line.strip()
        if not line:
            continue
        try:
            if not handle(line):
                return
        except USER_ERRORS as e:
            if i == 0 and first is not None:  # --prompt's: the run's error, as in a one-shot run (exit status 2)
                raise
            print(f"error: {e}", file=sys.stderr)

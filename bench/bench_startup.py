"""Start-up and chat latency of generate.py, for the targets of issue #19. Run it on the GPU:

    python bench/bench_startup.py                           # the default model and decoder of this machine
    python bench/bench_startup.py --runs 3 --conversation-tokens 1000 -- --no-medusa

1. Time to first token: `python generate.py --prompt ... --verbose` as a fresh process, `--runs` times (the
   first run warms the disk, the prepared bfloat16 model and Triton's cache; the last is the one to read).
   Measured from launch to the first streamed byte, with the --verbose breakdown of each run (imports,
   load, first-call setup, prefill, decode). Target: <= 3 s, <= 2 s of it before the model is on the GPU.
2. Follow-up turn: the chat that `--interactive` builds, grown with the prompts of bench/prompts-chat.jsonl
   to about --conversation-tokens tokens, then --follow-ups short turns, each timed from the message to its
   first streamed token (what Enter-to-first-token is, less the terminal). Target: <= 50 ms. The chat runs in this
   process, set up as `generate.py --interactive` sets it up, kernels included (--exact by default on Hopper).

Arguments after `--` go to generate.py in both parts (e.g. `-- --no-medusa`, `-- --model DIR`). They are checked
before part 1 starts, in this process, which imports torch for that: the disk is warm for the first run's imports
too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # generate.py is a script at the repository root, not part of the package

from nanomedusa.cli import (ArgumentParser, RawDescriptionHelpFormatter, check_at_least,  # noqa: E402 (after the path)
                            exit_with, run_reporting_errors)

PROMPT = "Hi, who are you?"
FOLLOW_UPS = ["Thanks! Say that again in one sentence.", "Why?", "Give me one example.", "And another one?",
              "Summarise our conversation in ten words."]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="fresh generate.py processes for the time to first token")
    p.add_argument("--conversation-tokens", type=int, default=1000, help="grow the chat to this many tokens")
    p.add_argument("--follow-ups", type=int, default=5, help="follow-up turns timed")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("generate_args", nargs="*", help="after --: more generate.py flags")
    return p.parse_args(argv)


def chat_args(args):
    """generate.py's arguments for the chat of part 2 (--interactive and this tool's --max-new-tokens, then the
    flags after --)."""
    import generate

    return generate.parse_args(["--interactive", "--max-new-tokens", str(args.max_new_tokens), *args.generate_args])


def check_args(args) -> None:
    """This tool's flags and generate.py's after --, before part 1's processes start (a NanoMedusaError naming the
    fix; generate.py's own parser refuses a flag it does not know)."""
    import generate

    check_at_least(0, {"--runs": args.runs, "--conversation-tokens": args.conversation_tokens})
    check_at_least(1, {"--follow-ups": args.follow_ups, "--max-new-tokens": args.max_new_tokens})
    generate.check_args(generate.parse_args(one_shot_args(args.generate_args, args.max_new_tokens)))  # part 1's
    generate.check_args(chat_args(args))  # part 2's


def one_shot_args(extra: list[str], max_new_tokens: int) -> list[str]:
    """generate.py's arguments for part 1's fresh processes."""
    return ["--prompt", PROMPT, "--max-new-tokens", str(max_new_tokens), "--verbose", *extra]


def time_to_first_token(extra: list[str], max_new_tokens: int) -> tuple[float, str]:
    """Launch generate.py; -> (seconds to its first stdout byte, its stderr)."""
    command = [sys.executable, "generate.py", *one_shot_args(extra, max_new_tokens)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = os.read(proc.stdout.fileno(), 1)
    seconds = time.perf_counter() - started
    proc.stdout.read()
    stderr = proc.stderr.read().decode()
    if proc.wait() != 0 or not first:
        sys.exit(f"generate.py failed:\n{stderr}")
    return seconds, stderr


def follow_up_latencies(args, conversation_tokens: int, follow_ups: int):
    """Grow a chat to `conversation_tokens`, then time `follow_ups` turns; -> [(ms to first token, prefilled, used)].
    `args` are generate.py's (`chat_args`): the chat is set up by generate.py's own `prepare`, its kernels
    (--kernels, --exact) included."""
    import generate

    decoder, tokenizer, heads, tree = generate.prepare(args)
    session = generate.chat_session(args, decoder, tokenizer, heads, tree)
    prompts = [json.loads(line)["prompt"] for line in (REPO / "bench" / "prompts-chat.jsonl").open()]
    for prompt in prompts:
        if session.used >= conversation_tokens:
            break
        session.say(prompt)
    print(f"conversation grown to {session.used} tokens in {len(session.messages) // 2} turns "
          f"({'Medusa' if heads is not None else 'plain'} decoding, {decoder.model.device}, {decoder.model.dtype})")
    timings = []
    for text in (FOLLOW_UPS * follow_ups)[:follow_ups]:
        session.say(text)
        timings.append((session.last.first_token_seconds * 1000, session.last.prefilled, session.used))
    return timings


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: (check_args(args), run(args)))


def run(args) -> None:
    """Both parts, as the module docstring says, with the flags `check_args` accepted."""
    print(f"1. time to first token of `python generate.py --prompt {PROMPT!r}`, {args.runs} fresh processes")
    for n in range(1, args.runs + 1):
        seconds, stderr = time_to_first_token(args.generate_args, args.max_new_tokens)
        breakdown = " | ".join(line for line in stderr.splitlines() if line.startswith("[time]"))
        print(f"   run {n}: first token after {seconds:.2f} s   {breakdown}")
    print(f"2. follow-up turns of a chat of about {args.conversation_tokens} tokens")
    timings = follow_up_latencies(chat_args(args), args.conversation_tokens, args.follow_ups)
    for ms, prefilled, used in timings:
        print(f"   first token after {ms:6.1f} ms (prefilled {prefilled} new tokens; conversation {used} tokens)")
    print(f"   median {statistics.median(ms for ms, _, _ in timings):.1f} ms")


if __name__ == "__main__":
    exit_with(main())

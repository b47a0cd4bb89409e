"""Prompt sets: reading one (JSONL of {"id", "prompt"[, "category"]}), and decoding it with one method,
timed (`measure`), into the totals every part of the benchmark reports (`totals`).

A method's time per prompt is what its `generate` call reports (`GenerationResult.seconds`, prefill
included; `prefill_seconds` until the first token reached the host), so that every method is timed by the same
clock; see bench/decode.py for what the totals mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nanomedusa.cli import check_input_file
from nanomedusa.errors import NanoMedusaError
from nanomedusa.files import read_utf8
from nanomedusa.generation import GenerationResult
from nanomedusa.tokenizer import Tokenizer

from .report import say

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts-train-mix.jsonl"


@dataclass
class Prompt:
    id: str
    ids: list[int]  # the chat-templated prompt, tokenized
    category: str | None = None  # the prompt file's "category", if it gives one


def read_prompts(path: Path, limit: int | None, flag: str = "--prompts") -> list[tuple[str, str, str | None]]:
    """(id, text, category) from a JSONL file of {"id", "prompt"[, "category"]} objects, the first `limit`; `flag`
    is the flag that named the file, for the error."""
    check_input_file(flag, path)
    if limit is not None and limit < 1:
        raise NanoMedusaError(f"--num-prompts {limit} leaves nothing to run; pass 1 or more.")
    out = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines cuts at.
    for n, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out.append((str(record["id"]), record["prompt"], record.get("category")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NanoMedusaError(f"{path} line {n} is not a JSON object with \"id\" and \"prompt\"; "
                                  f"fix that line.") from None
    if not out:
        raise NanoMedusaError(f"{path} holds no prompts; add lines like {{\"id\": \"a\", \"prompt\": \"...\"}}.")
    return out[:limit]


def chat_prompts(tokenizer: Tokenizer, paths: Path | list[Path], limit: int | None) -> list[Prompt]:
    """The prompts of one JSONL file or of several in order (`read_prompts`), the first `limit` of each file (as
    --num-prompts means in every benchmark: two sets given, each keeps its first N), each rendered with the chat
    template and tokenized."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    records = [record for path in paths for record in read_prompts(Path(path), limit)]
    return [Prompt(i, tokenizer.encode_chat([{"role": "user", "content": text}]), category)
            for i, text, category in records]


def warmup_prompts(prompts: list[Prompt], quick: bool) -> list[Prompt]:
    """What a method of ours runs untimed first: every prompt, or with `quick` (--quick-warmup) the first
    only (bench/decode.py's docstring says why every prompt)."""
    return prompts[:1] if quick else prompts


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first token where two outputs differ (None when equal)."""
    if got == want:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def measure(label: str, run_one: Callable[[list[int]], GenerationResult], prompts: list[Prompt],
            warmup: list[Prompt], reference: list[list[int]] | None = None) -> tuple[dict, list[list[int]]]:
    """Run the `warmup` prompts untimed, then each prompt once: (per-prompt rows and totals, outputs).

    With `reference` (plain greedy outputs, one per prompt) each row says whether the output matched."""
    say(f"  [{label}] warm-up: {len(warmup)} prompt(s), untimed")
    for prompt in warmup:
        run_one(prompt.ids)
    rows, outputs = [], []
    for n, prompt in enumerate(prompts, 1):
        r = run_one(prompt.ids)
        row = {"id": prompt.id, "category": prompt.category, "prompt_tokens": len(prompt.ids),
               "new_tokens": len(r.tokens), "seconds": r.seconds, "prefill_seconds": r.prefill_seconds or None,
               "steps": r.steps, "tokens_per_second": r.tokens_per_second, "mean_accepted": r.mean_accepted}
        note = f", mean accepted {r.mean_accepted:.2f}" if r.mean_accepted != 1.0 else ""
        if reference is not None:
            diff = first_difference(r.tokens, reference[n - 1])
            row.update(matches_ar=diff is None, first_difference=diff)
            note += ", = AR" if diff is None else f", DIFFERS from AR at token {diff}"
        say(f"  [{label}] {n}/{len(prompts)} {prompt.id}: {len(r.tokens)} tokens in {r.seconds:.2f} s "
            f"({r.tokens_per_second:.1f} tokens/s{note})")
        rows.append(row)
        outputs.append(r.tokens)
    summary = {**totals(rows), "per_prompt": rows}
    categories = sorted({r["category"] for r in rows if r["category"]})
    if categories:
        summary["by_category"] = {c: totals([r for r in rows if r["category"] == c]) for c in categories}
    return summary, outputs


def totals(rows: list[dict]) -> dict:
    tokens, seconds, steps = (sum(r[k] for r in rows) for k in ("new_tokens", "seconds", "steps"))
    decode_seconds = seconds - sum(r["prefill_seconds"] or 0.0 for r in rows)
    out = {"prompts": len(rows), "new_tokens": tokens, "seconds": seconds, "steps": steps,
           "tokens_per_second": tokens / seconds if seconds else 0.0,
           # the decoding steps alone: the tokens after each prompt's first, over the time after its prefill
           "decode_tokens_per_second": (tokens - len(rows)) / decode_seconds if decode_seconds > 0 else 0.0,
           "mean_accepted": (tokens - len(rows)) / steps if steps else 1.0}
    if "matches_ar" in rows[0]:
        out["matches_ar"] = sum(r["matches_ar"] for r in rows)
    return out

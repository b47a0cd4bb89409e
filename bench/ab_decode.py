"""A/B of code versions end to end: bench/decode.py run from each version's code in alternation, in one call.

    python -m bench.ab_steps export 3b5ad07       # here, with git: ab/3b5ad07/ (the code of that revision)
    python -m bench.ab_decode ab/3b5ad07 . --rounds 2 -- --heads path=weights/smollm2-135m-instruct-medusa-path \
        --tree own --prompts bench/prompts-chat-heldout.jsonl bench/prompts-train-mix.jsonl --no-hf --skip-7b

Why: a change to the decoding loop or to a kernel moves tokens/s by a few percent, and machines of one kind differ
by 2-3%, so only versions timed in one call compare; alternating them (round 1: every version, round 2: every
version, ...) lets a machine's drift touch each alike. bench/ab_steps.py does the same for graphed step times.

Each run is one process, `bench.decode` with the arguments after `--` (and `--json` to a file of this tool's),
importing kernels/, nanomedusa/, bench/ and weights/ from the version's folder (`.` is the working tree) but running
in the working tree, so that the paths among the arguments (heads, prompt files, --model) name the same files for
every version. An exported folder holds code only: the tool links the working tree's weights/ entries it lacks (the
prepared default model in weights/cache/, the shipped heads) into it. The table: per method (plain decoding on each
backbone; each heads x tree) and prompt file, each version's tokens/s (new tokens / seconds, summed over the file's
prompts and the rounds), mean accepted length, and the change against the first version. Versions from before
acb3d3a took `--num-prompts` N over all `--prompts` files together, later ones N of each file: with several files, a
row of such a pair compares different prompts (or reads "missing"), so give one file per call there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .ab_steps import REPO, version_folders
from .prompts import DEFAULT_PROMPTS, read_prompts, totals
from .report import print_table, save, say

# Runs in the working tree with the version's folder first on sys.path: bench.decode as `python -m` would.
_WORKER = r"""
import runpy, sys
from pathlib import Path
version = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(version))
import nanomedusa.model
if not Path(nanomedusa.model.__file__).resolve().is_relative_to(version):
    sys.exit(f"the model code came from {nanomedusa.model.__file__}, not from {version}")
sys.argv = ["bench.decode", *sys.argv[2:]]
runpy.run_module("bench.decode", run_name="__main__", alter_sys=True)
"""


def link_weights(version: Path) -> None:
    """Give an exported version the working tree's weights/ entries that are not code (the prepared default model,
    the shipped heads), as links, where it has none of its own."""
    if version == REPO:
        return
    for entry in (REPO / "weights").iterdir():
        target = version / "weights" / entry.name
        if entry.suffix != ".py" and entry.name != "__pycache__" and not target.exists():
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def prompt_files(decode_args: list[str]) -> list[Path]:
    """The prompt files bench.decode will read: those after --prompts (else its default), then those after
    --sampling (which alone reads --prompts' files)."""
    def after(flag: str) -> list[Path]:  # the files listed after flag, none where it is absent
        if flag not in decode_args:
            return []
        files = []
        for arg in decode_args[decode_args.index(flag) + 1:]:
            if arg.startswith("--"):
                break
            files.append(REPO / arg)
        return files

    files = after("--prompts") or [DEFAULT_PROMPTS]  # bench.decode's --prompts takes at least one file
    return files + [f for f in after("--sampling") if f not in files]


def methods(result: dict) -> dict[str, list[dict]]:
    """bench.decode's JSON -> {method label: its per-prompt rows}: plain decoding per backbone, Medusa per heads x tree,
    and --sampling's methods."""
    out = {f"plain ({backbone})": part["per_prompt"] for backbone, part in result.get("ar", {}).items()}
    for m in result.get("medusa", []):
        out[f"{m['heads']} / {m['tree']}"] = m["per_prompt"]
    for per_method in result.get("sampling", {}).get("sets", {}).values():  # --sampling: each method, every file
        for label, part in per_method.items():
            out.setdefault(f"sampling: {label}", []).extend(part["per_prompt"])
    return out


def run(args) -> dict:
    versions = version_folders(args.versions, "bench/decode.py")
    for v in versions:
        link_weights(v)
    file_of = {pid: path.name for path in prompt_files(args.decode_args) for pid, _, _ in read_prompts(path, None)}
    rows_of: dict = {}  # (method, prompt file, version name) -> per-prompt rows of every round
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            for i, v in enumerate(versions):
                out = Path(tmp) / f"{round_}-{i}.json"
                try:
                    done = subprocess.run([sys.executable, "-c", _WORKER, str(v), *args.decode_args, "--json",
                                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    raise SystemExit(f"error: bench.decode for {v.name} ran past --timeout {args.timeout:.0f} s; "
                                     f"raise it, or pass fewer prompts (--num-prompts after `--`).") from None
                if done.returncode != 0 or not out.is_file():
                    raise SystemExit(f"error: bench.decode failed for {v.name}:\n"
                                     + "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:]))
                for method, rows in methods(json.loads(out.read_text())).items():
                    for row in rows:
                        rows_of.setdefault((method, file_of.get(row["id"], "?"), v.name), []).append(row)
                say(f"[ab] round {round_}, {v.name}: done")
    table, results = [], []
    for method, prompts in dict.fromkeys((m, f) for m, f, _ in rows_of):
        first = None
        for v in versions:
            rows = rows_of.get((method, prompts, v.name))
            if not rows:  # this version's bench.decode reported no such method (an older one, other labels)
                table.append([method, prompts, v.name, "missing", "", ""])
                continue
            total = totals(rows)  # summed over the file's prompts and the rounds, as bench.decode sums its own
            speed, accepted = total["tokens_per_second"], total["mean_accepted"]
            first = first or speed
            table.append([method, prompts, v.name, f"{speed:.1f}", f"{accepted:.2f}", f"{speed / first - 1:+.1%}"])
            results.append(dict(method=method, prompts=prompts, version=v.name, tokens_per_second=speed,
                                mean_accepted=accepted, runs=len(rows)))
    print_table(f"End to end (bench.decode, {args.rounds} round(s) each, alternated): tokens/s against "
                f"{versions[0].name}", ["method", "prompts", "version", "tokens/s", "mean accepted", "vs first"], table)
    out = {"versions": [v.name for v in versions], "decode_args": args.decode_args, "rounds": args.rounds,
           "results": results}
    if args.json:
        save(out, args.json)
    return out


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("versions", nargs="+", help="exported folders (ab/<revision>) or . for the working tree; the "
                                                 "first is the baseline")
    p.add_argument("--rounds", type=int, default=2, help="times through every version (default 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per bench.decode run (default 600)")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv[:split])
    args.decode_args = argv[split + 1:]
    if "--json" in args.decode_args:
        p.error("put --json before `--` (this tool's); bench.decode's goes to a file of its own")
    return args


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()

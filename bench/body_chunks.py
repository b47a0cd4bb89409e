"""Sweep the row-invariant tree attention's body chunking (`kernels.tree_attention.body_chunks`) on the step
benchmark: graphed decode and 64-node tree steps of bench/steps.py's random-weight shapes at several prefixes, for
each chunk count, beside a version of the code without the count (a folder `python -m bench.ab_steps export`
made, e.g. main before the count existed), all in one call on one machine.

    python -m bench.ab_steps export main                      # here, with git: ab/main/
    python -m bench.body_chunks ab/main . --shape 7b llama3-8b smollm2-135m --prefix 300 1024 2048 4000 \\
        --chunks 4 8 16:8 --json $OUT/body-chunks.json      # on a GPU

Why in-process: a chunk count is one argument of the kernels, so one process per shape builds the model once and
times every count at every prefix (each prefix on a cache sized for it, as bench/ab_steps.py does), alternating
the counts within each round; a version without `body_chunks` is timed once per prefix and round, as shipped.
The table: per shape and prefix, each version and count's median over the rounds, and its change against the
first version's.
"""

from __future__ import annotations

import re

from nanomedusa.cli import ArgumentParser, RawDescriptionHelpFormatter, exit_with, run_reporting_errors
from nanomedusa.errors import NanoMedusaError

from .ab_steps import (NOTHING_MEASURED, TABLE_COLUMNS, add_step_flags, check_step_flags, measure, median_steps,
                       table_row, version_folders)
from .report import print_table, save, say

# Runs in a version's folder with that folder first on sys.path (bench/ab_steps.py's `measure`).
_WORKER = r"""
import argparse, json, sys
import torch
import kernels
import kernels.tree_attention as ta
from bench.steps import SHAPES, build_7b, step_ms
from nanomedusa.tree import PRESETS, TreeBuffers

a = json.loads(sys.argv[1])
device = torch.device(a["device"])
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
shape = argparse.Namespace(**{**SHAPES[a["shape"]], **({"big_layers": a["layers"]} if a["layers"] else {})})
kernels.set_row_invariant(True)
kernels.set_dependent_launch(True)
counts = a["chunks"] if hasattr(ta, "body_chunks") else [None]
shipped = getattr(ta, "body_chunks", None)
rows = []
with torch.inference_mode():
    tree = TreeBuffers.from_choices(PRESETS[a["tree"]], device=device)
    model = build_7b(shape, device, dtype, max(a["prefix"]) + tree.num_nodes + 128)
    for round_ in range(a["rounds"]):
        for prefix in a["prefix"]:
            model.setup_cache(prefix + tree.num_nodes + 128)
            model.forward_hidden(torch.randint(shape.big_vocab, (1, prefix), device=device), prefix_len=0)
            for count in counts:
                if count is not None:
                    ta.body_chunks = shipped
                if count not in (None, "shipped"):  # "count" or "count:max_tiles" (else shipped max_tiles)
                    n, _, tiles = count.partition(":")
                    ta.body_chunks = (lambda on_gpu, n_kv_heads, n=int(n), tiles=tiles: ta.BodyChunks(
                        n, int(tiles or shipped(True, n_kv_heads).max_tiles)) if on_gpu else shipped(False, n_kv_heads))
                rows.append(dict(prefix=prefix, chunks=count, decode_ms=step_ms(model, prefix, None, a["reps"]),
                                 tree_ms=step_ms(model, prefix, tree, a["reps"])))
                print(json.dumps(rows[-1]), file=sys.stderr)
print(json.dumps(rows))
"""


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("versions", nargs="+", help="exported folders (ab/<revision>) or . ; the first is the baseline")
    add_step_flags(ap)
    ap.add_argument("--chunks", nargs="+", default=["2", "4", "8", "16"],
                    help="body chunkings to time: COUNT or COUNT:MAX_TILES (kernels.tree_attention.BodyChunks), or "
                         "shipped")
    ap.add_argument("--rounds", type=int, default=2, help="times through every prefix and count (default 2)")
    ap.add_argument("--reps", type=int, default=200, help="graph replays per step time (default 200)")
    ap.add_argument("--device", default="cuda", help="default cuda (cpu: eager steps, for checking the tool)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per process (default 600)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    return ap.parse_args(argv)


def check_args(args) -> None:
    """Every value before a worker starts, so that a typo is one error line, not a table of failed rows."""
    for chunks in args.chunks:
        if not re.fullmatch(r"shipped|[1-9]\d*(:[1-9]\d*)?", chunks):
            raise NanoMedusaError(f"--chunks {chunks!r} is not COUNT, COUNT:MAX_TILES or shipped (counts of at least "
                                  f"1); pass e.g. --chunks 4 8 16:8 shipped.")
    check_step_flags(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: (check_args(args), run(args)))


def run(args) -> None:
    """Each version's steps at every shape, prefix and chunking, in worker processes; the table and --json."""
    versions = version_folders(args.versions, "bench/steps.py")
    results, rows = [], []
    for shape in args.shape:
        by_version = {}  # the versions as named on the command line (. and ab/main may both be "main" folders)
        for name, v in zip(args.versions, versions):
            job = dict(device=args.device, shape=shape, layers=args.layers, prefix=args.prefix, chunks=args.chunks,
                       tree=args.tree, reps=args.reps, rounds=args.rounds)
            got = measure(v, job, args.timeout, _WORKER)
            by_version[name] = got or []
            say(f"[chunks] {shape}, {name}: {len(got or [])} step pairs timed")
        for prefix in args.prefix:
            first = None
            for name, got in by_version.items():
                for count in dict.fromkeys(r["chunks"] for r in got if r["prefix"] == prefix):
                    runs = [r for r in got if r["prefix"] == prefix and r["chunks"] == count]
                    decode, tree = median_steps(runs)
                    first = first or (decode, tree)
                    label = name if count is None else f"{name}, chunks {count}"
                    rows.append(table_row(shape, prefix, label, decode, tree, first))
                    results.append(dict(shape=shape, prefix=prefix, version=name, chunks=count, decode_ms=decode,
                                        tree_ms=tree, rounds=runs))
    print_table(f"Graphed row-invariant steps with PDL ({args.tree} tree; median of {args.rounds} rounds, {args.reps} "
                f"replays each): ms, and against {args.versions[0]}", TABLE_COLUMNS, rows)
    if args.json:
        save({"tree": args.tree, "device": args.device, "chunks": args.chunks, "results": results}, args.json)
    if not results:
        raise SystemExit(NOTHING_MEASURED)


if __name__ == "__main__":
    exit_with(main())

"""A/B of code versions on the step benchmark: bench/steps.py's graphed decode and 64-node tree steps, timed for
several revisions of this repository in alternation, so that a machine's drift touches every version alike.

    python -m bench.ab_steps export main wip/swiglu-fold        # here, with git: ab/main/ and ab/wip-swiglu-fold/
    python -m bench.ab_steps run ab/main ab/wip-swiglu-fold --shape smollm2-135m 7b --prefix 200 1024   # on a GPU

Why versions and not flags: a kernel variant worth measuring is usually a change to the code, on a branch, and
comparing it with main in one call on one machine is the only comparison this project trusts (machines of the
pool differ by 2-3%). `export` writes each revision's kernels/, nanomedusa/, bench/ and weights/*.py into
ab/<revision>/ at the repository's root (a "/" in the revision becomes "-"); the folder is untracked, so it travels
to the device machine with the working tree (which has no git history there). `run` starts one Python process per
version, shape, prefix and round, importing that version's modules from its own folder (`python -c` with the folder
first on the path: this module's worker, so any revision with bench/steps.py's `build_7b` and `step_ms` can be
measured, with the shapes and trees this working tree's SHAPES and PRESETS name). Each process builds the shape's
random-weight model (bench/steps.py's SHAPES), fills `--prefix` cached
tokens and times both steps, by default in the row-invariant mode with programmatic dependent launch (`--mode`). The
table: per shape and prefix, each version's median over the rounds and its change against the first version; with
`--floor`, also each decode step against the bandwidth floor of this machine (the shape's weights over the copy
bandwidth measured after the rounds, as bench/steps.py's 7B part counts it), since the machines of the pool differ.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

from nanomedusa.cli import (ArgumentParser, check_at_least, check_output_file, check_positive, exit_with,
                            run_reporting_errors)
from nanomedusa.tree import PRESETS

from .report import print_table, save, say
from .steps import SHAPES

REPO = Path(__file__).resolve().parents[1]
EXPORTED = ("kernels", "nanomedusa", "bench")  # and weights/*.py (not the shipped heads' files)
# --mode -> (row-invariant kernels, programmatic dependent launch); the first is the default
MODES = {"exact-pdl": (True, True), "exact": (True, False), "cublas": (False, False)}

# Runs in a version's folder with that folder first on sys.path: the step measurement of bench/step_profile.py,
# using only what every measured revision has.
_WORKER = r"""
import argparse, json, sys
from pathlib import Path
import torch
import kernels
import nanomedusa.model
from bench.steps import SHAPES, build_7b, step_ms
from nanomedusa.tree import PRESETS, TreeBuffers

if not Path(nanomedusa.model.__file__).resolve().is_relative_to(Path.cwd().resolve()):
    sys.exit(f"the model code came from {nanomedusa.model.__file__}, not from this version's folder")

a = json.loads(sys.argv[1])
device = torch.device(a["device"])
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
shape = argparse.Namespace(**{**SHAPES[a["shape"]], **({"big_layers": a["layers"]} if a["layers"] else {})})
kernels.set_row_invariant(a["exact"])
kernels.set_dependent_launch(a["pdl"])
with torch.inference_mode():
    tree = TreeBuffers.from_choices(PRESETS[a["tree"]], device=device)
    model = build_7b(shape, device, dtype, a["prefix"] + tree.num_nodes + 128)
    model.forward_hidden(torch.randint(shape.big_vocab, (1, a["prefix"]), device=device), prefix_len=0)
    times = {"decode_ms": step_ms(model, a["prefix"], None, a["reps"]),
             "tree_ms": step_ms(model, a["prefix"], tree, a["reps"]),
             "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
print(json.dumps(times))
"""


def export(revision: str, out_dir: Path) -> Path:
    """Write `revision`'s code (EXPORTED and weights/*.py) into out_dir/<revision, / as ->; return that folder."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", revision, "--", *EXPORTED,
                             "weights"], capture_output=True, text=True)
    if listed.returncode != 0:
        raise SystemExit(f"error: git cannot read revision {revision!r} ({listed.stderr.strip()}); "
                         f"name a branch, tag or commit of this repository.")
    paths = [p for p in listed.stdout.splitlines() if not p.startswith("weights/") or p.endswith(".py")]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision, "--", *paths],
                             capture_output=True, check=True)
    target = out_dir / revision.replace("/", "-")
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    # Before 786701f nanomedusa/ had no __init__.py, and Python takes a regular package anywhere on the path (the
    # working tree's, when it is there) over a namespace folder first on it: an empty one keeps the version's own.
    (target / "nanomedusa" / "__init__.py").touch()
    return target


def measure(version: Path, job: dict, timeout: float, worker: str = _WORKER):
    """One process of `worker` in `version`'s folder: the JSON its last line prints ({"decode_ms", "tree_ms",
    "weight_bytes"} for this module's), or None (its error's last lines are said)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(version), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        done = subprocess.run([sys.executable, "-c", worker, json.dumps(job)], cwd=version, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"[ab] {version.name}: no result within {timeout:.0f} s")
        return None
    if done.returncode != 0:
        say(f"[ab] {version.name} failed:\n" + "\n".join(done.stderr.strip().splitlines()[-5:]))
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def version_folders(paths, needs: str) -> list[Path]:
    """The folders of the versions to measure (exported ones, or . for the working tree), each checked to hold
    `needs` (a path inside it), else an error naming the fix."""
    versions = [Path(v).resolve() for v in paths]
    for v in versions:
        if not (v / needs).is_file():
            raise SystemExit(f"error: {v} holds no version of this code (no {needs}); make one with "
                             f"`python -m bench.ab_steps export REVISION`, or pass . for the working tree.")
    return versions


TABLE_COLUMNS = ["shape", "prefix", "version", "decode ms", "tree ms", "tree / decode", "decode vs first",
                 "tree vs first"]  # and, with a bandwidth floor, "floor / decode"


def median_steps(runs) -> tuple[float, float]:
    """The median decode and tree step ms of runs [{"decode_ms", "tree_ms"}, ...]."""
    return statistics.median(r["decode_ms"] for r in runs), statistics.median(r["tree_ms"] for r in runs)


def table_row(shape, prefix, label, decode: float, tree: float, first: tuple[float, float],
              floor_ms: float | None = None) -> list:
    """A row of TABLE_COLUMNS: a version's medians, their ratio and their change against `first`, the baseline's
    (decode, tree), and, given the bandwidth floor `floor_ms`, the share of the decode step that it is. (The ratio
    to 3 decimals: #16's target for it is 1.10x.)"""
    row = [shape, prefix, label, f"{decode:.3f}", f"{tree:.3f}", f"{tree / decode:.3f}x",
           f"{decode / first[0] - 1:+.1%}", f"{tree / first[1] - 1:+.1%}"]
    return row if floor_ms is None else row + [f"{floor_ms / decode:.1%}"]


# What `run` and bench.body_chunks end with when every worker failed (they print each one's error as it ends).
NOTHING_MEASURED = ("error: no version's steps were measured (each worker's error is above); fix what they say, or "
                    "pass versions that have bench/steps.py's build_7b and step_ms.")


def check_step_flags(args) -> None:
    """The values of `run`'s and bench.body_chunks' flags before any worker starts, so that a typo is one error line,
    not a table of failed rows: a NanoMedusaError naming the fix. (Argparse refused an unknown --shape or --tree.)"""
    check_at_least(0, {"--prefix": min(args.prefix)})
    check_at_least(1, {"--layers": args.layers, "--rounds": args.rounds, "--reps": args.reps})
    check_positive({"--timeout": args.timeout})
    if args.json is not None:
        check_output_file("--json", args.json)


def run(args) -> dict:
    check_step_flags(args)
    versions = version_folders(args.versions, "bench/steps.py")
    exact, pdl = MODES[args.mode]
    times = {}  # (shape, prefix, version name) -> list of {"decode_ms", "tree_ms", "weight_bytes"}
    for round_ in range(1, args.rounds + 1):
        for shape in args.shape:
            for prefix in args.prefix:
                for v in versions:
                    job = dict(device=args.device, shape=shape, layers=args.layers, prefix=prefix, tree=args.tree,
                               reps=args.reps, exact=exact, pdl=pdl)
                    got = measure(v, job, args.timeout)
                    if got:
                        times.setdefault((shape, prefix, v.name), []).append(got)
                        say(f"[ab] round {round_}, {shape}, prefix {prefix}, {v.name}: decode "
                            f"{got['decode_ms']:.3f} ms, tree {got['tree_ms']:.3f} ms")
    bandwidth = None
    if args.floor:  # after the rounds, so that no version's steps run beside it
        import torch

        from .timer import copy_bandwidth
        bandwidth = copy_bandwidth(torch.device(args.device), 1 << 30, samples=100)
        say(f"[ab] copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    columns = TABLE_COLUMNS + (["floor / decode"] if bandwidth else [])
    rows, results = [], []
    for shape in args.shape:
        for prefix in args.prefix:
            first = None
            for v in versions:
                runs = times.get((shape, prefix, v.name))
                if not runs:
                    rows.append([shape, prefix, v.name, "failed"] + [""] * (len(columns) - 4))
                    continue
                decode, tree = median_steps(runs)
                first = first or (decode, tree)
                floor_ms = runs[0]["weight_bytes"] / bandwidth * 1e3 if bandwidth else None
                rows.append(table_row(shape, prefix, v.name, decode, tree, first, floor_ms))
                results.append(dict(shape=shape, prefix=prefix, version=v.name, decode_ms=decode, tree_ms=tree,
                                    rounds=[dict(r) for r in runs]))
    print_table(f"Graphed steps ({args.mode}, {args.tree} tree; median of {args.rounds} rounds, {args.reps} replays "
                f"each): ms, and against {versions[0].name}", columns, rows)
    out = {"mode": args.mode, "tree": args.tree, "device": args.device, "copy_bandwidth_bytes_per_s": bandwidth,
           "results": results}
    if args.json:
        save(out, args.json)
    if not results:
        raise SystemExit(NOTHING_MEASURED)
    return out


def add_step_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the tools that time bench/steps.py's graphed steps in worker processes (run, bench.body_chunks),
    their shapes and trees checked against this working tree's SHAPES and PRESETS."""
    p.add_argument("--shape", nargs="+", default=["7b"], choices=sorted(SHAPES),
                   help="bench/steps.py SHAPES names (default 7b)")
    p.add_argument("--prefix", nargs="+", type=int, default=[1024], help="cached tokens before the step")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the shape's)")
    p.add_argument("--tree", default="mc_sim_7b_63", choices=sorted(PRESETS), metavar="PRESET",
                   help="the tree step's preset tree, a name of nanomedusa/tree.py's PRESETS (default mc_sim_7b_63)")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    e = sub.add_parser("export", help="write git revisions' code into ab/<revision>/ (run where git history is)")
    e.add_argument("revisions", nargs="+", help="branches, tags or commits")
    e.add_argument("--dir", type=Path, default=REPO / "ab",
                   help="where the versions go (default: ab/ at the repository's root, whatever the current "
                        "directory), each in a folder named as its revision with any / made - (wip/x: ab/wip-x)")
    r = sub.add_parser("run", help="time exported versions' steps in alternation")
    r.add_argument("versions", nargs="+", help="exported folders (ab/<revision>); the first is the baseline")
    add_step_flags(r)
    r.add_argument("--mode", choices=list(MODES), default="exact-pdl",
                   help="exact-pdl (the default): the row-invariant kernels (--exact) with programmatic dependent "
                        "launch; exact: the same kernels with ordinary launches; cublas: cuBLAS linear layers and the "
                        "default attention (--no-exact)")
    r.add_argument("--rounds", type=int, default=2, help="times through every version (default 2)")
    r.add_argument("--reps", type=int, default=200, help="graph replays per step time (default 200)")
    r.add_argument("--device", default="cuda", help="default cuda (cpu: eager steps, for checking the tool)")
    r.add_argument("--timeout", type=float, default=300, help="seconds per process (default 300)")
    r.add_argument("--floor", action="store_true",
                   help="measure this machine's copy bandwidth after the rounds and show each decode step's share "
                        "of its bandwidth floor")
    r.add_argument("--json", default=None, help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "export":
        for revision in args.revisions:
            say(f"[ab] {revision} -> {export(revision, args.dir)}")
        return 0
    return run_reporting_errors(lambda: run(args))


if __name__ == "__main__":
    exit_with(main())

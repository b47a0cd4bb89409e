"""Where a 7B-shaped step's time goes: the kernels of one decode step and one 64-node tree step, and the step
times under each launch setting (other model shapes with --shape).

    python -m bench.step_profile                       # H200: about a minute
    python -m bench.step_profile --prefetch 0,512,2048 # also time the linear layer's L2 prefetch sizes
    python -m bench.step_profile --ablate              # also the graphed steps' cost of each kernel class
    python -m bench.step_profile --shape llama3-8b     # grouped queries (4 a KV head), a 128K vocabulary
    python -m bench.step_profile --fold-norms on       # the 7B with its RMSNorms folded into the linear layers

Two tables (three with --ablate):
  steps    the CUDA-graphed decode and tree steps (bench/steps.py's `step_ms`, median of --reps replays) with
           cuBLAS + default attention ("default") and the row-invariant kernels ("exact", with ordinary
           launches and with programmatic dependent launch, "PDL": kernels/dependent_launch.py, which only the
           row-invariant mode uses), and the copy-bandwidth floor of a step;
  kernels  one eager step under torch.profiler, per kernel: calls and GPU microseconds per step. Their sum
           against the graphed step's time is what the boundaries between kernels cost (launch, drain, ramp).
  ablate   the row-invariant steps (CUDA graphs, with PDL unless NANOMEDUSA_PDL=0) timed again with one class of
           kernels not launched (the step then computes garbage; only its time counts): what that class costs
           inside a graphed step, where kernels overlap, rather than its kernels' own eager time. Dropping a
           kernel also drops a boundary, so the rows do not add up; and without the bodies the tails, which
           would compute their tails while the bodies run, start that work earlier still, so the bodies' row
           overstates them a little.

The model has random weights in one of bench/steps.py's SHAPES (default Llama-7B's: MHA, 32 layers), prefix --prefix
cached tokens.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections import defaultdict

import torch

import kernels
from kernels import linear as linear_kernel
from nanomedusa import model as model_module
from nanomedusa.cli import ArgumentParser, check_at_least, check_output_file, exit_with, run_reporting_errors
from nanomedusa.tree import PRESETS, TreeBuffers

from .checks import int_list, require_cuda
from .report import print_table, save, say
from .steps import SHAPES, build_7b, step_inputs, step_ms
from .timer import copy_bandwidth


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", type=int, default=1024, help="cached tokens before the step (default 1024)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="the model's shape (default 7b)")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the shape's)")
    p.add_argument("--reps", type=int, default=100, help="graph replays per step time (default 100)")
    p.add_argument("--prefetch", default=None, metavar="BYTES,...",
                   help="also time the exact kernels under PDL with these L2 prefetch sizes per weight row")
    p.add_argument("--ablate", action="store_true", help="also time the steps without each class of kernels")
    p.add_argument("--top", type=int, default=14, help="kernels listed per profiled step (default 14)")
    p.add_argument("--fold-norms", choices=("auto", "on", "off"), default="auto",
                   help="the row-invariant blocks fold their RMSNorms into the linear layers: as shipped (auto: "
                        "hidden sizes up to nanomedusa/model.py's FOLD_NORMS_MAX_DIM), always, or never")
    p.add_argument("--json", default=None, help="write the numbers here")
    return p.parse_args(argv)


def _short(name: str) -> str:
    """A kernel's name without its template arguments, at most 60 characters."""
    return re.sub(r"<.*", "", name)[:60]


def profile_step(model, prefix: int, tree: TreeBuffers | None) -> list[tuple[str, int, float]]:
    """(kernel, calls, GPU µs) of one eager step, the largest first."""
    step, tokens, prefix_len = step_inputs(model, prefix, tree)
    return profile_kernels(lambda: step(tokens, prefix_len), model.device)


def profile_kernels(call, device) -> list[tuple[str, int, float]]:
    """(kernel, calls, GPU µs) of one eager call(), the largest first."""
    for _ in range(3):  # compile and warm up outside the profile
        call()
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    totals, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[_short(event.name)] += event.device_time
            calls[_short(event.name)] += 1
    return sorted(((k, calls[k], totals[k]) for k in totals), key=lambda row: -row[2])


# The kernel classes --ablate drops, each by the module attributes its launches go through. (Where the q/k/v projection
# rotates and writes the cache itself, kernels/linear.py's `fuses_rope_and_cache`, RoPE + cache is inside "linear";
# where the gate/up projection applies SwiGLU, `fuses_swiglu`, so is SwiGLU.)
KERNEL_CLASSES = {
    "attention tails": ("kernels.tree_attention", "_ri_tails_kernel"),
    "attention bodies": ("kernels.tree_attention", "_ri_bodies_kernel"),
    "RoPE + cache": ("kernels.rope_cache", "_rope_and_cache_kernel"),
    "SwiGLU": ("kernels.swiglu", "_silu_mul_kernel"),
    "RMSNorm": ("kernels.rmsnorm", "_rmsnorm_kernel"),
    "linear": ("kernels.linear", "_linear_kernel", "_linear_rope_kernel"),
}


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def ablation_rows(model, prefix: int, tree: TreeBuffers, reps: int) -> list[list]:
    """[class, decode µs saved, tree µs saved] for each of KERNEL_CLASSES dropped alone, then for every class but
    the linear layers', from graphed steps in the current kernel settings."""
    base = step_ms(model, prefix, None, reps), step_ms(model, prefix, tree, reps)
    rows = []
    dropped_sets = [[name] for name in KERNEL_CLASSES] + [[n for n in KERNEL_CLASSES if n != "linear"]]
    for dropped in dropped_sets:
        saved = []
        for name in dropped:
            module, *attrs = KERNEL_CLASSES[name]
            module = importlib.import_module(module)
            for attr in attrs:
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, _NoLaunch())
        try:
            decode, tree_ms = step_ms(model, prefix, None, reps), step_ms(model, prefix, tree, reps)
        finally:
            for module, attr, kernel in saved:
                setattr(module, attr, kernel)
        label = dropped[0] if len(dropped) == 1 else "all but linear"
        rows.append([label, f"{(base[0] - decode) * 1e3:.0f}", f"{(base[1] - tree_ms) * 1e3:.0f}"])
        say(f"[ablate] without {label}: decode {decode:.3f} ms, tree {tree_ms:.3f} ms")
    return rows


def check_args(args) -> None:
    """Every flag, before the model is built (and on a CPU before the refusal of one): a NanoMedusaError naming the
    fix."""
    check_at_least(0, {"--prefix": args.prefix, "--top": args.top})
    check_at_least(1, {"--layers": args.layers, "--reps": args.reps})
    if args.prefetch:
        int_list("--prefetch", args.prefetch, 0, example="0,512,2048")
    if args.json is not None:
        check_output_file("--json", args.json)
    require_cuda("step_profile")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: (check_args(args), run_with_fold(args)))


def run_with_fold(args) -> None:
    """`run` with the model's norm folding as --fold-norms says, put back after."""
    shipped = model_module.FOLD_NORMS_MAX_DIM
    # every forward reads the module's constant: setting it is how the benchmark varies the fold
    model_module.FOLD_NORMS_MAX_DIM = {"auto": shipped, "on": 1 << 30, "off": -1}[args.fold_norms]
    try:
        run(args)
    finally:
        model_module.FOLD_NORMS_MAX_DIM = shipped


@torch.inference_mode()
def run(args) -> None:
    """The steps and their kernels, as the module docstring says, in the model settings `main` made."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = argparse.Namespace(**{**SHAPES[args.shape], **({"big_layers": args.layers} if args.layers else {})})
    tree = TreeBuffers.from_choices(PRESETS["mc_sim_7b_63"], device=device)
    model = build_7b(shape, device, dtype, args.prefix + tree.num_nodes + 128)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.forward_hidden(torch.randint(shape.big_vocab, (1, args.prefix), device=device), prefix_len=0)
    # (exact, PDL, the linear kernel's prefetch in bytes; None: the shipped one)
    settings = [(False, False, None), (True, False, None)]
    if torch.cuda.get_device_capability(device)[0] >= 9:
        sizes = int_list("--prefetch", args.prefetch, 0) if args.prefetch else []
        settings += [(True, True, None)] + [(True, True, b) for b in sizes]
    else:
        say("[steps] no programmatic dependent launch before sm_90: its rows are left out")
    saved = kernels.row_invariant(), kernels.dependent_launch_enabled(), linear_kernel.PREFETCH_BYTES
    rows, out = [], {"shape": args.shape, "prefix": args.prefix, "layers": shape.big_layers,
                     "fold_norms": args.fold_norms, "steps": [], "profiles": {}}
    try:
        for exact, pdl, prefetch in settings:
            kernels.set_row_invariant(exact)
            kernels.set_dependent_launch(pdl)
            # every linear call reads the module's constant: setting it is how the benchmark varies it
            linear_kernel.PREFETCH_BYTES = saved[2] if prefetch is None else prefetch
            label = (f"{'exact' if exact else 'default'}, {'PDL' if pdl else 'ordinary launches'}"
                     + ("" if prefetch is None else f", prefetch {prefetch} B"))
            decode = step_ms(model, args.prefix, None, args.reps)
            tree_ms = step_ms(model, args.prefix, tree, args.reps)
            say(f"[steps] {label}: decode {decode:.3f} ms, tree {tree_ms:.3f} ms")
            rows.append([label, f"{decode:.3f}", f"{tree_ms:.3f}", f"{tree_ms / decode:.2f}x"])
            out["steps"].append({"setting": label, "decode_ms": decode, "tree_ms": tree_ms})
        ablation = None
        if args.ablate:
            kernels.set_row_invariant(True)
            kernels.set_dependent_launch(saved[1])
            linear_kernel.PREFETCH_BYTES = saved[2]
            ablation = ablation_rows(model, args.prefix, tree, args.reps)
            out["ablation_us_saved"] = ablation
        for mode, exact in (("default", False), ("exact", True)):
            kernels.set_row_invariant(exact)
            kernels.set_dependent_launch(False)  # (eager kernels, each timed on its own)
            linear_kernel.PREFETCH_BYTES = saved[2]
            for step_label, step_tree in (("decode", None), (f"tree T={tree.num_nodes}", tree)):
                table = profile_step(model, args.prefix, step_tree)
                out["profiles"][f"{mode} {step_label}"] = table
                total = sum(us for _, _, us in table)
                print_table(f"Kernels of one eager {step_label} step, {mode} kernels: {total:.0f} µs of kernel time",
                            ["kernel", "calls", "µs per step", "share"],
                            [[name, n, f"{us:.1f}", f"{us / total:.1%}"] for name, n, us in table[:args.top]])
    finally:
        kernels.set_row_invariant(saved[0])
        kernels.set_dependent_launch(saved[1])
        linear_kernel.PREFETCH_BYTES = saved[2]
    del model
    bandwidth = copy_bandwidth(device, 1 << 30, samples=20)
    floor = weight_bytes / bandwidth * 1e3
    out["floor_ms"] = floor
    print_table(f"{args.shape}-shaped steps ({shape.big_layers} layers, prefix {args.prefix}, 64-node tree mc_sim_7b_63): ms, "
                f"CUDA graphs; floor (weights / copy bandwidth) {floor:.3f} ms",
                ["setting", "decode ms", "tree ms", "tree / decode"], rows)
    if ablation:
        print_table("What each kernel class costs a graphed row-invariant step"
                    f"{'' if kernels.dependent_launch_enabled() else ' (PDL off)'}: µs saved without its launches",
                    ["kernels dropped", "decode µs", "tree µs"], ablation)
    if args.json:
        save(out, args.json)


if __name__ == "__main__":
    exit_with(main())

"""What a tree's proposal costs on a GPU: static trees against dynamic trees over supersets of several sizes, and
the kernels behind each (for #15's "the extra time of building the tree <= 3% of a step").

    python -m bench.proposal_cost --heads weights/smollm2-135m-instruct-medusa-path --budgets 16,32,64,128 \\
        --supersets 64,128,256 [--shape smollm2-135m] [--reps 200] [--json FILE]

The base model has random weights in one of bench/steps.py's shapes (the heads' own weights are loaded: a proposal
costs the same whatever the values). Per budget N (nodes verified a step, the root included):

  static      the static tree's proposal (the heads' accuracy tree of N nodes), replayed as a CUDA graph: ms;
  dynamic S   the dynamic tree's proposal over a superset of S nodes (`DynamicTree.for_heads(..., superset_nodes=S)`,
              which takes max(S, N)) and the next step's layout of it, minus the static proposal: the choice's
              extra ms a step, as `python -m bench.dynamic_trees` reports it;
  verify      the N-node tree's verification forward after --prefix cached tokens (bench/steps.py's step_ms), the
              bulk of a step, for scale: a real step adds the acceptance and the KV compaction.

Then one eager call of each proposal of the smallest budget, per kernel under torch.profiler: where the time goes.
Heads that read their path (path_tree.py) run on every superset node with children, so their proposal grows with
S; Medusa's heads run on one row whatever S.
"""

from __future__ import annotations

import argparse

import torch

from nanomedusa.cli import ArgumentParser, check_at_least, check_input_dir, exit_with, run_reporting_errors
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.heads import load_heads_and_adapter
from nanomedusa.tree import TreeBuffers, tree_from_head_accuracies

from .checks import int_list
from .dynamic_trees import add_replay_flags, check_replay_args, proposal_steps, replay_device, replay_ms
from .report import device_name, print_table, save
from .step_profile import profile_kernels
from .steps import SHAPES, build_7b, step_ms


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", required=True, help="Medusa heads directory (a LoRA adapter in it is applied)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="the base model's shape")
    p.add_argument("--supersets", default="64,128,256", help="superset sizes of the dynamic trees")
    p.add_argument("--prefix", type=int, default=256, help="cached tokens before a verification forward")
    add_replay_flags(p, "kernels listed per profiled proposal")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args))


@torch.inference_mode()
def run(args) -> None:
    budgets = sorted(set(check_replay_args(args)))
    supersets = sorted(set(int_list("--supersets", args.supersets, 2, what="node counts", example="64,128,256")))
    check_at_least(0, {"--prefix": args.prefix})
    check_input_dir("--heads", args.heads)
    device, dtype = replay_device(args, "proposal_cost"), torch.bfloat16
    model = build_7b(argparse.Namespace(**SHAPES[args.shape]), device, dtype, args.prefix + max(budgets) + 16)
    heads = load_heads_and_adapter(args.heads, model)
    acc = heads.config.rank_accuracies()
    rows, out = [], {"device": device_name(device), "heads": args.heads, "shape": args.shape, "prefix": args.prefix,
                     "rows": [], "profiles": {}}
    for n in budgets:
        static = TreeBuffers.from_choices(tree_from_head_accuracies(acc, n - 1), device=device)
        verify_ms = step_ms(model, args.prefix, static, args.reps)
        dynamics = {size: DynamicTree.for_heads(heads.config, n, superset_nodes=size, device=device)
                    for size in supersets}
        # (the static step is the same whatever the dynamic tree beside it: timed and profiled once per N)
        static_step, _, inputs = proposal_steps(model, heads, static, dynamics[supersets[0]])
        row = {"nodes": n, "verify_ms": verify_ms, "static_ms": replay_ms(static_step, *inputs, device=device,
                                                                          reps=args.reps), "dynamic": {}}
        profiled = {f"static N={n}": static_step}
        for size, dynamic in dynamics.items():
            dynamic_step = proposal_steps(model, heads, static, dynamic)[1]
            row["dynamic"][size] = {"superset_nodes": dynamic.superset.num_nodes,
                                    "extra_ms": replay_ms(dynamic_step, *inputs, device=device, reps=args.reps)
                                    - row["static_ms"]}
            profiled[f"dynamic N={n} S={size}"] = dynamic_step
        if n == budgets[0]:
            for label, step in profiled.items():
                out["profiles"][label] = profile_kernels(lambda step=step: step(*inputs), device)
        out["rows"].append(row)
        rows.append([n, f"{verify_ms:.3f}", f"{row['static_ms']:.3f}"]
                    + [f"{d['extra_ms']:.3f} ({d['extra_ms'] / verify_ms:.1%})" for d in row["dynamic"].values()])
    print_table(f"{args.heads} on a random {args.shape}-shaped model ({device_name(device)}, {dtype}): ms; a dynamic "
                f"tree's extra ms over the static proposal (and as a share of the verification forward)",
                ["nodes", "verify", "static proposal", *(f"dynamic, superset {s}: extra" for s in supersets)], rows)
    for label, table in out["profiles"].items():
        total = sum(us for _, _, us in table)
        print_table(f"Kernels of one eager proposal, {label}: {total:.0f} µs of kernel time",
                    ["kernel", "calls", "µs", "share"],
                    [[name, calls, f"{us:.1f}", f"{us / total:.1%}"] for name, calls, us in table[:args.top]])
    if args.json:
        save(out, args.json)


if __name__ == "__main__":
    exit_with(main())

"""What lossless sampling's acceptance costs a step on a GPU, against typical acceptance, per tree size, and what
plain sampling's draw costs against greedy's argmax.

    python -m bench.sampling_cost [--heads DIR] [--budgets 16,32,64,128] [--vocab 49152] [--reps 200] [--json FILE]
                                  [--blocks 2048,4096,8192,16384]

Per node budget N (the heads' accuracy tree of N nodes, the root included), on random logits [N, vocab] in bf16,
each replayed as a CUDA graph (median of --reps), `medusa_generation.accept`:

  sample    lossless sampling (temperature 0.7, top-p 0.9): a token drawn from every node's logits
            (kernels/sample_token.py), then the path of guesses that are their parent's draws (kernels/acceptance.py);
  typical   typical acceptance, for scale.

Then plain sampling's draw from one row (`sampling.next_token`) against the argmax, and one eager sample
acceptance of the largest budget, per kernel under torch.profiler. With --blocks, the draw's kernel
(kernels/sample_token.py) at each block size (tokens a program reads at a time, with its `warps`) on 1, 32 and 128
rows, top-p 0.9 with and without top-k 50: how its BLOCK was chosen. No model and no prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kernels import sample_token
from nanomedusa.cli import ArgumentParser, check_at_least, check_input_dir, exit_with, run_reporting_errors
from nanomedusa.errors import NanoMedusaError
from nanomedusa.medusa_generation import Acceptance, accept
from nanomedusa.sampling import Sampling, next_token
from nanomedusa.tree import TreeBuffers, tree_from_head_accuracies

from .checks import heads_config_json, int_list
from .dynamic_trees import add_replay_flags, check_replay_args, replay_device, replay_ms
from .report import device_name, print_table, save
from .step_profile import profile_kernels


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="weights/smollm2-135m-instruct-medusa-path",
                   help="heads directory whose rank accuracies shape the trees (only its config.json is read)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default: the default model's)")
    p.add_argument("--blocks", default="", help="also time the draw's kernel at these block sizes (comma-separated)")
    add_replay_flags(p, "kernels listed in the profile")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args))


def rank_accuracy(heads_dir: str) -> list[list[float]]:
    """[K][topk] the heads' measured rank accuracies, from their config.json (where tree_tuning --write stores them),
    or an error naming the fix."""
    check_input_dir("--heads", heads_dir)
    config = heads_config_json(heads_dir)
    if config is None:
        raise NanoMedusaError(f"--heads {heads_dir} has no readable config.json; pass a Medusa heads directory.")
    if not config.get("rank_accuracy"):
        raise NanoMedusaError(f"{Path(heads_dir) / 'config.json'} has no rank_accuracy; measure it with python -m "
                              f"nanomedusa.tree_tuning --heads {heads_dir} --data ANSWERS.jsonl --write, or pass other "
                              f"--heads.")
    return config["rank_accuracy"]


@torch.inference_mode()
def run(args) -> None:
    budgets = sorted(set(check_replay_args(args)))
    check_at_least(1, {"--vocab": args.vocab})
    blocks = int_list("--blocks", args.blocks, 1, example="2048,4096") if args.blocks else []
    acc = rank_accuracy(args.heads)  # [K][topk]
    device = replay_device(args, "sampling_cost")
    sampling = Sampling(temperature=0.7, top_p=0.9)
    rules = {"sample": Acceptance(mode="sample", sampling=sampling), "typical": Acceptance(mode="typical",
                                                                                          sampling=sampling)}
    rng = torch.Generator(device=device)
    out = {"device": device_name(device), "heads": args.heads, "vocab": args.vocab, "rows": [], "profile": []}
    rows = []
    for n in budgets:
        tree = TreeBuffers.from_choices(tree_from_head_accuracies(acc, n - 1), device=device)
        logits = torch.randn(n, args.vocab, device=device).mul(3).to(torch.bfloat16)  # [N, V]
        tokens = torch.randint(args.vocab, (n,), device=device)  # [N]
        steps = {name: (lambda z, t, tree=tree, rule=rule: accept(z, t, tree, rule, rng))
                 for name, rule in rules.items()}
        times = {name: replay_ms(step, logits, tokens, device=device, reps=args.reps, generator=rng)
                 for name, step in steps.items()}
        out["rows"].append({"nodes": n, **{f"{name}_ms": v for name, v in times.items()}})
        rows.append([n, *(f"{v:.3f}" for v in times.values())])
    plain = {"next token": replay_ms(lambda z: next_token(z, sampling, rng), logits[0], device=device, reps=args.reps,
                                     generator=rng),
             "argmax": replay_ms(lambda z: z.argmax(-1), logits[0], device=device, reps=args.reps)}
    out["plain_draw_ms"] = {k.replace(" ", "_"): v for k, v in plain.items()}
    out["profile"] = profile_kernels(lambda: steps["sample"](logits, tokens), device)  # the largest budget's
    print_table(f"Acceptance's ms a step ({device_name(device)}, random bf16 logits over {args.vocab:,} tokens, "
                f"temperature 0.7, top-p 0.9)", ["nodes", *rules], rows)
    print_table(f"Plain sampling's draw from one row, ms ({device_name(device)})", list(plain),
                [[f"{v:.3f}" for v in plain.values()]])
    total = sum(us for _, _, us in out["profile"])
    print_table(f"Kernels of one eager sample acceptance, {rows[-1][0]} nodes: {total:.0f} µs of kernel time",
                ["kernel", "calls", "µs", "share"],
                [[name, calls, f"{us:.1f}", f"{us / total:.1%}"] for name, calls, us in out["profile"][:args.top]])
    if blocks:
        out["blocks"] = block_sweep(blocks, args.vocab, device, args.reps, rng)
    if args.json:
        save(out, args.json)


def block_sweep(blocks: list[int], vocab: int, device, reps: int, rng) -> list[dict]:
    """The draw's kernel per block size, rows and top-k cut: ms (temperature 0.7, top-p 0.9, random bf16 logits)."""
    rows, table = [], []
    for top_k in (0, 50):
        for n in (1, 32, 128):
            logits = torch.randn(n, vocab, device=device).mul(3).to(torch.bfloat16)  # [R, V]
            u = torch.rand(n, sample_token.PROPOSALS + 1, device=device, generator=rng)
            times = [replay_ms(lambda z, b=b: sample_token.sample_token_triton(z, 0.7, top_k, 0.9, u, block=b), logits,
                               device=device, reps=reps) for b in blocks]
            rows.append({"top_k": top_k, "rows": n, "ms": dict(zip(blocks, times))})
            table.append([top_k, n, *(f"{t:.3f}" for t in times)])
    print_table(f"The draw's kernel by block size, ms ({device_name(device)}, top-p 0.9)",
                ["top-k", "rows", *(f"{b:,} ({sample_token.warps(b)} warps)" for b in blocks)], table)
    return rows


if __name__ == "__main__":
    exit_with(main())

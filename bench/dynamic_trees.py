"""Static against dynamic trees at equal node budgets: accepted length, step time, tokens/s.

    python -m bench.dynamic_trees --heads weights/smollm2-135m-instruct-medusa \\
        --prompts bench/prompts-chat-heldout.jsonl --budgets 16,32,64,128 [--model M] [--json FILE]

For each budget N (nodes verified per step, the root included), Medusa decoding of every prompt (greedy, or
`--accept typical` at `--temperature`, or `--accept sample` at `--temperature` and `--top-p`, each prompt's draws
seeded alike for both trees) with two trees: the static tree of N nodes built from the heads' measured rank
accuracies (`tree_from_head_accuracies`, as `python -m nanomedusa.tree_tuning` builds the heads' own tree), and the
dynamic tree of N nodes (nanomedusa/dynamic_tree.py), chosen each step from the heads' calibrated
confidence. Per row: mean accepted length (tokens per step), step time (the decoding steps alone:
(seconds - prefill seconds) / steps, summed over prompts), decode tokens/s, and, greedy, how many prompts gave
the static tree's tokens (greedy decoding with either tree is plain greedy decoding, so all should; typical
acceptance and sampling keep what each tree's guesses let them, so their texts differ). The
dynamic tree's extra work per step (scoring and choosing its nodes, laying them out) is also timed on its
own: its proposal and layout, replayed as one CUDA graph on a GPU, minus a static tree's proposal. And
"proposal kernels" counts the kernels a tree's proposal launches (the dynamic tree's layout included), as
`kernels.testing.counting_launches` counts them on one eager call: each is a node of the step's CUDA graph.
Each tree first decodes the first prompt untimed (CUDA graph capture, kernel compilation). The prompts,
the timer (bench/timer.py) and the JSON file are the other benchmarks'.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from kernels.testing import counting_launches
from nanomedusa.cli import (ArgumentParser, add_chat_format_flag, add_kernel_flags, check_at_least, check_input_dir,
                            check_input_file, check_kernels, check_output_file, check_sampling, check_seed, exit_with,
                            run_reporting_errors, use_kernels)
from nanomedusa.cuda_graphs import GraphedStep
from nanomedusa.decoder import Decoder
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.heads import load_heads_and_adapter
from nanomedusa.loading import load_model, resolve_device
from nanomedusa.medusa_generation import ACCEPT_MODES, generate_medusa, propose
from nanomedusa.sampling import Sampling
from nanomedusa.tokenizer import load_tokenizer
from nanomedusa.tree import TreeBuffers, tree_from_head_accuracies

from .checks import int_list, require_cuda
from .prompts import chat_prompts
from .report import DEFAULT_OUT, device_name, save
from .timer import time_ms


def decode_all(decoder, heads, tree, prompts, max_new_tokens, eos_ids, accept: str, sampling: Sampling,
               seed: int) -> tuple[dict, list[list[int]]]:
    """Medusa over every prompt after one untimed warm-up -> (summary row, each prompt's tokens). Prompt i draws
    from a generator seeded seed + i, whatever the tree."""
    def run(i, ids):
        return generate_medusa(decoder, heads, tree, ids, max_new_tokens, sampling, accept, eos_ids=eos_ids,
                               generator=torch.Generator().manual_seed(seed + i))

    run(0, prompts[0])
    results = [run(i, ids) for i, ids in enumerate(prompts)]
    steps = sum(r.steps for r in results)
    gained = sum(len(r.tokens) - 1 for r in results)  # the tokens after each prompt's first (the prefill's)
    decode_seconds = sum(r.seconds - r.prefill_seconds for r in results)
    row = {"mean_accepted": gained / max(steps, 1), "step_ms": 1e3 * decode_seconds / max(steps, 1),
           "tokens_per_s": gained / max(decode_seconds, 1e-9)}
    return row, [r.tokens for r in results]


def add_replay_flags(p, top_help: str) -> None:
    """The flags of the benchmarks that replay graphed parts of a step and profile their kernels (bench.proposal_cost,
    bench.sampling_cost)."""
    p.add_argument("--budgets", default="16,32,64,128", help="node budgets, the root included (at least 2)")
    p.add_argument("--reps", type=int, default=200, help="graph replays a timing (their median)")
    p.add_argument("--top", type=int, default=12, help=top_help)
    p.add_argument("--json", default=None, help="write the numbers here")
    add_kernel_flags(p)


def check_replay_args(args) -> list[int]:
    """Those benchmarks' shared flags, before anything runs (on a CPU too, before `replay_device` refuses it): the
    budgets, as ints in the order given."""
    check_at_least(1, {"--reps": args.reps})
    check_at_least(0, {"--top": args.top})
    if args.json is not None:
        check_output_file("--json", args.json)
    return int_list("--budgets", args.budgets, 2, what="node counts")


def replay_device(args, tool: str) -> torch.device:
    """The GPU those benchmarks replay on, with the kernels their flags chose; on a CPU, an error naming the fix."""
    require_cuda(tool)
    device = torch.device("cuda")
    check_kernels(args.kernels, device, args.exact)
    use_kernels(args.kernels, args.exact, device)
    return device


def replay_ms(fn, *inputs, device, reps: int, generator: torch.Generator | None = None) -> float:
    """Median time of fn(*inputs), replayed as a CUDA graph on a GPU (called eagerly elsewhere); `generator`, what
    fn draws random numbers from."""
    step = GraphedStep(fn, *inputs, generator=generator)
    return statistics.median(time_ms(lambda: step(*inputs), device, samples=reps))


def proposal_steps(model, heads, static: TreeBuffers, dynamic: DynamicTree):
    """(static step, dynamic step, their inputs): a static tree's proposal; a dynamic tree's proposal (the heads'
    probabilities, scores, choice) and the next step's layout of it."""
    inputs = (torch.randn(1, model.config.dim, device=model.device, dtype=model.dtype),  # hidden
              torch.zeros((), dtype=torch.long, device=model.device))  # root
    weight, embed = model.lm_head.weight, model.tok_embeddings

    def static_step(hidden, root):
        return propose(heads, static, weight, root, hidden, embed)

    def dynamic_step(hidden, root):
        tokens, nodes = propose(heads, dynamic, weight, root, hidden, embed)
        return tokens, dynamic.layout(nodes)

    return static_step, dynamic_step, inputs


@torch.inference_mode()
def choice_ms(model, heads, static: TreeBuffers, dynamic: DynamicTree, reps: int) -> float:
    """The dynamic tree's extra time per step: its proposal and the next step's layout, minus the static
    tree's proposal."""
    static_step, dynamic_step, inputs = proposal_steps(model, heads, static, dynamic)
    return (replay_ms(dynamic_step, *inputs, device=model.device, reps=reps)
            - replay_ms(static_step, *inputs, device=model.device, reps=reps))


@torch.inference_mode()
def proposal_kernels(model, heads, static: TreeBuffers, dynamic: DynamicTree) -> tuple[int, int]:
    """Kernels launched by the static tree's proposal and by the dynamic tree's proposal and layout, counted
    on one eager call each after a warm-up one (`counting_launches`: aten ops that compute, Triton launches)."""
    static_step, dynamic_step, inputs = proposal_steps(model, heads, static, dynamic)
    counts = []
    for step in (static_step, dynamic_step):
        step(*inputs)  # a first call makes what later calls reuse (the heads' stacked weights, temperatures)
        with counting_launches() as launched:
            step(*inputs)
        counts.append(sum(launched.values()))
    return counts[0], counts[1]


def print_table(rows: list[dict]) -> None:
    print("| nodes | tree | mean accepted | step ms | decode tokens/s | same tokens as static | choice ms "
          "| proposal kernels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        same, choice = ("", "") if r["tree"] == "static" else (r["same_as_static"], f"{r['choice_ms']:.3f}")
        same = "-" if same is None else same
        print(f"| {r['nodes']} | {r['tree']} | {r['mean_accepted']:.2f} | {r['step_ms']:.3f} | "
              f"{r['tokens_per_s']:.1f} | {same} | {choice} | {r['proposal_kernels']} |")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", required=True, help="Medusa heads directory (a LoRA adapter in it is applied)")
    p.add_argument("--model", default=None, help="base model (default: the built-in default)")
    p.add_argument("--prompts", default="bench/prompts-chat-heldout.jsonl", help="JSON lines with an \"id\" and a \"prompt\" each")
    p.add_argument("--budgets", default="16,32,64,128", help="node budgets, the root included (at least 2)")
    p.add_argument("--num-prompts", type=int, default=None, help="the first N prompts of --prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--accept", default="greedy", choices=ACCEPT_MODES, help="how candidates are accepted")
    p.add_argument("--temperature", type=float, default=0.7, help="typical and sample: the temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="sample: the nucleus cut (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sample: prompt i's draws are seeded with seed + i")
    p.add_argument("--choice-reps", type=int, default=200, help="replays timing the dynamic tree's choice")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default=str(DEFAULT_OUT / "dynamic-trees.json"),
                   help="where the rows are written (default work/bench/dynamic-trees.json, git-ignored)")
    add_kernel_flags(p)
    add_chat_format_flag(p)  # the prompts' format: the one the heads were trained on
    args = p.parse_args(argv)
    if args.accept != "greedy" and args.temperature <= 0:
        p.error(f"--accept {args.accept} needs --temperature > 0")
    return run_reporting_errors(lambda: run(args))  # a bad flag: one `error:` line, before the model loads


def check_args(args) -> None:
    """Every flag and path, before the model loads (a NanoMedusaError naming the fix)."""
    check_input_dir("--heads", args.heads)
    check_input_file("--prompts", args.prompts)
    int_list("--budgets", args.budgets, 2, what="node counts")
    check_at_least(1, {"--num-prompts": args.num_prompts, "--max-new-tokens": args.max_new_tokens,
                       "--choice-reps": args.choice_reps})
    check_sampling(args.temperature, args.top_p)
    check_seed(args.seed)
    check_output_file("--json", args.json)


def run(args) -> None:
    check_args(args)
    sampling = {"greedy": Sampling(), "typical": Sampling(args.temperature),  # (typical: the temperature alone)
                "sample": Sampling(args.temperature, top_p=args.top_p)}[args.accept]
    device = resolve_device(args.device)
    check_kernels(args.kernels, device, args.exact)
    use_kernels(args.kernels, args.exact, device)  # --exact: on by default on Hopper, as in generate.py
    model, checkpoint = load_model(args.model, device=args.device, dtype=args.dtype)
    heads = load_heads_and_adapter(args.heads, model)
    tokenizer = load_tokenizer(checkpoint, args.chat_format)
    prompts = [p.ids for p in chat_prompts(tokenizer, Path(args.prompts), args.num_prompts)]
    decoder = Decoder(model)
    rows = []
    for nodes in sorted(set(int_list("--budgets", args.budgets, 2))):
        static = TreeBuffers.from_choices(tree_from_head_accuracies(heads.config.rank_accuracies(), nodes - 1),
                                          device=model.device)
        dynamic = DynamicTree.for_heads(heads.config, nodes, device=model.device)
        (static_row, static_tokens), (dynamic_row, dynamic_tokens) = (
            decode_all(decoder, heads, tree, prompts, args.max_new_tokens, tokenizer.eos_ids, args.accept, sampling,
                       args.seed)
            for tree in (static, dynamic))
        same = sum(a == b for a, b in zip(static_tokens, dynamic_tokens)) if args.accept == "greedy" else None
        static_kernels, dynamic_kernels = proposal_kernels(model, heads, static, dynamic)
        rows.append({"nodes": nodes, "tree": "static", **static_row, "proposal_kernels": static_kernels})
        rows.append({"nodes": nodes, "tree": "dynamic", **dynamic_row, "same_as_static": same,
                     "choice_ms": choice_ms(model, heads, static, dynamic, args.choice_reps),
                     "proposal_kernels": dynamic_kernels})
        print_table(rows[-2:])
    device = device_name(model.device)
    how = args.accept if args.accept == "greedy" else f"{args.accept} at temperature {args.temperature}" + (
        f", top-p {args.top_p}" if args.accept == "sample" else "")
    print(f"\n{device}, {model.dtype}, {how}, {len(prompts)} prompts of {args.prompts}, {args.max_new_tokens} new "
          f"tokens, heads {args.heads}:")
    print_table(rows)
    out = {"device": device, "dtype": str(model.dtype), "heads": args.heads, "model": args.model, "accept": args.accept,
           "sampling": None if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p},
           "prompts": args.prompts, "num_prompts": len(prompts), "chat_format": tokenizer.chat.preset,
           "max_new_tokens": args.max_new_tokens, "rows": rows}
    save(out, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    exit_with(main())

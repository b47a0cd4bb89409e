"""Step times, the two parts of the decoding benchmark (bench/decode.py) that time one decoding step:

  sizes  (--tree-sizes) the mean Medusa step time of the first --heads on its real backbone against the
         tree's node count, each size's tree built from the heads' measured rank accuracies, written to
         --step-times for `python -m nanomedusa.tree_tuning --step-times`, which sizes trees to the hardware;
  7b     a randomly initialised Llama-7B-shaped model: the 1-token decode step and the tree-verification
         steps (CUDA graphs, bench/timer.py), the memory-bandwidth floor of a step, and the Medusa speedup
         projected from the acceptance the medusa part measured.

The 7B projection times only the verification forward (the heads, acceptance and KV compaction add a
little) and borrows the acceptance of heads trained for the small model.
"""

from __future__ import annotations

import statistics

import torch

import kernels

from nanomedusa.cli import check_at_least
from nanomedusa.config import ModelConfig
from nanomedusa.cuda_graphs import GraphedStep
from nanomedusa.decoder import Decoder
from nanomedusa.errors import NanoMedusaError
from nanomedusa.generation import GenerationResult, generate
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.model import Transformer
from nanomedusa.tree import PRESETS, TreeBuffers, tree_from_head_accuracies

from .checkpoints import first_heads, free_memory, tree_key
from .prompts import chat_prompts, measure
from .report import device_name, print_table, save, say
from .timer import copy_bandwidth, time_ms

# Tree steps timed on the 7B shape besides the trees of the medusa part: the reference's default
# 63-path tree (T = 64 nodes) and its first 15 paths (T = 16), a small tree.
STEP_TREES = {"mc_sim_7b_63": PRESETS["mc_sim_7b_63"], "mc_sim_7b_63[:15]": PRESETS["mc_sim_7b_63"][:15]}


# ---------------------------------------------------------------------------------------------------
# Step time against tree size (for sizing trees to the hardware)


@torch.inference_mode()
def bench_tree_sizes(args, device, dtype) -> dict:
    """Mean decoding-step time of plain decoding and of Medusa with trees of each --tree-sizes node
    count (the whole step: forward, acceptance, compaction, next guesses), over the first --num-prompts (default 4)
    prompts of each --prompts file."""
    spec, model, heads, tokenizer = first_heads(args, device, dtype, "--tree-sizes times the steps of Medusa heads")
    prompts = chat_prompts(tokenizer, args.prompts, args.num_prompts or 4)
    acc = heads.config.rank_accuracies()

    def decode_step_ms(summary: dict) -> float:  # the decoding steps alone, prefill excluded
        decode_seconds = summary["seconds"] - sum(r["prefill_seconds"] or 0.0 for r in summary["per_prompt"])
        return 1e3 * decode_seconds / max(summary["steps"], 1)

    decoder = Decoder(model)  # one for every tree: each tree's first prompt captures its graph (measure warms up)
    plain, _ = measure("sizes plain", lambda ids: generate(decoder, ids, args.max_new_tokens, eos_ids=tokenizer.eos_ids),
                       prompts, prompts)
    sizes = []
    for nodes in sorted({int(t) for t in args.tree_sizes.split(",")}):
        paths = tree_from_head_accuracies(acc, nodes - 1)
        tree = TreeBuffers.from_choices(paths, device=device)

        def run(ids: list[int]) -> GenerationResult:
            return generate_medusa(decoder, heads, tree, ids, args.max_new_tokens, eos_ids=tokenizer.eos_ids)

        summary, _ = measure(f"sizes T={nodes}", run, prompts, prompts)
        sizes.append({"nodes": nodes, "step_ms": decode_step_ms(summary), "mean_accepted": summary["mean_accepted"],
                      "paths": paths})
    out = {"device": device_name(device), "heads": str(spec.heads_dir), "plain_step_ms": decode_step_ms(plain),
           "trees": sizes}
    save(out, args.step_times)
    del model
    free_memory(device)
    return out


def print_sizes_table(sizes: dict) -> None:
    plain = sizes["plain_step_ms"]
    print_table(f"Step time against tree size ({sizes['device']}; plain step {plain:.3f} ms)",
                ["nodes", "step ms", "vs plain step", "mean accepted", "accepted per ms"],
                [[t["nodes"], f"{t['step_ms']:.3f}", f"{t['step_ms'] / plain:.2f}x", t["mean_accepted"],
                  f"{t['mean_accepted'] / t['step_ms']:.2f}"] for t in sizes["trees"]])


# ---------------------------------------------------------------------------------------------------
# 7B-shaped step times


# Model shapes, as build_7b's arguments (bench/decode.py's --7b-* flags): Llama-2 7B (the default); Llama-3 8B
# (grouped queries, 4 a KV head; a 128K vocabulary); SmolLM2-135M (the default model: a group of 3, head_dim 64).
SHAPES = {
    "7b": dict(big_vocab=32000, big_dim=4096, big_layers=32, big_heads=32, big_kv_heads=32, big_ffn=11008),
    "llama3-8b": dict(big_vocab=128256, big_dim=4096, big_layers=32, big_heads=32, big_kv_heads=8, big_ffn=14336),
    "smollm2-135m": dict(big_vocab=49152, big_dim=576, big_layers=30, big_heads=9, big_kv_heads=3, big_ffn=1536),
}


def check_7b_shape(args) -> None:
    """bench/decode.py's --7b-* flags, before anything runs: sizes of at least 1, a prefix of at least 0, and heads
    that split the width into even head dims and evenly over the KV heads (else ModelConfig would blame a
    config.json, after the end-to-end parts ran)."""
    check_at_least(1, {"--7b-vocab": args.big_vocab, "--7b-dim": args.big_dim, "--7b-layers": args.big_layers,
                       "--7b-heads": args.big_heads, "--7b-kv-heads": args.big_kv_heads, "--7b-ffn": args.big_ffn})
    check_at_least(0, {"--7b-prefix": args.big_prefix})
    dim, heads, kv_heads = args.big_dim, args.big_heads, args.big_kv_heads
    if dim % heads or (dim // heads) % 2:
        raise NanoMedusaError(f"--7b-heads {heads} does not split --7b-dim {dim} into heads of an even width (RoPE "
                              f"rotates pairs); pass a --7b-heads that does (Llama-2 7B: 32 heads of 128).")
    if heads % kv_heads:
        raise NanoMedusaError(f"--7b-heads {heads} is not a multiple of --7b-kv-heads {kv_heads}; pass --7b-kv-heads "
                              f"{heads} or a divisor of it.")


def build_7b(args, device, dtype, cache_len: int) -> Transformer:
    """A Llama-7B-shaped model with random weights, made directly on `device` in `dtype`."""
    config = ModelConfig(vocab_size=args.big_vocab, dim=args.big_dim, n_layers=args.big_layers,
                         n_heads=args.big_heads, n_kv_heads=args.big_kv_heads, intermediate_size=args.big_ffn,
                         max_position_embeddings=max(4096, cache_len))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # matrices get small random values; the norms keep their ones
                p.normal_(0.0, 0.02)
    model.eval()
    model.setup_cache(cache_len)
    return model


def step_inputs(model: Transformer, prefix: int, tree: TreeBuffers | None):
    """A forward of T new tokens (1 for decode, else the tree's nodes) after `prefix` cached ones, lm_head
    included, as decoding runs it: (step, tokens [1, T] random, prefix_len 0-d on the device), step(tokens,
    prefix_len) -> logits [1, T, V]. A decode step takes no positions (the model makes them), as in decoding."""
    mask = tree.attn_mask if tree else None  # [T, T], or causal

    def step(tokens, prefix_len):
        return model(tokens, prefix_len=prefix_len, positions=prefix_len + tree.depths if tree else None,
                     tree_mask=mask)

    tokens = torch.randint(model.config.vocab_size, (1, tree.num_nodes if tree else 1), device=model.device)
    return step, tokens, torch.tensor(prefix, device=model.device)


def step_ms(model: Transformer, prefix: int, tree: TreeBuffers | None, reps: int) -> float:
    """`step_inputs`' step, CUDA-graphed: the median milliseconds of `reps` replays."""
    step, tokens, prefix_len = step_inputs(model, prefix, tree)
    graphed = GraphedStep(step, tokens, prefix_len)
    return statistics.median(time_ms(lambda: graphed(tokens, prefix_len), model.device, samples=reps))


def step_trees(medusa: list[dict]) -> list[tuple[str, list[list[int]]]]:
    """The trees to time on the 7B shape: STEP_TREES and every tree of the medusa part, once each."""
    trees = {tree_key(paths): (label, paths) for label, paths in STEP_TREES.items()}
    for entry in medusa:
        label = f"{entry['heads']}/own" if entry["tree"] == "own" else entry["tree"]
        trees.setdefault(tree_key(entry["tree_paths"]), (label, entry["tree_paths"]))
    return list(trees.values())


@torch.inference_mode()
def bench_7b(args, device, dtype, medusa: list[dict]) -> dict:
    """Step times of a random 7B-shaped model, its bandwidth floor and the projected Medusa speedup.

    Every step is timed twice where the Triton kernels run: with cuBLAS linear layers and the default
    attention, and with the row-invariant kernels (`--exact`). "ms" is the run's own setting."""
    trees = [(label, TreeBuffers.from_choices(paths, device=device)) for label, paths in step_trees(medusa)]
    prefix = args.big_prefix
    cache_len = max(2048, prefix + max(t.num_nodes for _, t in trees)) + 128
    say(f"[7b] building a random {args.big_layers}-layer, {args.big_dim}-wide model on {device} in {dtype}")
    model = build_7b(args, device, dtype, cache_len)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    say(f"[7b] {weight_bytes / 1e9:.2f} GB of weights; prefill of {prefix} tokens, cache of {cache_len}")
    model.forward_hidden(torch.randint(args.big_vocab, (1, prefix), device=device), prefix_len=0)
    chosen = kernels.row_invariant()
    both = kernels.use_triton(model.tok_embeddings.weight)  # --exact changes the Triton kernels only
    modes = {"default": False, "exact": True} if both else {"exact" if chosen else "default": chosen}
    steps = [("decode", None)] + [(f"tree {label}", tree) for label, tree in trees]
    times = {}  # (step label, mode) -> ms
    try:
        for mode, flag in modes.items():
            kernels.set_row_invariant(flag)
            for label, tree in steps:
                times[label, mode] = step_ms(model, prefix, tree, args.big_reps)
                say(f"[7b] {label} (T = {tree.num_nodes if tree else 1}), {mode} kernels: {times[label, mode]:.3f} ms")
    finally:
        kernels.set_row_invariant(chosen)
    mine = "exact" if chosen else "default"
    decode = times["decode", mine]
    tree_steps, tree_ms = [], {}
    for (label, tree) in steps[1:]:
        ms = tree_ms[tree_key(tree.paths[1:])] = times[label, mine]
        tree_steps.append({"tree": label.removeprefix("tree "), "nodes": tree.num_nodes, "ms": ms,
                           "vs_decode": ms / decode, "ms_by_kernels": {m: times[label, m] for m in modes}})
    del model
    free_memory(device)
    bandwidth = copy_bandwidth(device, args.copy_mib << 20, samples=args.big_reps)
    # The floor counts every weight once (the embedding table too, of which a step reads only T rows)
    # and not the KV cache; the real step must also read the cache.
    floor = weight_bytes / bandwidth * 1e3
    say(f"[7b] copy bandwidth {bandwidth / 1e12:.3f} TB/s -> floor {floor:.3f} ms per step")
    projected = []
    for m in medusa:
        ms = tree_ms[tree_key(m["tree_paths"])]
        projected.append({"heads": m["heads"], "tree": m["tree"], "tree_nodes": m["tree_nodes"],
                          "mean_accepted": m["mean_accepted"], "tree_ms": ms,
                          "speedup": m["mean_accepted"] * decode / ms})
    return {"config": {"vocab_size": args.big_vocab, "dim": args.big_dim, "n_layers": args.big_layers,
                       "n_heads": args.big_heads, "n_kv_heads": args.big_kv_heads,
                       "intermediate_size": args.big_ffn},
            "prefix": prefix, "cache_len": cache_len, "reps": args.big_reps, "weight_bytes": weight_bytes,
            "kernels": mine, "decode_ms": decode, "decode_ms_by_kernels": {m: times["decode", m] for m in modes},
            "tree_steps": tree_steps, "copy_bytes": 2 * (args.copy_mib << 20),
            "copy_bandwidth_bytes_per_s": bandwidth, "floor_ms": floor, "decode_vs_floor": decode / floor,
            "projected": projected}


def print_7b_tables(big: dict) -> None:
    modes = list(big["decode_ms_by_kernels"])
    by_mode = {m: [big["decode_ms_by_kernels"][m]] + [s["ms_by_kernels"][m] for s in big["tree_steps"]] for m in modes}
    rows = [[label, nodes] + [f"{by_mode[m][i]:.3f} ({by_mode[m][i] / by_mode[m][0]:.2f}x)" for m in modes]
            + ([f"{by_mode['exact'][i] / by_mode['default'][i]:.3f}x"] if len(modes) == 2 else [])
            for i, (label, nodes) in enumerate([("decode", 1)] + [(f"tree {s['tree']}", s["nodes"])
                                                                  for s in big["tree_steps"]])]
    rows.append(["floor: weights / copy bandwidth", "-"] + [f"{big['floor_ms']:.3f} "
                 f"({big['floor_ms'] / by_mode[m][0]:.0%} of decode)" for m in modes] + ["-"] * (len(modes) == 2))
    print_table(f"7B-shaped steps (prefix {big['prefix']}, lm_head included, CUDA graphs, median of {big['reps']}): "
                f"ms (vs decode)", ["step", "T"] + [f"{m} kernels" for m in modes]
                + ["exact / default"] * (len(modes) == 2), rows)
    if big["projected"]:
        print_table("Projected Medusa speedup on the 7B shape (mean accepted x t_decode / t_tree)",
                    ["heads", "tree", "T", "mean accepted", "tree ms", "speedup"],
                    [[p["heads"], p["tree"], p["tree_nodes"], p["mean_accepted"], p["tree_ms"],
                      f"{p['speedup']:.2f}x"]
                     for p in big["projected"]])

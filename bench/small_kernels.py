"""Benchmark of the small kernels (RMSNorm, acceptance, Medusa top-k, KV compaction) against their
references.

    python -m bench.small_kernels      # on a CUDA machine

Each benchmark first checks the kernel against its torch reference at that size (kernels/testing.py:
every `torch.empty` poisoned, so that an element the kernel forgot to write fails the check), then times
both as a graphed decode step pays for them: CALLS_PER_GRAPH calls captured in one CUDA graph, timed by
bench/timer.py and divided by the calls, so neither Python nor the launch path is in the numbers (eager
timing of a kernel this short would time mostly its launch). The calls reuse one input set, so inputs
smaller than the L2 are read from it. RMSNorm and the Medusa heads are memory-bound, so their rows also
give GB/s and its share of the device's copy bandwidth.
"""

from __future__ import annotations

import statistics

import torch

from kernels.acceptance import accept_candidates_reference, accept_candidates_triton
from kernels.kv_compaction import compact_kv_reference, compact_kv_triton
from kernels.medusa_heads import medusa_topk_reference, medusa_topk_triton
from kernels.rmsnorm import rmsnorm_reference, rmsnorm_triton
from kernels.testing import acceptance_inputs, check_acceptance, check_compaction, check_medusa, check_rmsnorm
from nanomedusa.cli import ArgumentParser
from nanomedusa.tree import PRESETS, TreeBuffers

from .timer import capture_graph, copy_bandwidth, time_ms

CALLS_PER_GRAPH = 20  # calls captured in one timed CUDA graph


def graph_us(fn) -> float:
    """Microseconds per call of fn: CALLS_PER_GRAPH calls in one CUDA graph, replayed back to back."""
    graph, _ = capture_graph(lambda: [fn() for _ in range(CALLS_PER_GRAPH)])
    samples_ms = time_ms(graph.replay, "cuda", samples=10, rep_ms=200, warmup_ms=50)
    return 1e3 * statistics.median(samples_ms) / CALLS_PER_GRAPH


def main(argv=None) -> None:
    ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the small-kernels benchmark needs a CUDA GPU; run it on the GPU machine.")
    dev = "cuda"
    torch.manual_seed(0)

    copy_gbs = copy_bandwidth(dev) / 1e9
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s")
    print(f"times: {CALLS_PER_GRAPH} calls in one CUDA graph, median replay / {CALLS_PER_GRAPH}")
    print("GB/s counts the bytes that must move: RMSNorm reads x, residual, weight and writes out, h;")
    print("the Medusa heads read their weights (the hidden state and outputs are negligible).\n")
    print(f"{'op':<10} {'shape':<38} {'triton us':>10} {'torch us':>10} {'speedup':>8} {'GB/s':>7} {'% copy':>7}")

    def row(op, shape, ours_fn, ref_fn, nbytes=None):
        ours, ref = graph_us(ours_fn), graph_us(ref_fn)
        bw = f"{nbytes / ours / 1e3:7.0f} {100 * nbytes / ours / 1e3 / copy_gbs:6.0f}%" if nbytes else ""
        print(f"{op:<10} {shape:<38} {ours:10.1f} {ref:10.1f} {ref / ours:7.2f}x {bw}")

    for D in (4096, 576):
        for rows in (1, 64, 4096):
            x, w, r = check_rmsnorm((rows, D), torch.bfloat16, dev)
            nbytes = (4 * rows * D + D) * 2  # read x, residual, weight; write out, h
            row("rmsnorm", f"rows={rows} D={D} bf16 +residual", lambda: rmsnorm_triton(x, w, 1e-5, r),
                lambda: rmsnorm_reference(x, w, 1e-5, r), nbytes)

    tree = TreeBuffers.from_choices(PRESETS["mc_sim_7b_63"])  # the reference's default tree, 64 nodes
    parents, retrieve = tree.parents.tolist(), tree.retrieve_indices.to(dev)
    for V in (32000, 49152):
        logits, tokens = acceptance_inputs(parents, V, torch.bfloat16, dev)
        for mode in ("greedy", "typical"):
            check_acceptance(logits, tokens, retrieve, mode)
            args = (logits, tokens, retrieve, mode)
            row("accept", f"T={len(parents)} P={retrieve.shape[0]} V={V} {mode}",
                lambda: accept_candidates_triton(*args), lambda: accept_candidates_reference(*args))

    for K in (4, 5):
        for D, V, shared in ((4096, 32000, False), (4096, 32000, True), (576, 49152, True)):
            inputs = check_medusa(K, 1, 1, D, V, shared, 10, torch.bfloat16, dev)
            nbytes = 2 * (K * (D * D + D) + (1 if shared else K) * V * D)  # weights dominate
            row("medusa", f"K={K} D={D} V={V} {'shared' if shared else 'per-head'} top10",
                lambda: medusa_topk_triton(*inputs, 10), lambda: medusa_topk_reference(*inputs, 10), nbytes)

    # KV compaction after a step that accepted 4 of a 64-node tree's nodes: every layer's K and V rows
    # of those nodes move to the slots after the prefix (the 7B shape: 32 layers x 32 KV heads x 128).
    accepted = torch.tensor([0, 3, 17, 40], device=dev)
    for name, (L, Hkv, D) in {"7B MHA": (32, 32, 128), "SmolLM2": (30, 3, 64)}.items():
        kv = torch.randn(L, 2, 1, Hkv, 1024 + 64, D, dtype=torch.bfloat16, device=dev)
        check_compaction(kv, 1024, accepted)
        row("compact", f"{name} L={L} Hkv={Hkv} D={D} prefix=1024 A=4",
            lambda: compact_kv_triton(kv, 1024, accepted), lambda: compact_kv_reference(kv, 1024, accepted))


if __name__ == "__main__":
    main()

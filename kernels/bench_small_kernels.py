"""Benchmark of the small kernels (RMSNorm, acceptance, Medusa top-k, KV compaction) against their
references.

    python -m kernels.bench_small_kernels      # on a CUDA machine

Each benchmark first checks the kernel against its torch reference at that size, with every
`torch.empty` poisoned so that an element the kernel forgot to write fails the check, then times
both as a graphed decode step pays for them: CALLS_PER_GRAPH calls captured in one CUDA graph,
replayed back to back between CUDA events (median of samples, divided by the calls), so neither
Python nor the launch path is in the numbers (eager timing of a 5 us kernel measures mostly launch
overhead). The calls reuse one input set, so inputs smaller than the 50 MB L2 are read from it.
RMSNorm and the Medusa heads are memory-bound, so their rows also give GB/s and its share of a
measured device-to-device copy.

The `check_*` helpers and input builders are shared with the tests, which run them at tiny sizes
under the Triton interpreter on CPU.
"""

from __future__ import annotations

import contextlib
import random
import statistics

import torch
from triton.testing import do_bench

from kernels.acceptance import accept_candidates_reference, accept_candidates_triton
from kernels.bench_tree_attention import capture_graph, time_replays
from kernels.kv_compaction import compact_kv_reference, compact_kv_triton
from kernels.medusa_heads import medusa_heads_reference, medusa_topk_reference, medusa_topk_triton
from kernels.rmsnorm import rmsnorm_reference, rmsnorm_triton

CALLS_PER_GRAPH = 20  # calls captured in one timed CUDA graph
# (rtol, atol) for comparing a kernel's floating-point output with its reference.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}
POISON_INT = -7777


@contextlib.contextmanager
def poisoned_empty():
    """Inside the block, torch.empty fills what it returns with NaN (or POISON_INT for integers)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else POISON_INT)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


# ----------------------------------------------------------------------------------------- RMSNorm

def check_rmsnorm(shape, dtype, device, residual=True, weight_dtype=None):
    """rmsnorm_triton == rmsnorm_reference on random x of `shape` [..., D] (out within TOLERANCE, h
    exact); returns the inputs (x, weight, residual)."""
    x = torch.randn(shape, dtype=dtype, device=device)
    weight = 1 + 0.1 * torch.randn(shape[-1], dtype=weight_dtype or dtype, device=device)
    res = torch.randn(shape, dtype=dtype, device=device) if residual else None
    with poisoned_empty():
        got = rmsnorm_triton(x, weight, 1e-5, res)
    want = rmsnorm_reference(x, weight, 1e-5, res)
    if residual:
        (got, got_h), (want, want_h) = got, want
        assert torch.equal(got_h, want_h), "h = x + residual differs from the reference"
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = TOLERANCE[want.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    return x, weight, res


# -------------------------------------------------------------------------------------- Acceptance

def random_parents(num_nodes: int, max_depth: int, rng: random.Random) -> list[int]:
    """A random tree in topological order: node j > 0 hangs under an earlier node above max_depth."""
    parents, depth = [0], [0]
    for j in range(1, num_nodes):
        parent = rng.choice([i for i in range(j) if depth[i] < max_depth])
        parents.append(parent)
        depth.append(depth[parent] + 1)
    return parents


def retrieve_from_parents(parents: list[int], rng: random.Random | None = None) -> torch.Tensor:
    """retrieve_indices [P, depth_max + 1] of the tree: one root-to-leaf row per leaf, -1 padded
    (rows shuffled when rng is given, so that 'first best path' is tested on any order)."""
    has_child = set(parents[1:])
    leaves = [j for j in range(len(parents)) if j not in has_child]  # just the root when T == 1
    rows = []
    for leaf in leaves:
        line = [leaf]
        while line[-1] != 0:
            line.append(parents[line[-1]])
        rows.append(line[::-1])
    if rng is not None:
        rng.shuffle(rows)
    width = max(len(row) for row in rows)
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)


def acceptance_inputs(parents: list[int], V: int, dtype, device, accept_prob: float = 0.7, scale: float = 3.0,
                      generator: torch.Generator | None = None):
    """Random logits [T, V] and tokens [T]; each node's token is its parent's argmax with
    probability accept_prob (so that paths get accepted), else a random token."""
    T = len(parents)
    logits = (scale * torch.randn(T, V, generator=generator)).to(dtype)
    tokens = torch.randint(0, V, (T,), generator=generator)
    take_argmax = torch.rand(T, generator=generator) < accept_prob
    argmax_of_parent = logits.float().argmax(-1)[torch.tensor(parents)]
    tokens = torch.where(take_argmax, argmax_of_parent, tokens)
    return logits.to(device), tokens.to(device)


def check_acceptance(logits, tokens, retrieve, mode, temperature=1.0, eps=0.09, alpha=0.3) -> tuple[int, int]:
    """accept_candidates_triton == accept_candidates_reference exactly; returns (best, accept_len)."""
    retrieve = retrieve.to(logits.device)
    with poisoned_empty():
        best, accept_len = accept_candidates_triton(logits, tokens, retrieve, mode, temperature, eps, alpha)
    want_best, want_len = accept_candidates_reference(logits, tokens, retrieve, mode, temperature, eps, alpha)
    assert best.shape == () and accept_len.shape == () and best.dtype == accept_len.dtype == torch.long
    got, want = (best.item(), accept_len.item()), (want_best.item(), want_len.item())
    assert got == want, f"{mode}: (best, accept_len) = {got}, reference {want}"
    return got


# ------------------------------------------------------------------------------------ Medusa heads

def medusa_inputs(K, L, N, D, V, shared, dtype, device):
    """Random hidden [N, D] and head weights scaled like a trained model's (logits of order 1)."""
    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(dtype)

    vocab = randn(V, D, scale=D**-0.5) if shared else randn(K, V, D, scale=D**-0.5)
    return randn(N, D), randn(K, L, D, D, scale=D**-0.5), randn(K, L, D, scale=0.1), vocab


def assert_topk_matches(ids: torch.Tensor, logits: torch.Tensor, topk: int) -> None:
    """ids [K, N, topk] against the reference logits [K, N, V]: the logits at ids equal the
    reference's top-k values (ties may pick other ids), and wherever the reference's ranking is
    clear of ties (neighbouring values further apart than the tolerance) the ids match exactly."""
    K, N, V = logits.shape
    assert ids.shape == (K, N, topk) and ids.dtype == torch.long
    assert bool(((ids >= 0) & (ids < V)).all()), "ids out of range (unwritten?)"
    ref = logits.float().topk(min(topk + 1, V), dim=-1)
    got_values = logits.float().gather(-1, ids)
    rtol, atol = TOLERANCE[logits.dtype]
    torch.testing.assert_close(got_values, ref.values[..., :topk], rtol=rtol, atol=atol)
    tol = atol + rtol * ref.values.abs()
    gaps = ref.values[..., :-1] - ref.values[..., 1:]  # [K, N, topk or topk-1]
    inf = torch.full_like(gaps[..., :1], float("inf"))
    gap_above = torch.cat([inf, gaps], -1)[..., :topk]
    gap_below = torch.cat([gaps, inf], -1)[..., :topk]
    clear = (gap_above > tol[..., :topk]) & (gap_below > tol[..., :topk])
    assert torch.equal(ids[clear], ref.indices[..., :topk][clear]), "ids differ where the ranking is clear"


def check_medusa(K, L, N, D, V, shared, topk, dtype, device):
    """medusa_topk_triton against the reference logits on random inputs (see assert_topk_matches);
    returns the inputs (hidden, res_weight, res_bias, vocab_weight)."""
    inputs = medusa_inputs(K, L, N, D, V, shared, dtype, device)
    with poisoned_empty():
        ids = medusa_topk_triton(*inputs, topk)
    assert_topk_matches(ids, medusa_heads_reference(*inputs), topk)
    return inputs


# ---------------------------------------------------------------------------------- KV compaction

def check_compaction(kv, prefix_len, accepted, prefix_as_tensor=False):
    """compact_kv_triton == compact_kv_reference bit for bit (copies are exact), on kv in place:
    the moved slots and every untouched slot, every layer/head/batch row."""
    expected = kv.clone()
    compact_kv_reference(expected, prefix_len, accepted)
    compact_kv_triton(kv, torch.tensor(prefix_len, device=kv.device) if prefix_as_tensor else prefix_len, accepted)
    assert torch.equal(kv, expected), "compact_kv_triton differs from its reference"


# -------------------------------------------------------------------------------------- benchmarks

def _default_tree(device):
    """(parents, retrieve_indices) of the default 63-node Medusa tree, or of a random tree of that
    size where nanomedusa.tree is missing."""
    try:
        from nanomedusa.tree import PRESETS, TreeBuffers

        tree = TreeBuffers.from_choices(PRESETS["mc_sim_7b_63"])
        return tree.parents.tolist(), tree.retrieve_indices.to(device)
    except ImportError:
        parents = random_parents(64, 5, random.Random(0))
        return parents, retrieve_from_parents(parents).to(device)


def graph_us(fn) -> float:
    """Microseconds per call of fn: CALLS_PER_GRAPH calls in one CUDA graph, replayed back to back."""
    graph, _ = capture_graph(lambda: [fn() for _ in range(CALLS_PER_GRAPH)])
    samples_ms = time_replays(graph.replay, rep_ms=200, n_samples=10, warmup_ms=50)
    return 1e3 * statistics.median(samples_ms) / CALLS_PER_GRAPH


def main() -> None:
    assert torch.cuda.is_available(), "the benchmark needs a CUDA GPU"
    dev = "cuda"
    torch.manual_seed(0)

    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
    del src, dst
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

    parents, retrieve = _default_tree(dev)
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

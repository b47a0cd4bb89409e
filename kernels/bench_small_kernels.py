"""Benchmark of the three small kernels (RMSNorm, acceptance, Medusa top-k) against their references.

    python -m kernels.bench_small_kernels      # on a CUDA machine

Each benchmark first checks the kernel against its torch reference at that size, with every
`torch.empty` poisoned so that an element the kernel forgot to write fails the check, then times
both with `triton.testing.do_bench` (median). RMSNorm and the Medusa heads are memory-bound, so
their rows also give GB/s and its share of a measured device-to-device copy.

The `check_*` helpers and input builders are shared with the tests, which run them at tiny sizes
under the Triton interpreter on CPU.
"""

from __future__ import annotations

import contextlib
import random

import torch
from triton.testing import do_bench

from kernels.acceptance import accept_candidates_reference, accept_candidates_triton
from kernels.medusa_heads import medusa_heads_reference, medusa_topk_reference, medusa_topk_triton
from kernels.rmsnorm import rmsnorm_reference, rmsnorm_triton

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


def main() -> None:
    assert torch.cuda.is_available(), "the benchmark needs a CUDA GPU"
    dev = "cuda"
    torch.manual_seed(0)

    def ms(fn):
        return do_bench(fn, return_mode="median")

    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() / ms(lambda: dst.copy_(src)) / 1e6
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s")
    print("GB/s counts the bytes that must move: RMSNorm reads x, residual, weight and writes out, h;")
    print("the Medusa heads read their weights (the hidden state and outputs are negligible).\n")
    header = f"{'op':<10} {'shape':<34} {'triton us':>10} {'torch us':>10} {'speedup':>8} {'GB/s':>7} {'% copy':>7}"

    def row(op, shape, ours, ref, nbytes=None):
        bw = f"{nbytes / ours / 1e6:7.0f} {100 * nbytes / ours / 1e6 / copy_gbs:6.0f}%" if nbytes else ""
        print(f"{op:<10} {shape:<34} {1e3 * ours:10.1f} {1e3 * ref:10.1f} {ref / ours:7.2f}x {bw}")

    print(header)
    for D in (4096, 576):
        for rows in (1, 64, 4096):
            x, w, r = check_rmsnorm((rows, D), torch.bfloat16, dev)
            nbytes = (4 * rows * D + D) * 2  # read x, residual, weight; write out, h
            row("rmsnorm", f"rows={rows} D={D} bf16 +residual", ms(lambda: rmsnorm_triton(x, w, 1e-5, r)),
                ms(lambda: rmsnorm_reference(x, w, 1e-5, r)), nbytes)

    parents, retrieve = _default_tree(dev)
    for V in (32000, 49152):
        logits, tokens = acceptance_inputs(parents, V, torch.bfloat16, dev)
        for mode in ("greedy", "typical"):
            check_acceptance(logits, tokens, retrieve, mode)
            args = (logits, tokens, retrieve, mode)
            row("accept", f"T={len(parents)} P={retrieve.shape[0]} V={V} {mode}",
                ms(lambda: accept_candidates_triton(*args)), ms(lambda: accept_candidates_reference(*args)))

    for K in (4, 5):
        for D, V, shared in ((4096, 32000, False), (4096, 32000, True), (576, 49152, True)):
            inputs = check_medusa(K, 1, 1, D, V, shared, 10, torch.bfloat16, dev)
            nbytes = 2 * (K * (D * D + D) + (1 if shared else K) * V * D)  # weights dominate
            row("medusa", f"K={K} D={D} V={V} {'shared' if shared else 'per-head'} top10",
                ms(lambda: medusa_topk_triton(*inputs, 10)), ms(lambda: medusa_topk_reference(*inputs, 10)), nbytes)


if __name__ == "__main__":
    main()

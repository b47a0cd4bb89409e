"""Correctness checks of the kernels against their torch references, shared by the tests and the benchmarks
(as `triton.testing` is Triton's): the tests run them at tiny sizes, on CPU under Triton's interpreter;
the benchmarks (bench/) run them at the sizes they time, so that only a kernel that passed there is timed.

Each `check_*` runs a Triton kernel with every `torch.empty` poisoned (`poisoned_empty`), so that an element
the kernel forgot to write fails the comparison, and compares it with its reference: floating-point outputs
within TOLERANCE, integer outputs and copies exactly. The `*_inputs` builders make random inputs of a given
size. `counting_launches` counts the kernels a piece of code launches (so that a CPU test can pin how many
a CUDA-graphed step replays). Like the rest of `kernels/`, nothing here imports the application.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .acceptance import accept_candidates_reference, accept_candidates_triton
from .dynamic_tree import tree_choice_reference, tree_choice_triton, tree_layout_reference, tree_layout_triton
from .kv_compaction import compact_kv_reference, compact_kv_triton
from .linear import linear_reference, linear_triton
from .medusa_heads import medusa_heads_reference, medusa_topk_triton
from .rmsnorm import rmsnorm_reference, rmsnorm_triton

# (rtol, atol) for comparing a kernel's floating-point output with its reference.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}
POISON_INT = -7777


@contextlib.contextmanager
def poisoned_empty():
    """Inside the block, torch.empty and torch.empty_like fill what they return with NaN (or POISON_INT for
    integers), so that an output element a kernel never writes shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else POISON_INT)

    torch.empty = lambda *args, **kwargs: poison(real_empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poison(real_empty_like(*args, **kwargs))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


# Aten ops that allocate without writing: no kernel runs (views are skipped by their schema).
# (scalar_tensor: a Python number wrapped for an op, as in torch.where(c, x, -1), kept on the host.)
_ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "scalar_tensor"}


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts, self.paused = counts, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (self.paused or func.is_view or name in _ALLOCATIONS):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_launches():
    """Inside the block, count what would launch a device kernel -> Counter {op: launches}: each aten op
    that computes (views and bare allocations are free) under its name, each Triton launch as
    "triton:<kernel>". The tensor ops a Triton launch runs itself (the CPU interpreter's copies) are not
    counted. On any device, so a CPU test can pin how many kernels a CUDA-graphed step would replay."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    counts: Counter = Counter()
    mode = _AtenCounter(counts)
    originals = {cls: cls.run for cls in (jit.JITFunction, interpreter.InterpretedFunction)}

    def counted(run):
        def launch(self, *args, **kwargs):
            if not kwargs.get("warmup"):
                counts[f"triton:{self.fn.__name__}"] += 1
            paused, mode.paused = mode.paused, True
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.paused = paused
        return launch

    for cls, run in originals.items():
        cls.run = counted(run)
    try:
        with mode:
            yield counts
    finally:
        for cls, run in originals.items():
            cls.run = run


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64; inf when `out` holds a NaN (an element never written, where
    outputs start poisoned)."""
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    return math.inf if math.isnan(err) else err


# ------------------------------------------------------------------------------------------ RMSNorm

def check_rmsnorm(shape, dtype, device, residual=True, weight_dtype=None, strided_weight=False):
    """rmsnorm_triton == rmsnorm_reference on random x of `shape` [..., D] (out within TOLERANCE, h
    exact), the weight every other element of a longer tensor with `strided_weight`; returns the inputs
    (x, weight, residual)."""
    x = torch.randn(shape, dtype=dtype, device=device)
    weight = 1 + 0.1 * torch.randn(shape[-1], 2 if strided_weight else 1, dtype=weight_dtype or dtype, device=device)
    weight = weight[:, -1]  # [D], stride 2 with strided_weight
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


# ------------------------------------------------------------------------------------------- Linear

def linear_inputs(M, N, K, dtype, device, bias=True, lead=()):
    """Random x [*lead, M, K], weight [N, K] and bias [N] (or None) scaled like a trained layer's
    (outputs of order 1)."""
    x = torch.randn(*lead, M, K, device=device).to(dtype)
    weight = (K**-0.5 * torch.randn(N, K, device=device)).to(dtype)
    return x, weight, (0.1 * torch.randn(N, device=device)).to(dtype) if bias else None


def check_linear(x, weight, bias=None, config=None) -> torch.Tensor:
    """linear_triton (with `config`, else its own) == linear_reference computed in float32, within
    TOLERANCE of x's dtype; returns the kernel's output."""
    with poisoned_empty():
        got = linear_triton(x, weight, bias, config=config)
    want = linear_reference(x.float(), weight.float(), None if bias is None else bias.float())
    assert got.dtype == x.dtype and got.shape == want.shape
    rtol, atol = TOLERANCE[x.dtype]
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)
    return got


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b hold the same bits: unlike ==, tells -0.0 from 0.0 and equates identical NaNs."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def rows_differing_from_one_row_calls(fn, x: torch.Tensor, rows) -> list[int]:
    """The rows i (of `rows`) where fn(x)[i], x [M, K] computed in one call, differs in any bit from
    fn(x[i:i + 1])[0], row i alone: [] for a row-invariant fn."""
    full = fn(x)
    return [i for i in rows if not same_bits(fn(x[i:i + 1])[0], full[i])]


# --------------------------------------------------------------------------------------- Acceptance

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


def check_acceptance(logits, tokens, retrieve, mode, temperature=1.0, eps=0.09, alpha=0.3,
                     drawn=None) -> tuple[int, int]:
    """accept_candidates_triton == accept_candidates_reference exactly; returns (best, accept_len). Sample mode
    takes each node's draw from `drawn` [T], by default its argmax (so that it accepts what greedy accepts)."""
    retrieve = retrieve.to(logits.device)
    if mode == "sample" and drawn is None:
        drawn = logits.argmax(-1)
    args = (logits, tokens, retrieve, mode, temperature, eps, alpha, drawn)
    with poisoned_empty():
        best, accept_len = accept_candidates_triton(*args)
    want_best, want_len = accept_candidates_reference(*args)
    assert best.shape == () and accept_len.shape == () and best.dtype == accept_len.dtype == torch.long
    got, want = (best.item(), accept_len.item()), (want_best.item(), want_len.item())
    assert got == want, f"{mode}: (best, accept_len) = {got}, reference {want}"
    return got


# ------------------------------------------------------------------------------------- Medusa heads

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


def check_medusa(K, L, N, D, V, shared, topk, dtype, device, temperatures=None):
    """medusa_topk_triton against the reference logits on random inputs (see assert_topk_matches); with
    temperatures [K] also its log-probabilities, against log_softmax(logits / T) at the ids it returned
    (so a tie that picked another id is no error). Returns the inputs (hidden, res_weight, res_bias,
    vocab_weight)."""
    inputs = medusa_inputs(K, L, N, D, V, shared, dtype, device)
    with poisoned_empty():
        out = medusa_topk_triton(*inputs, topk, temperatures)
    logits = medusa_heads_reference(*inputs)
    ids = out if temperatures is None else out[0]
    assert_topk_matches(ids, logits, topk)
    if temperatures is not None:
        want = torch.log_softmax(logits.float() / temperatures.float().view(-1, 1, 1), dim=-1).gather(-1, ids)
        assert out[1].dtype == torch.float32 and out[1].shape == ids.shape
        rtol, atol = TOLERANCE[dtype]  # (the logits are rounded to dtype, then tempered in float32)
        torch.testing.assert_close(out[1], want, rtol=rtol, atol=atol)
    return inputs


# ------------------------------------------------------------------------------------- Dynamic trees

def check_tree_choice(root, head_ids, head_logprobs, ranks, num_nodes):
    """tree_choice_triton == tree_choice_reference exactly (float32 log-probabilities); returns (tokens, nodes)."""
    with poisoned_empty():
        got = tree_choice_triton(root, head_ids, head_logprobs, ranks, num_nodes)
    _assert_same_outputs(("tokens", "nodes"), got, tree_choice_reference(root, head_ids, head_logprobs, ranks,
                                                                          num_nodes))
    return got


def check_tree_layout(nodes, *tables):
    """tree_layout_triton == tree_layout_reference exactly, every buffer; returns the buffers."""
    with poisoned_empty():
        got = tree_layout_triton(nodes, *tables)
    _assert_same_outputs(("attn_mask", "depths", "parents", "tree_indices", "retrieve"), got,
                         tree_layout_reference(nodes, *tables))
    return got


def _assert_same_outputs(names, got, want) -> None:
    """Each output of a kernel equals its reference's exactly, dtype included."""
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w), f"{name}: {g.tolist()}, reference {w.tolist()}"


# ------------------------------------------------------------------------------------ KV compaction

def check_compaction(kv, prefix_len, accepted, prefix_as_tensor=False):
    """compact_kv_triton == compact_kv_reference bit for bit (copies are exact), on kv in place:
    the moved slots and every untouched slot, every layer/head/batch row."""
    expected = kv.clone()
    compact_kv_reference(expected, prefix_len, accepted)
    compact_kv_triton(kv, torch.tensor(prefix_len, device=kv.device) if prefix_as_tensor else prefix_len, accepted)
    assert torch.equal(kv, expected), "compact_kv_triton differs from its reference"


# ----------------------------------------------------------------------------------- Tree attention

def tree_attention_inputs(n_heads: int, n_kv_heads: int, head_dim: int, prefix_len: int, T: int,
                          dtype: torch.dtype, device: str | torch.device, batch: int = 1):
    """Random q [B, Hq, T, D], caches [B, Hkv, prefix+T, D] and a causal tree mask [T, T]; returns
    (q, k_cache, v_cache, prefix_len, tree_mask), the arguments of the tree-attention ops in order."""
    S = prefix_len + T
    q = torch.randn(batch, n_heads, T, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device)
    tree_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return q, k, v, prefix_len, tree_mask

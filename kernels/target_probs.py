"""The distribution a sampling step draws from: softmax(logits / temperature), cut to the top k tokens and to
the nucleus (top p), renormalised.

The nucleus keeps every token whose probability the tokens strictly likelier than it sum to less than top_p: the
smallest set of the likeliest tokens whose mass reaches top_p, and all of a tie at its edge (sorting decides
nothing). The likeliest token always stays. Top k keeps the logits at least the k-th largest (ties too).

Plain sampling and lossless speculative sampling both draw from this (through `nanomedusa.sampling`), which is
what makes the latter lossless; the walk down a tree reads the distribution of every node it might reach, so a
step computes it for all of the tree's rows.

The reference sorts each row to find the nucleus. The Triton kernel does not sort: one program per row keeps
the row's exp(z - max) as one block (registers, and local memory where a row of up to MAX_VOCAB outgrows them) and
finds each cut by bisection over the values' float32 bit patterns, which order non-negative floats as integers do.
"The mass strictly above pattern b" falls as b rises, so 31 halvings of [0, +inf's pattern] find the smallest b
under top_p times the total: the nucleus is every token at or above it (the same for top k, with counts). On an
H200, for 49,152 tokens, that is 0.08-0.09 ms for 2 to 64 rows and 0.12 ms for 128, where the reference took 0.18 /
0.33 / 1.0 ms for 2 / 32 / 128 rows (bench/sampling_cost.py). The 31 halvings are serial, so one row costs as much
as 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels

MAX_VOCAB = 131072  # the longest row a program takes as one block; a longer one takes the reference
INF_BITS = tl.constexpr(0x7F800000)  # float32 +inf's bit pattern: above every finite non-negative float's


def target_probs_reference(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """logits [..., V] -> probabilities [..., V] float32 (see the module docstring); temperature > 0, top_k 0 for
    no cut, 0 < top_p <= 1 (1: no cut)."""
    z = logits.float() / temperature
    if top_k > 0:
        kth = z.topk(min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = z.softmax(-1)
    if top_p < 1.0:
        sorted_probs = probs.sort(dim=-1, descending=True).values  # [..., V]
        above = sorted_probs.cumsum(-1) - sorted_probs  # mass before each place; a tie's first place: strictly above
        # The nucleus's smallest probability: the last place whose mass before it is under top_p (the first's is 0).
        edge = sorted_probs.masked_fill(above >= top_p, float("inf")).amin(-1, keepdim=True)
        probs = probs.masked_fill(probs < edge, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def target_probs(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(logits) and logits.shape[-1] <= MAX_VOCAB:
        return target_probs_triton(logits, temperature, top_k, top_p)
    return target_probs_reference(logits, temperature, top_k, top_p)


@triton.jit
def _smallest_bits_below(bits, e, limit, COUNT: tl.constexpr):
    """bits [BLOCK_V] int32 (e's float32 patterns, e >= 0) -> the smallest pattern b whose weight above it is
    under limit: the count of bits > b (COUNT) or the sum of their e. Both fall as b rises, and +inf's pattern has
    none above it, so 31 halvings of [0, INF_BITS] find b (limit > 0)."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], INF_BITS, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        if COUNT:
            above = tl.sum((bits > mid).to(tl.float32), axis=0)
        else:
            above = tl.sum(tl.where(bits > mid, e, 0.0), axis=0)
        under = above < limit
        hi = tl.where(under, mid, hi)
        lo = tl.where(under, lo, mid + 1)
    return hi


@triton.jit
def _target_probs_kernel(logits_ptr, out_ptr, stride_row, V, inv_temperature, top_k, top_p, TOP_K: tl.constexpr,
                         TOP_P: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    """Program r: out[r, :] = row r's distribution. logits [R, V] (row stride stride_row), out [R, V] float32; top_k
    a float (an int 1 would be specialised into a constant)."""
    wait_for_previous_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_V)
    real = idx < V
    z = tl.load(logits_ptr + row * stride_row + idx, mask=real, other=float("-inf")).to(tl.float32) * inv_temperature
    e = tl.exp(z - tl.max(z, axis=0))  # [BLOCK_V]; 0 past V
    bits = e.to(tl.int32, bitcast=True)
    if TOP_K:  # the k-th largest e: the smallest pattern with fewer than k above it (ties of e kept, as of z)
        e = tl.where(bits >= _smallest_bits_below(bits, e, top_k, True), e, 0.0)
    if TOP_P:
        e = tl.where(bits >= _smallest_bits_below(bits, e, top_p * tl.sum(e, axis=0), False), e, 0.0)
    tl.store(out_ptr + row * V + idx, e / tl.sum(e, axis=0), mask=real)


def target_probs_triton(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Same contract as `target_probs_reference` (rows up to MAX_VOCAB long), in one launch."""
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()  # [R, V]
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if rows.shape[0] > 0:
        block_v = triton.next_power_of_2(V)
        _target_probs_kernel[(rows.shape[0],)](
            rows, out, rows.stride(0), V, 1.0 / temperature, float(min(top_k, V)), top_p, TOP_K=0 < top_k < V,
            TOP_P=top_p < 1.0, BLOCK_V=block_v, num_warps=min(32, max(4, block_v // 2048)), **launch_options(rows))
    return out

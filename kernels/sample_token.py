"""Plain sampling: the distribution a token is drawn from, and the draw, one token per row, on the device.

`target_probs` defines the distribution: softmax(logits / temperature), cut to the top k tokens and to the nucleus
(top p), renormalised. The nucleus keeps every token whose probability the tokens strictly likelier than it sum to
less than top_p: the smallest set of the likeliest tokens whose mass reaches top_p, and all of a tie at its edge
(sorting decides nothing). The likeliest token always stays. Top k keeps the logits at least the k-th largest (ties
too). Plain sampling and lossless speculative sampling (`acceptance.py`'s sample mode: a draw at every tree node)
both draw from it through `sample_token`, which is what makes the latter lossless.

`sample_token` never computes that distribution. A row's token is proposed from softmax(logits / temperature) cut
to the top k only (q), by inverse CDF on a uniform (`sample_from`), and kept when it lies in the nucleus: when the
tokens strictly likelier than it hold less than top_p of q. Otherwise the next uniform proposes again, up to
PROPOSALS times; if every proposal misses, the last uniform draws from the nucleus itself. This is rejection
sampling, so the token is distributed exactly as `target_probs` (up to rounding: the kernel sums the mass above
a token in another order than the reference's sort): a proposal lands in the nucleus S with probability q(S) >=
top_p and, given that, on x with probability q(x) / q(S), the nucleus distribution; the fallback draws from that
same distribution. Four proposals all miss with probability (1 - q(S))^4, at most 1e-4 at the usual top-p of 0.9.
Without a nucleus (top_p = 1) the first proposal is the token.

Why: finding the nucleus's edge takes 31 halvings over the whole row (below), each a pass over all of it: 0.08 ms
for the default model's 49,152 tokens on an H200, a tenth of a decoding step, however many rows run beside it. A
token needs one prefix sum and about three passes for the proposal that is kept. The uniforms come in
[..., PROPOSALS + 1], drawn beforehand so that the draw replays inside a CUDA graph.

The reference is that procedure in torch, proposal by proposal. The Triton kernel is one program per row, which
keeps the row's exp(z - max) as one block (registers, and local memory where a row of up to MAX_VOCAB outgrows
them; a longer one takes the reference). The top-k cut and the fallback find their edge by bisection over the
values' float32 bit patterns, which order non-negative floats as integers do: "the mass (or count) strictly above
pattern b" falls as b rises, so 31 halvings of [0, +inf's pattern] find the smallest b under the limit, and the cut
keeps every token at or above it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels

MAX_VOCAB = 131072  # the longest row a program takes as one block; a longer one takes the reference
INF_BITS = tl.constexpr(0x7F800000)  # float32 +inf's bit pattern: above every finite non-negative float's
PROPOSALS = 4  # draws from q before the exact nucleus is found; all miss with probability (1 - top_p)^4 at most


def target_probs(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
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


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [..., V] (need not sum to 1), u [...] uniforms in [0, 1) -> token ids [...]: the first token
    whose cumulative mass exceeds u * total, so token i comes out with probability probs[i] / total."""
    cdf = probs.cumsum(-1)  # [..., V]
    below = (cdf <= u[..., None] * cdf[..., -1:]).sum(-1)  # [...] tokens wholly below the draw
    # Rounding can put the draw at the very top: then the last token with any mass, never one without.
    ids = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, ids, -1).amax(-1)  # [...]
    return torch.minimum(below, last)


def sample_token_reference(logits, temperature: float, top_k: int, top_p: float, uniforms):
    """logits [..., V], uniforms [..., PROPOSALS + 1] in [0, 1) -> token ids [...] (see the module docstring)."""
    q = target_probs(logits, temperature, top_k)  # [..., V] cut to the top k only
    if top_p >= 1.0:
        return sample_from(q, uniforms[..., 0])
    token = sample_from(target_probs(logits, temperature, top_k, top_p), uniforms[..., PROPOSALS])
    for j in reversed(range(PROPOSALS)):  # the first proposal that lands in the nucleus wins
        proposal = sample_from(q, uniforms[..., j])  # [...]
        q_x = q.gather(-1, proposal[..., None])  # [..., 1]
        above = torch.where(q > q_x, q, 0.0).sum(-1)  # [...] mass of the tokens strictly likelier
        token = torch.where(above < top_p, proposal, token)
    return token


def sample_token(logits, temperature: float, top_k: int, top_p: float, uniforms):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(logits) and logits.shape[-1] <= MAX_VOCAB:
        return sample_token_triton(logits, temperature, top_k, top_p, uniforms)
    return sample_token_reference(logits, temperature, top_k, top_p, uniforms)


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
def _inverse_cdf(cdf, u, last):
    """`sample_from` on one row: the first token whose cumulative mass (cdf [BLOCK_V]) exceeds u times the total,
    never past `last`, the last token with mass (rounding can put the draw at the very top)."""
    below = tl.sum((cdf <= u * tl.max(cdf, axis=0)).to(tl.int32), axis=0)  # tokens wholly below the draw
    return tl.minimum(below, last)


@triton.jit
def _in_nucleus(bits, e, idx, token, limit):
    """Whether `token` is in the nucleus: the mass of the tokens strictly likelier than it (e [BLOCK_V], bits its
    float32 patterns) is under `limit`. Its pattern is picked out of the block by a max."""
    return tl.sum(tl.where(bits > tl.max(tl.where(idx == token, bits, 0), axis=0), e, 0.0), axis=0) < limit


@triton.jit
def _sample_token_kernel(logits_ptr, u_ptr, out_ptr, stride_row, V, inv_temperature, top_k, top_p,
                         TOP_K: tl.constexpr, TOP_P: tl.constexpr, PROPOSALS: tl.constexpr, BLOCK_V: tl.constexpr,
                         PDL: tl.constexpr):
    """Program r: out[r] = row r's token. logits [R, V] (row stride stride_row), u [R, PROPOSALS + 1], out [R]
    int64; top_k a float (an int 1 would be specialised into a constant)."""
    wait_for_previous_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_V)
    real = idx < V
    z = tl.load(logits_ptr + row * stride_row + idx, mask=real, other=float("-inf")).to(tl.float32) * inv_temperature
    e = tl.exp(z - tl.max(z, axis=0))  # [BLOCK_V] q times its total; 0 past V
    bits = e.to(tl.int32, bitcast=True)  # ordered as e is (e >= 0)
    if TOP_K:
        e = tl.where(bits >= _smallest_bits_below(bits, e, top_k, True), e, 0.0)
    last = tl.max(tl.where(e > 0, idx, -1), axis=0)
    cdf = tl.cumsum(e, axis=0)
    u_row = u_ptr + row * (PROPOSALS + 1)
    token = _inverse_cdf(cdf, tl.load(u_row), last)
    if TOP_P:
        limit = top_p * tl.sum(e, axis=0)  # the nucleus: tokens with less than this strictly above them
        kept = _in_nucleus(bits, e, idx, token, limit)
        j = 1
        while (j < PROPOSALS) & (kept == 0):  # proposal j, while none so far lies in the nucleus
            token = _inverse_cdf(cdf, tl.load(u_row + j), last)
            kept = _in_nucleus(bits, e, idx, token, limit)
            j += 1
        if kept == 0:  # every proposal missed: draw from the nucleus itself, as target_probs cuts it
            nucleus = tl.where(bits >= _smallest_bits_below(bits, e, limit, False), e, 0.0)
            token = _inverse_cdf(tl.cumsum(nucleus, axis=0), tl.load(u_row + PROPOSALS),
                                 tl.max(tl.where(nucleus > 0, idx, -1), axis=0))
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_token_triton(logits, temperature: float, top_k: int, top_p: float, uniforms):
    """Same contract as `sample_token_reference` (rows up to MAX_VOCAB long), in one launch."""
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()  # [R, V]
    u = uniforms.reshape(-1, PROPOSALS + 1).float().contiguous()  # [R, PROPOSALS + 1]
    out = torch.empty(logits.shape[:-1], dtype=torch.long, device=logits.device)
    if rows.shape[0] > 0:
        block_v = triton.next_power_of_2(V)
        _sample_token_kernel[(rows.shape[0],)](
            rows, u, out, rows.stride(0), V, 1.0 / temperature, float(min(top_k, V)), top_p, TOP_K=0 < top_k < V,
            TOP_P=top_p < 1.0, PROPOSALS=PROPOSALS, BLOCK_V=block_v, num_warps=min(32, max(4, block_v // 2048)),
            **launch_options(rows))
    return out

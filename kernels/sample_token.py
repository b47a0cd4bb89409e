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
or more for the default model's 49,152 tokens on an H200, a tenth of a decoding step. A token kept needs about
two and a half passes: the row's max and total (one pass, as online softmax computes them), the walk to the block
the proposal's draw lies in, and the mass above the proposal. The uniforms come in [..., PROPOSALS + 1], drawn
beforehand so that the draw replays inside a CUDA graph.

The reference is that procedure in torch, proposal by proposal, sync-free: it finds every row's nucleus and keeps it
where the proposals missed. `sample_token_cpu` gives its tokens finding the nucleus only where needed. The Triton
kernel is one program per row, reading the row BLOCK tokens at a time in every pass (the row stays in the L2 between
passes, and a block fits in registers, so a program is small and a tree's rows run side by side). The top-k cut
comes from torch.topk before it: the row's k-th largest logit, which the cut keeps and everything at or above it.
(The reference cuts z = logit / temperature, which can round two neighbouring float32 logits to one z and keep both
where the kernel keeps the larger; bf16 and fp16 logits are too far apart for that. Dividing in the kernel, not
multiplying by 1 / temperature, would cost about as much as the rest of a pass's arithmetic.) The fallback finds the
nucleus's edge by bisection over the values' float32 bit patterns, which order non-negative floats as integers do:
"the mass strictly above pattern b" falls as b rises, so 31 halvings of [0, +inf's pattern] find the smallest b
under the limit, and the cut keeps every token at or above it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError

INF_BITS = tl.constexpr(0x7F800000)  # float32 +inf's bit pattern: above every finite non-negative float's
NO_CUT = tl.constexpr(0)  # a nucleus cut that keeps every token: every e's pattern is at least 0
# Tokens a program reads at a time: on an H200 (bf16, 49,152 tokens) 8,192 with 16 warps beat 2,048-16,384 with
# `warps` (`python -m bench.sampling_cost --blocks 2048,4096,8192,16384`; a one-off sweep of 1,024-8,192 with 2-16
# warps agreed)
BLOCK = 8192
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
    proposal, kept = first_proposal_in_nucleus(q, top_p, uniforms)
    fallback = sample_from(target_probs(logits, temperature, top_k, top_p), uniforms[..., PROPOSALS])
    return torch.where(kept, proposal, fallback)


def first_proposal_in_nucleus(q, top_p: float, uniforms, stop_when_all_kept: bool = False):
    """q [..., V] the top-k-cut softmax, uniforms [..., PROPOSALS + 1] -> (token [...], kept [...] bool): each row's
    first proposal from q that lies in the nucleus (the tokens strictly likelier than it hold less than top_p), and
    whether one did (where none did, token is the last proposal looked at). stop_when_all_kept: skip the proposals
    left once every row has kept one (a host sync: for a CPU, not for a CUDA graph)."""

    def proposal(j):  # [...] the j-th proposal and whether it lies in the nucleus
        x = sample_from(q, uniforms[..., j])
        q_x = q.gather(-1, x[..., None])  # [..., 1]
        return x, torch.where(q > q_x, q, 0.0).sum(-1) < top_p

    token, kept = proposal(0)
    for j in range(1, PROPOSALS):
        if stop_when_all_kept and kept.all():
            break
        x, inside = proposal(j)
        token = torch.where(kept, token, x)
        kept = kept | inside
    return token, kept


def sample_token_cpu(logits, temperature: float, top_k: int, top_p: float, uniforms):
    """The reference's tokens, finding the nucleus only for the rows whose proposals all miss, as the kernel does.
    Why: sorting a row's probabilities for the nucleus is most of a CPU's draw (3.6 of 4.7 ms for the default
    model's 49,152 tokens), and at most (1 - top_p)^4 of rows need it. The reference computes it for every row
    because a GPU's draw replays inside a CUDA graph, where the host cannot look at `kept` first; a CPU can."""
    if top_p >= 1.0:
        return sample_token_reference(logits, temperature, top_k, top_p, uniforms)
    q = target_probs(logits, temperature, top_k)  # [..., V]
    token, kept = first_proposal_in_nucleus(q, top_p, uniforms, stop_when_all_kept=True)
    missed = ~kept  # [...]
    if missed.any():
        nucleus = target_probs(logits[missed], temperature, top_k, top_p)  # [M, V]
        token[missed] = sample_from(nucleus, uniforms[missed][:, PROPOSALS])
    return token


def sample_token(logits, temperature: float, top_k: int, top_p: float, uniforms):
    """Dispatch: the Triton kernel on CUDA, `sample_token_cpu` on a CPU, the reference elsewhere (see module
    docstring)."""
    _check_inputs(logits, temperature, top_k, top_p, uniforms)
    if use_triton(logits):
        return _sample_token_launch(logits, temperature, top_k, top_p, uniforms, BLOCK)
    if logits.device.type == "cpu":
        return sample_token_cpu(logits, temperature, top_k, top_p, uniforms)
    return sample_token_reference(logits, temperature, top_k, top_p, uniforms)


@triton.jit
def _logits(row_ptr, start, V, BLOCK: tl.constexpr):
    """Tokens start .. start + BLOCK - 1 of a row: (logits [BLOCK] float32, -inf past V; their ids)."""
    idx = start + tl.arange(0, BLOCK)
    return tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32), idx


@triton.jit
def _row_max_and_total(row_ptr, V, inv_temperature, kth, BLOCK: tl.constexpr):
    """One pass: the row's largest z = logit / temperature (the softmax's shift, so that every e <= 1) and the
    total of e over the tokens the top-k cut keeps. Online softmax: the total so far is kept against the max so
    far, and rescaled when a block raises it, so the row is read once where a max, then a total, read it twice."""
    m = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        logits, _ = _logits(row_ptr, start, V, BLOCK)
        z = logits * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite logit yet (a masked start): 0, not NaN
        total = total * tl.exp(m - shift) + tl.sum(tl.where(logits >= kth, tl.exp(z - shift), 0.0), axis=0)
        m = m_new
    return m, total


@triton.jit
def _weights(row_ptr, start, V, inv_temperature, row_max, kth, cut, BLOCK: tl.constexpr):
    """Tokens start .. start + BLOCK - 1 of a row: (e, bits, idx). e [BLOCK] = exp(logit * inv_temperature - row_max),
    q times its total, is 0 past V, for a logit under kth (the top-k cut: the row's k-th largest logit; -inf: none)
    and where e's float32 pattern (bits, ordered as e is since e >= 0) is under cut (the nucleus's; NO_CUT: none)."""
    logits, idx = _logits(row_ptr, start, V, BLOCK)
    e = tl.exp(logits * inv_temperature - row_max)
    bits = e.to(tl.int32, bitcast=True)
    return tl.where((logits >= kth) & (bits >= cut), e, 0.0), bits, idx


@triton.jit
def _mass_above(row_ptr, V, inv_temperature, row_max, kth, cut, b, BLOCK: tl.constexpr):
    """The sum of e over the row's tokens whose pattern is above b: one pass."""
    total = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        e, bits, _ = _weights(row_ptr, start, V, inv_temperature, row_max, kth, cut, BLOCK)
        total += tl.sum(tl.where(bits > b, e, 0.0), axis=0)
    return total


@triton.jit
def _total(row_ptr, V, inv_temperature, row_max, kth, cut, BLOCK: tl.constexpr):
    """The sum of e over the row (every pattern is above -1): the nucleus's, in the fallback."""
    return _mass_above(row_ptr, V, inv_temperature, row_max, kth, cut, -1, BLOCK)


@triton.jit
def _smallest_bits_below(row_ptr, V, inv_temperature, row_max, kth, cut, limit, BLOCK: tl.constexpr):
    """The smallest pattern b whose mass above it is under limit (> 0). The mass falls as b rises, and +inf's
    pattern has none above it, so 31 halvings of [0, INF_BITS] find b: a pass over the row each."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], INF_BITS, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        under = _mass_above(row_ptr, V, inv_temperature, row_max, kth, cut, mid, BLOCK) < limit
        hi = tl.where(under, mid, hi)
        lo = tl.where(under, lo, mid + 1)
    return hi


@triton.jit
def _inverse_cdf(row_ptr, V, inv_temperature, row_max, kth, cut, target, BLOCK: tl.constexpr):
    """`sample_from` on one row: the first token whose cumulative weight exceeds target (u times the total), never one
    without weight (rounding can put the draw at the very top). Walks the blocks only as far as the one the draw lies
    in, and keeps the block it stops at for the draw's place in it. Returns the token and its e's pattern."""
    run = tl.full([], 0.0, tl.float32)  # the weight of the blocks before `start`
    start = 0
    last_weighted = 0  # the start of the last block seen with any weight
    e, bits, idx = _weights(row_ptr, start, V, inv_temperature, row_max, kth, cut, BLOCK)
    s = tl.sum(e, axis=0)
    while (start + BLOCK < V) & (run + s <= target):  # the draw lies past this block
        last_weighted = tl.where(s > 0, start, last_weighted)
        run += s
        start += BLOCK
        e, bits, idx = _weights(row_ptr, start, V, inv_temperature, row_max, kth, cut, BLOCK)
        s = tl.sum(e, axis=0)
    past_the_end = s == 0  # the draw rounded past the total, and the last block has no weight: take the last token
    if past_the_end:  # with weight, in the last block that had any (read again: this is rare)
        start = last_weighted
        e, bits, idx = _weights(row_ptr, start, V, inv_temperature, row_max, kth, cut, BLOCK)
    below = tl.sum((run + tl.cumsum(e, axis=0) <= target).to(tl.int32), axis=0)  # tokens wholly below the draw
    below = tl.where(past_the_end, BLOCK, below)
    token = tl.minimum(start + below, tl.max(tl.where(e > 0, idx, -1), axis=0))
    return token, tl.max(tl.where(idx == token, bits, 0), axis=0)


@triton.jit
def _sample_token_kernel(logits_ptr, kth_ptr, u_ptr, out_ptr, stride_row, V, inv_temperature, top_p,
                         TOP_K: tl.constexpr, TOP_P: tl.constexpr, PROPOSALS: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    """Program r: out[r] = row r's token. logits [R, V] (row stride stride_row), kth [R] float32 (TOP_K: the row's
    k-th largest logit), u [R, PROPOSALS + 1], out [R] int64. The row is read BLOCK tokens at a time,
    in passes: its max and total (one pass), each proposal's walk to its draw and the mass above it, and only if every
    proposal misses, the nucleus's edge (bisection) and a draw from the nucleus."""
    wait_for_previous_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    u_row = u_ptr + row * (PROPOSALS + 1)
    kth = float("-inf")  # no top-k cut
    if TOP_K:
        kth = tl.load(kth_ptr + row)
    row_max, total = _row_max_and_total(row_ptr, V, inv_temperature, kth, BLOCK)
    token, bits_x = _inverse_cdf(row_ptr, V, inv_temperature, row_max, kth, NO_CUT, tl.load(u_row) * total, BLOCK)
    if TOP_P:
        limit = top_p * total  # the nucleus: tokens with less than this strictly above them
        kept = _mass_above(row_ptr, V, inv_temperature, row_max, kth, NO_CUT, bits_x, BLOCK) < limit
        j = 1
        while (j < PROPOSALS) & (kept == 0):  # proposal j, while none so far lies in the nucleus
            token, bits_x = _inverse_cdf(row_ptr, V, inv_temperature, row_max, kth, NO_CUT,
                                         tl.load(u_row + j) * total, BLOCK)
            kept = _mass_above(row_ptr, V, inv_temperature, row_max, kth, NO_CUT, bits_x, BLOCK) < limit
            j += 1
        if kept == 0:  # every proposal missed: draw from the nucleus itself, as target_probs cuts it
            cut = _smallest_bits_below(row_ptr, V, inv_temperature, row_max, kth, NO_CUT, limit, BLOCK)
            nucleus_total = _total(row_ptr, V, inv_temperature, row_max, kth, cut, BLOCK)
            token, _ = _inverse_cdf(row_ptr, V, inv_temperature, row_max, kth, cut,
                                    tl.load(u_row + PROPOSALS) * nucleus_total, BLOCK)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample_token_triton(logits, temperature: float, top_k: int, top_p: float, uniforms, block: int = BLOCK):
    """Same contract as `sample_token_reference`, in one launch after the top-k cut's torch.topk (when there is one);
    block: tokens a program reads at a time."""
    _check_inputs(logits, temperature, top_k, top_p, uniforms)
    return _sample_token_launch(logits, temperature, top_k, top_p, uniforms, block)


def _check_inputs(logits, temperature: float, top_k: int, top_p: float, uniforms) -> None:
    """What every path refuses alike (the dispatcher's, whichever it takes, and `sample_token_triton`'s)."""
    if not (temperature > 0 and top_k >= 0 and 0 < top_p <= 1):  # (else the kernel would draw token -1 or divide by 0)
        raise KernelInputError(f"sample_token needs temperature > 0, top_k >= 0 and top_p in (0, 1], not "
                               f"{temperature}, {top_k} and {top_p}; decode greedily (argmax) at temperature 0.")
    want = (*logits.shape[:-1], PROPOSALS + 1)
    if uniforms.shape != want or uniforms.device != logits.device:
        raise KernelInputError(f"sample_token needs {PROPOSALS + 1} uniforms for each row of logits "
                               f"{tuple(logits.shape)}, shaped {want} on {logits.device}, not {tuple(uniforms.shape)} "
                               f"on {uniforms.device}.")


def _sample_token_launch(logits, temperature: float, top_k: int, top_p: float, uniforms, block: int):
    """`sample_token_triton` of checked inputs."""
    V = logits.shape[-1]
    rows = logits.reshape(-1, V)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()  # [R, V]
    u = uniforms.reshape(-1, PROPOSALS + 1).float().contiguous()  # [R, PROPOSALS + 1]
    out = torch.empty(logits.shape[:-1], dtype=torch.long, device=logits.device)
    cut_top_k = 0 < top_k < V
    # The top-k cut's edge: each row's k-th largest logit [R]; without a cut the kernel reads none (u stands in).
    kth = rows.topk(top_k, dim=-1).values[:, -1].float().contiguous() if cut_top_k else u
    if rows.shape[0] > 0:
        _sample_token_kernel[(rows.shape[0],)](
            rows, kth, u, out, rows.stride(0), V, 1.0 / temperature, top_p, TOP_K=cut_top_k, TOP_P=top_p < 1.0,
            PROPOSALS=PROPOSALS, BLOCK=block, num_warps=warps(block), **launch_options(rows))
    return out


def warps(block: int) -> int:
    """The kernel's warps for `block` tokens a pass: 16 at BLOCK, where each thread holds 16 tokens."""
    return max(1, min(16, block // 512))

"""Medusa heads: K small networks on one hidden state, each proposing a future token.

Head k computes x <- x + SiLU(W_kl x + b_kl) for each of its L ResBlocks, then logits = V_k x, where
V_k is the head's own vocab projection or the base model's lm_head shared by all heads.
`medusa_topk` returns each head's top-k token ids, which is all a static tree needs; given the heads'
temperatures T_k it also returns their calibrated log-probabilities, log softmax(logits / T_k) at those
ids, which a dynamic tree scores its nodes with (nanomedusa/dynamic_tree.py).

The Triton version never materialises the [K, N, V] logits. Three kernels:
  1. `_resblock_kernel`, once per ResBlock layer, all K heads in one launch: a program owns one head,
     up to ROWS = 16 rows and BLOCK_N output features, streams its [BLOCK_N, D] slice of W through
     `tl.dot`, and applies bias, SiLU and the residual add in the epilogue. (Layers run one launch
     each because layer l+1 needs every feature of layer l.)
  2. `_vocab_topk_kernel`: a program owns a BLOCK_V slice of the vocabulary, computes those logits
     for its rows and writes each row's top-k of the slice (value and id) as candidates. With the
     shared lm_head all K*N rows share one program, so each weight is read once, not K times.
     With temperatures it also writes the slice's share of the log-partition: the max m_s of the
     tempered logits z / T over the slice, and S_s = the sum of exp(z / T - m_s) over it.
  3. `_merge_topk_kernel`: one program per row picks the top-k of its candidates; with temperatures
     it combines the slices' shares, log Z = m + log(sum over s of S_s * exp(m_s - m)) with m the
     largest m_s (as online softmax rescales), and writes z / T - log Z beside each id.
All matrix products accumulate in float32; float32 inputs use exact ("ieee") products, not TF32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError

MAX_TOPK = 16
MAX_CANDIDATES = 8192  # per row, after stage 2: the merge program holds them all in registers
ROWS = 16  # rows per program: tl.dot's smallest tile; decoding has 1 to a few rows per head


def medusa_heads_reference(hidden, res_weight, res_bias, vocab_weight):
    """hidden [N, D]; res_weight [K, L, D, D]; res_bias [K, L, D]; vocab_weight [K, V, D] or shared [V, D]
    -> logits [K, N, V]."""
    K, L = res_weight.shape[:2]
    logits = []
    for k in range(K):
        x = hidden
        for layer in range(L):
            x = x + F.silu(F.linear(x, res_weight[k, layer], res_bias[k, layer]))
        logits.append(F.linear(x, vocab_weight if vocab_weight.dim() == 2 else vocab_weight[k]))
    return torch.stack(logits)


def medusa_topk_reference(hidden, res_weight, res_bias, vocab_weight, topk, temperatures=None):
    """Same inputs as `medusa_heads_reference` -> top-k token ids [K, N, topk] (best first); with
    temperatures [K] (head k's T_k) -> (ids, log-probabilities [K, N, topk] float32), the log-probabilities
    log softmax(logits / T_k) of those ids."""
    logits = medusa_heads_reference(hidden, res_weight, res_bias, vocab_weight)
    if temperatures is None:
        return logits.topk(topk, dim=-1).indices
    top = torch.log_softmax(logits.float() / temperatures.float().view(-1, 1, 1), dim=-1).topk(topk, dim=-1)
    return top.indices, top.values


def medusa_topk(hidden, res_weight, res_bias, vocab_weight, topk, temperatures=None):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(hidden):
        return medusa_topk_triton(hidden, res_weight, res_bias, vocab_weight, topk, temperatures)
    return medusa_topk_reference(hidden, res_weight, res_bias, vocab_weight, topk, temperatures)


@triton.jit
def _resblock_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, stride_xk, stride_wk, stride_bk,
                     D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """out[k, rows, cols] = x[k, rows, cols] + SiLU(x[k, rows, :] @ W[k, cols, :]^T + b[k, cols]).

    Program (k, m, n) owns head k, rows m*BLOCK_M.. and output features n*BLOCK_N.. .
    x: head k's rows start at x_ptr + k * stride_xk, each D contiguous (stride_xk = 0 lets the
    first layer read the one hidden state for every head); W [K, D, D] and b [K, D] with head
    strides stride_wk / stride_bk; out [K, N, D] contiguous. Rounding follows the reference: the
    linear output, the SiLU and the sum are each rounded to the model dtype.
    """
    wait_for_previous_kernels(PDL)
    head, m_block, n_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    x_rows = x_ptr + head * stride_xk + rows[:, None] * D  # [BLOCK_M, 1]
    w_cols = w_ptr + head.to(tl.int64) * stride_wk + cols[None, :] * D  # [1, BLOCK_N]
    row_ok = rows[:, None] < N
    col_ok = cols[None, :] < D

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=row_ok & (ks[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_cols + ks[:, None], mask=(ks[:, None] < D) & col_ok, other=0.0)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    dtype = out_ptr.dtype.element_ty
    bias = tl.load(b_ptr + head * stride_bk + cols, mask=cols < D, other=0.0)  # [BLOCK_N]
    linear = (acc + bias[None, :].to(tl.float32)).to(dtype).to(tl.float32)
    silu = (linear * tl.sigmoid(linear)).to(dtype)
    x_res = tl.load(x_rows + cols[None, :], mask=row_ok & col_ok, other=0.0)  # [BLOCK_M, BLOCK_N]
    out = (x_res.to(tl.float32) + silu.to(tl.float32)).to(dtype)
    tl.store(out_ptr + (head * N + rows[:, None]) * D + cols[None, :], out, mask=row_ok & col_ok)


@triton.jit
def _next_best(values, ids, taken):
    """One step of top-k selection along axis 1 of values, ids, taken [R, B].

    Returns each row's largest value not yet taken [R], its id [R] (the smallest id among equal
    values), and `taken` with that entry marked. ids must be distinct within a row.
    """
    best = tl.max(tl.where(taken, float("-inf"), values), axis=1)  # [R]
    best_id = tl.min(tl.where(~taken & (values == best[:, None]), ids, 2**31 - 1), axis=1)  # [R]
    return best, best_id, taken | (ids == best_id[:, None])


@triton.jit
def _vocab_topk_kernel(x_ptr, w_ptr, cand_values_ptr, cand_ids_ptr, temperatures_ptr, slice_max_ptr, slice_sum_ptr,
                       R, N, stride_xk, stride_wg, num_v_blocks,
                       V: tl.constexpr, D: tl.constexpr, TOPK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       LOG_PARTITION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (g, m, v): the logits of rows m*BLOCK_M.. of group g over vocab slice v, reduced to
    each row's TOPK best of the slice.

    A group is R rows that share one vocab weight [V, D] at w_ptr + g * stride_wg: one head's N rows
    (R = N), or all K*N rows when the heads share the lm_head (stride_wg = 0). Row f = g * R + r is
    position f % N of head f // N in x (head stride stride_xk, rows D contiguous).
    Candidates go to cand_*[f, v * TOPK + i], both [K*N, num_v_blocks * TOPK]. With LOG_PARTITION, the
    slice's max of the tempered logits z / T (T = temperatures[head], float32 [K]) goes to slice_max[f, v]
    and the sum of exp(z / T - max) to slice_sum[f, v], both [K*N, num_v_blocks] float32.
    """
    wait_for_previous_kernels(PDL)
    group, m_block, v_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M], within the group
    flat = group * R + rows  # [BLOCK_M], among all K*N rows
    vocab = v_block * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
    x_rows = x_ptr + (flat // N)[:, None] * stride_xk + (flat % N)[:, None] * D  # [BLOCK_M, 1]
    # int64: K * V * D passes 2**31 for large vocabularies
    w_cols = w_ptr + group.to(tl.int64) * stride_wg + vocab[None, :].to(tl.int64) * D  # [1, BLOCK_V]
    row_ok = rows < R
    vocab_ok = vocab[None, :] < V

    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_cols + ks[:, None], mask=(ks[:, None] < D) & vocab_ok, other=0.0)  # [BLOCK_K, BLOCK_V]
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    # Rank the logits rounded to the model dtype, as the reference's are; padding columns rank last.
    logits = tl.where(vocab_ok, acc.to(x_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
    ids = tl.broadcast_to(vocab[None, :], (BLOCK_M, BLOCK_V))
    taken = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.int1)
    slot = flat * (num_v_blocks * TOPK) + v_block * TOPK  # [BLOCK_M]
    for i in range(TOPK):
        best, best_id, taken = _next_best(logits, ids, taken)
        tl.store(cand_values_ptr + slot + i, best, mask=row_ok)
        tl.store(cand_ids_ptr + slot + i, best_id, mask=row_ok)

    if LOG_PARTITION:  # the slice's share of log sum exp(z / T); padding columns add exp(-inf) = 0
        temperature = tl.load(temperatures_ptr + flat // N, mask=row_ok, other=1.0)  # [BLOCK_M]
        tempered = logits / temperature[:, None]
        top = tl.max(tempered, axis=1)  # [BLOCK_M], finite: a slice holds at least one real column
        tl.store(slice_max_ptr + flat * num_v_blocks + v_block, top, mask=row_ok)
        tl.store(slice_sum_ptr + flat * num_v_blocks + v_block, tl.sum(tl.exp(tempered - top[:, None]), axis=1),
                 mask=row_ok)


@triton.jit
def _merge_topk_kernel(cand_values_ptr, cand_ids_ptr, out_ptr, temperatures_ptr, slice_max_ptr, slice_sum_ptr,
                       logprobs_ptr, C, N, num_v_blocks, TOPK: tl.constexpr, LOG_PARTITION: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """Program f: out[f, :] = the ids of the TOPK best of row f's C candidates, best first.

    cand_* [K*N, C], out [K*N, TOPK] int64. A vocab id appears in one slice only, so the
    candidate ids of a row are distinct. The tile is [1, BLOCK_C] to share `_next_best`.
    With LOG_PARTITION, also logprobs[f, :] = z / T - log Z (float32 [K*N, TOPK]) of those ids, log Z
    combined from the num_v_blocks slices' shares (see `_vocab_topk_kernel`).
    """
    wait_for_previous_kernels(PDL)
    row = tl.program_id(0) + tl.arange(0, 1)  # [1]
    c = tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
    values = tl.load(cand_values_ptr + row[:, None] * C + c, mask=c < C, other=float("-inf"))
    ids = tl.load(cand_ids_ptr + row[:, None] * C + c, mask=c < C, other=2**31 - 1)
    taken = c >= C  # padding lanes are never picked
    if LOG_PARTITION:
        s = tl.arange(0, BLOCK_S)[None, :]  # [1, BLOCK_S]
        slice_max = tl.load(slice_max_ptr + row[:, None] * num_v_blocks + s, mask=s < num_v_blocks,
                            other=float("-inf"))
        slice_sum = tl.load(slice_sum_ptr + row[:, None] * num_v_blocks + s, mask=s < num_v_blocks, other=0.0)
        top = tl.max(slice_max, axis=1)  # [1]
        log_z = top + tl.log(tl.sum(slice_sum * tl.exp(slice_max - top[:, None]), axis=1))  # [1]
        temperature = tl.load(temperatures_ptr + row // N)  # [1]
    for i in range(TOPK):
        best, best_id, taken = _next_best(values, ids, taken)
        tl.store(out_ptr + row * TOPK + i, best_id.to(tl.int64))
        if LOG_PARTITION:
            tl.store(logprobs_ptr + row * TOPK + i, best / temperature - log_z)


def _check_inputs(hidden, res_weight, res_bias, vocab_weight, topk, temperatures=None) -> None:
    K, L, D = res_weight.shape[0], res_weight.shape[1], hidden.shape[-1]
    if hidden.dim() != 2 or res_weight.shape[2:] != (D, D) or res_bias.shape != (K, L, D):
        raise KernelInputError(f"Medusa weights do not fit hidden [N, D={D}]: got res_weight "
                               f"{tuple(res_weight.shape)} and res_bias {tuple(res_bias.shape)}; pass [K, L, D, D] "
                               f"and [K, L, D] stacked weights with a 2-D hidden state.")
    V = vocab_weight.shape[-2]
    if vocab_weight.shape[-1] != D or vocab_weight.dim() == 3 and vocab_weight.shape[0] != K:
        raise KernelInputError(f"the vocab weight {tuple(vocab_weight.shape)} must be [K={K}, V, {D}] or a shared "
                               f"[V, {D}] lm_head.")
    if len({hidden.dtype, res_weight.dtype, res_bias.dtype, vocab_weight.dtype}) != 1:
        raise KernelInputError("the hidden state and every Medusa weight must share one dtype; cast the heads "
                               "to the model's dtype.")
    if not 1 <= topk <= min(MAX_TOPK, V):
        raise KernelInputError(f"the fused Medusa kernel takes top-k between 1 and {min(MAX_TOPK, V)}, not {topk}; "
                               f"use a tree with fewer candidates per head.")
    if temperatures is not None and (temperatures.shape != (K,) or temperatures.device != hidden.device):
        raise KernelInputError(f"temperatures must be one per head, [K={K}], on the hidden state's device; got "
                               f"{tuple(temperatures.shape)} on {temperatures.device}.")


def medusa_topk_triton(hidden, res_weight, res_bias, vocab_weight, topk, temperatures=None):
    """Same contract as `medusa_topk_reference`: L + 2 launches, no [K, N, V] logits."""
    _check_inputs(hidden, res_weight, res_bias, vocab_weight, topk, temperatures)
    K, L = res_weight.shape[:2]
    N, D = hidden.shape
    V = vocab_weight.shape[-2]
    dev, dtype = hidden.device, hidden.dtype
    precision = "ieee" if dtype == torch.float32 else "tf32"  # exact fp32; 16-bit inputs ignore it
    res_weight, res_bias, vocab_weight = res_weight.contiguous(), res_bias.contiguous(), vocab_weight.contiguous()

    # Stage 1: the ResBlocks. Layer 0 reads the one hidden state for every head (head stride 0).
    x, stride_xk = hidden.contiguous(), 0  # x: [K, N, D] viewed through stride_xk
    block_n = 32 if D <= 2048 else 64  # narrower tiles spread a small model's weights over more programs
    for layer in range(L):
        out = torch.empty(K, N, D, dtype=dtype, device=dev)
        grid = (K, triton.cdiv(N, ROWS), triton.cdiv(D, block_n))
        _resblock_kernel[grid](
            x, res_weight[:, layer], res_bias[:, layer], out, N, stride_xk, res_weight.stride(0), res_bias.stride(0),
            D=D, DOT_PRECISION=precision, BLOCK_M=ROWS, BLOCK_N=block_n, BLOCK_K=128, **launch_options(x),
        )
        x, stride_xk = out, N * D

    # Stage 2: vocab slices -> per-slice top-k candidates. The slice widens for big vocabularies so
    # that a row keeps at most MAX_CANDIDATES; the weight tile [BLOCK_K, BLOCK_V] stays near 8192
    # elements (16 KB in bf16 per pipeline stage), with BLOCK_K >= 16 as tl.dot needs.
    block_v = 128
    while triton.cdiv(V, block_v) * topk > MAX_CANDIDATES:
        block_v *= 2
    num_v_blocks = triton.cdiv(V, block_v)
    shared = vocab_weight.dim() == 2
    groups, R = (1, K * N) if shared else (K, N)
    cand_values = torch.empty(K * N, num_v_blocks * topk, dtype=torch.float32, device=dev)
    cand_ids = torch.empty(K * N, num_v_blocks * topk, dtype=torch.int32, device=dev)
    log_partition = temperatures is not None
    if log_partition:  # the slices' shares of each row's log-partition, and its log-probabilities
        temperatures = temperatures.to(torch.float32).contiguous()
        slice_max, slice_sum = torch.empty(2, K * N, num_v_blocks, dtype=torch.float32, device=dev)
        logprobs = torch.empty(K, N, topk, dtype=torch.float32, device=dev)
    else:  # unused pointers: the kernels skip those parts
        temperatures = slice_max = slice_sum = logprobs = cand_values
    _vocab_topk_kernel[(groups, triton.cdiv(R, ROWS), num_v_blocks)](
        x, vocab_weight, cand_values, cand_ids, temperatures, slice_max, slice_sum, R, N, stride_xk,
        0 if shared else V * D, num_v_blocks, V=V, D=D, TOPK=topk, DOT_PRECISION=precision,
        LOG_PARTITION=log_partition, BLOCK_M=ROWS, BLOCK_V=block_v, BLOCK_K=max(16, 8192 // block_v),
        num_warps=4 if block_v <= 128 else 8, **launch_options(x),
    )

    # Stage 3: merge each row's candidates (and its slices' log-partition shares).
    ids = torch.empty(K, N, topk, dtype=torch.long, device=dev)
    block_c = triton.next_power_of_2(num_v_blocks * topk)
    _merge_topk_kernel[(K * N,)](cand_values, cand_ids, ids, temperatures, slice_max, slice_sum, logprobs,
                                 num_v_blocks * topk, N, num_v_blocks, TOPK=topk, LOG_PARTITION=log_partition,
                                 BLOCK_C=block_c, BLOCK_S=triton.next_power_of_2(num_v_blocks),
                                 num_warps=8 if block_c >= 2048 else 4, **launch_options(ids))
    return (ids, logprobs) if log_partition else ids

"""Medusa heads: K small networks on one hidden state, each proposing a future token.

Head k computes x <- x + SiLU(W_kl x + b_kl) for each of its L ResBlocks, then logits = V_k x, where
V_k is the head's own vocab projection or the base model's lm_head shared by all heads.
`medusa_topk` returns each head's top-k token ids, which is all a static tree needs; given the heads'
temperatures T_k it also returns their calibrated log-probabilities, log softmax(logits / T_k) at those
ids, which a dynamic tree scores its nodes with (nanomedusa/dynamic_tree.py).

The Triton version runs three kernels:
  1. `_resblock_kernel`, once per ResBlock layer, all K heads in one launch: a program owns one head,
     up to ROWS = 16 rows and BLOCK_N output features, streams its [BLOCK_N, D] slice of W through
     `tl.dot`, and applies bias, SiLU and the residual add in the epilogue. (Layers run one launch
     each because layer l+1 needs every feature of layer l.)
  2. `_vocab_logits_kernel`: a program owns a BLOCK_V slice of the vocabulary and ROWS to VOCAB_ROWS
     rows, computes those logits, stores them rounded to the model dtype (as the reference ranks them;
     [K*N, V]) and each row's largest of the slice. With the shared lm_head the K*N rows share a program
     (up to VOCAB_ROWS of them), so each weight is read once, not K times. With temperatures it also writes the slice's
     share of the log-partition: the max m_s of the tempered logits z / T over the slice, and S_s = the
     sum of exp(z / T - m_s) over it.
  3. `_topk_kernel`: one program per row. A row's top-k logits lie in the k slices with the largest
     maxima (ties to the earlier slice): any other slice ranks after k slices that each hold a logit
     ranking before all of its own. So the program picks those k slices by their maxima, then the top-k of
     their k * BLOCK_V logits. With temperatures it combines the slices' shares, log Z = m + log(sum over
     s of S_s * exp(m_s - m)) with m the largest m_s (as online softmax rescales), and writes z / T - log Z
     beside each id.
Why not a top-k per slice in stage 2: that selection, k passes over every
logit, cost more than reading the vocab weight; picking slices by one max each leaves k passes over k
slices only (bench/RESULTS.md, "the heads' top-k").
All matrix products accumulate in float32; float32 inputs use exact ("ieee") products, not TF32.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError
from .linear import torch_linear

MAX_TOPK = 16
MAX_SLICES = 4096  # vocab slices per row at most: the top-k program holds every slice's max in registers
ROWS = 16  # rows per program: tl.dot's smallest tile; decoding has 1 to a few rows per head
VOCAB_ROWS = 64  # rows per vocab-slice program at most (a dynamic tree's path-reading heads run on ~60)


def medusa_heads_reference(hidden, res_weight, res_bias, vocab_weight):
    """hidden [N, D]; res_weight [K, L, D, D]; res_bias [K, L, D]; vocab_weight [K, V, D] or shared [V, D]
    -> logits [K, N, V]."""
    K, L = res_weight.shape[:2]
    heads_out = []
    for k in range(K):
        x = hidden
        for layer in range(L):
            x = x + F.silu(torch_linear(x, res_weight[k, layer], res_bias[k, layer]))
        heads_out.append(x)
    if vocab_weight.dim() == 2:  # a shared lm_head: one product over every head's rows reads its weight once
        return torch_linear(torch.stack(heads_out), vocab_weight)
    return torch.stack([torch_linear(x, vocab_weight[k]) for k, x in enumerate(heads_out)])


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
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring); both refuse the same
    inputs, the kernel's top-k limit (MAX_TOPK) too."""
    _check_inputs(hidden, res_weight, res_bias, vocab_weight, topk, temperatures)
    if use_triton(hidden):
        return _medusa_topk_launch(hidden, res_weight, res_bias, vocab_weight, topk, temperatures)
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
def _vocab_logits_kernel(x_ptr, w_ptr, logits_ptr, temperatures_ptr, slice_max_ptr, tempered_max_ptr, slice_sum_ptr,
                         R, N, stride_xk, stride_wg, num_v_blocks,
                         V: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr, LOG_PARTITION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (g, m, v): the logits of rows m*BLOCK_M.. of group g over vocab slice v, and each row's max of them.

    A group is R rows that share one vocab weight [V, D] at w_ptr + g * stride_wg: one head's N rows
    (R = N), or all K*N rows when the heads share the lm_head (stride_wg = 0). Row f = g * R + r is
    position f % N of head f // N in x (head stride stride_xk, rows D contiguous).
    The logits, rounded to x's dtype, go to logits[f, :] ([K*N, V]) and their max to slice_max[f, v]
    ([K*N, num_v_blocks] float32). With LOG_PARTITION, the max m of the tempered logits z / T over the slice
    (T = temperatures[head], float32 [K]) goes to tempered_max[f, v] and the sum of exp(z / T - m) to
    slice_sum[f, v], both [K*N, num_v_blocks] float32.
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

    # The logits rounded to the model dtype, as the reference's are; padding columns rank last.
    rounded = acc.to(x_ptr.dtype.element_ty)
    tl.store(logits_ptr + flat[:, None].to(tl.int64) * V + vocab[None, :], rounded, mask=row_ok[:, None] & vocab_ok)
    logits = tl.where(vocab_ok, rounded.to(tl.float32), float("-inf"))
    top = tl.max(logits, axis=1)  # [BLOCK_M], finite: a slice holds at least one real column
    tl.store(slice_max_ptr + flat * num_v_blocks + v_block, top, mask=row_ok)
    if LOG_PARTITION:  # the slice's share of log sum exp(z / T); padding columns add exp(-inf) = 0
        temperature = tl.load(temperatures_ptr + flat // N, mask=row_ok, other=1.0)  # [BLOCK_M]
        tempered = logits / temperature[:, None]
        tempered_top = tl.max(tempered, axis=1)  # [BLOCK_M]
        tl.store(tempered_max_ptr + flat * num_v_blocks + v_block, tempered_top, mask=row_ok)
        tl.store(slice_sum_ptr + flat * num_v_blocks + v_block,
                 tl.sum(tl.exp(tempered - tempered_top[:, None]), axis=1), mask=row_ok)


TAKEN = tl.constexpr(2**63 - 1)  # a rank key above every real one (see _rank_keys)


@triton.jit
def _rank_keys(values, ids, real):
    """float32 values and int32 ids >= 0, real [R, B] -> int64 keys [R, B] whose ascending order is (value
    descending, id ascending), TAKEN where not real: one min reduction then finds a row's best, ties to the
    smaller id, where a max and a min would take two. ids must be distinct within a row."""
    values = tl.where(values == 0.0, 0.0, values)  # -0.0 ties +0.0, as float comparison has it
    bits = values.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # the float order, as integers
    return tl.where(real, ((-ordered) << 32) + ids, TAKEN)


@triton.jit
def _pop_best(keys):
    """keys [R, B] (from _rank_keys) -> each row's best value [R] float32 and id [R] int32 (-1 when every lane is
    TAKEN), and keys with that lane TAKEN."""
    best = tl.min(keys, axis=1)  # [R]
    ordered = (-(best >> 32)).to(tl.int32)
    value = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
    return value, (best & 0xFFFFFFFF).to(tl.int32), tl.where(keys == best[:, None], TAKEN, keys)


@triton.jit
def _topk_kernel(logits_ptr, slice_max_ptr, out_ptr, temperatures_ptr, tempered_max_ptr, slice_sum_ptr, logprobs_ptr,
                 N, num_v_blocks, V: tl.constexpr, TOPK: tl.constexpr, LOG_PARTITION: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
    """Program f: out[f, :] = the ids of the TOPK best of row f's logits, best first (ties: the smaller id).

    logits [K*N, V] (stage 2's), slice_max [K*N, num_v_blocks] float32, out [K*N, TOPK] int64. First the
    TOPK slices with the largest maxima (ties: the earlier slice; see the module docstring for why the row's
    TOPK best lie in them), then the TOPK best of their logits, a [1, BLOCK_T * BLOCK_V] tile. With
    LOG_PARTITION, also logprobs[f, :] = z / T - log Z (float32 [K*N, TOPK]) of those ids, log Z combined
    from the num_v_blocks slices' shares (see `_vocab_logits_kernel`).
    """
    wait_for_previous_kernels(PDL)
    row = tl.program_id(0) + tl.arange(0, 1)  # [1]
    s = tl.arange(0, BLOCK_S)[None, :]  # [1, BLOCK_S]
    slice_ok = s < num_v_blocks
    slice_max = tl.load(slice_max_ptr + row[:, None] * num_v_blocks + s, mask=slice_ok, other=float("-inf"))
    keys = _rank_keys(slice_max, s, slice_ok)
    t = tl.arange(0, BLOCK_T)  # [BLOCK_T]
    chosen = tl.full([BLOCK_T], -1, tl.int32)  # the slices picked, best first; -1: none (fewer slices than TOPK)
    for i in range(TOPK):
        _, best_slice, keys = _pop_best(keys)  # [1]
        chosen = tl.where(t == i, best_slice, chosen)

    # The picked slices' logits and their ids, [BLOCK_T, BLOCK_V], ranked as one row.
    ids = tl.maximum(chosen, 0)[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    real = (chosen >= 0)[:, None] & (ids < V)
    values = tl.load(logits_ptr + row.to(tl.int64) * V + ids, mask=real, other=0.0).to(tl.float32)
    keys = tl.reshape(_rank_keys(values, ids, real), [1, BLOCK_T * BLOCK_V])
    if LOG_PARTITION:
        temperature = tl.load(temperatures_ptr + row // N)  # [1]
        tempered_max = tl.load(tempered_max_ptr + row[:, None] * num_v_blocks + s, mask=slice_ok, other=float("-inf"))
        slice_sum = tl.load(slice_sum_ptr + row[:, None] * num_v_blocks + s, mask=slice_ok, other=0.0)
        top = tl.max(tempered_max, axis=1)  # [1]
        log_z = top + tl.log(tl.sum(slice_sum * tl.exp(tempered_max - top[:, None]), axis=1))  # [1]
    for i in range(TOPK):
        best, best_id, keys = _pop_best(keys)
        tl.store(out_ptr + row * TOPK + i, best_id.to(tl.int64))
        if LOG_PARTITION:
            tl.store(logprobs_ptr + row * TOPK + i, best / temperature - log_z)


def _check_inputs(hidden, res_weight, res_bias, vocab_weight, topk, temperatures=None) -> None:
    if hidden.dim() != 2 or res_weight.dim() != 4 or res_weight.shape[0] == 0:
        raise KernelInputError(f"Medusa heads take a 2-D hidden state [N, D] and stacked weights [K >= 1, L, D, D]; "
                               f"got hidden {tuple(hidden.shape)} and res_weight {tuple(res_weight.shape)}.")
    K, L, D = res_weight.shape[0], res_weight.shape[1], hidden.shape[-1]
    if res_weight.shape[2:] != (D, D) or res_bias.shape != (K, L, D):
        raise KernelInputError(f"Medusa weights do not fit hidden [N, D={D}]: got res_weight "
                               f"{tuple(res_weight.shape)} and res_bias {tuple(res_bias.shape)}; pass [K, L, D, D] "
                               f"and [K, L, D] stacked weights with a 2-D hidden state.")
    shared = vocab_weight.dim() == 2
    if not (shared or vocab_weight.dim() == 3 and vocab_weight.shape[0] == K) or vocab_weight.shape[-1] != D:
        raise KernelInputError(f"the vocab weight {tuple(vocab_weight.shape)} must be [K={K}, V, {D}] or a shared "
                               f"[V, {D}] lm_head.")
    if len({hidden.dtype, res_weight.dtype, res_bias.dtype, vocab_weight.dtype}) != 1:
        raise KernelInputError("the hidden state and every Medusa weight must share one dtype; cast the heads "
                               "to the model's dtype.")
    V = vocab_weight.shape[-2]
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or not 1 <= topk <= min(MAX_TOPK, V):
        raise KernelInputError(f"Medusa heads give a top-k between 1 and {min(MAX_TOPK, V)} (the fused kernel's limit, "
                               f"kept on every device), not {topk!r}; use a tree with fewer candidates per head.")
    if temperatures is not None and (temperatures.shape != (K,) or temperatures.device != hidden.device):
        raise KernelInputError(f"temperatures must be one per head, [K={K}], on the hidden state's device; got "
                               f"{tuple(temperatures.shape)} on {temperatures.device}.")


def medusa_topk_triton(hidden, res_weight, res_bias, vocab_weight, topk, temperatures=None):
    """Same contract as `medusa_topk_reference`: L + 2 launches; the [K*N, V] logits in the model dtype, as the
    reference's."""
    _check_inputs(hidden, res_weight, res_bias, vocab_weight, topk, temperatures)
    return _medusa_topk_launch(hidden, res_weight, res_bias, vocab_weight, topk, temperatures)


def _medusa_topk_launch(hidden, res_weight, res_bias, vocab_weight, topk, temperatures):
    """`medusa_topk_triton` of checked inputs."""
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

    # Stage 2: the logits [K*N, V], and each row's max of each vocab slice. The slice widens for big
    # vocabularies so that a row has at most MAX_SLICES; the weight tile [BLOCK_K, BLOCK_V] stays near
    # 8192 elements (16 KB in bf16 per pipeline stage), with BLOCK_K >= 16 as tl.dot needs.
    block_v = 128
    while triton.cdiv(V, block_v) > MAX_SLICES:
        block_v *= 2
    num_v_blocks = triton.cdiv(V, block_v)
    shared = vocab_weight.dim() == 2
    groups, R = (1, K * N) if shared else (K, N)
    logits = torch.empty(K * N, V, dtype=dtype, device=dev)
    slice_max = torch.empty(K * N, num_v_blocks, dtype=torch.float32, device=dev)
    log_partition = temperatures is not None
    if log_partition:  # the slices' shares of each row's log-partition, and its log-probabilities
        temperatures = temperatures.to(torch.float32).contiguous()
        tempered_max, slice_sum = torch.empty(2, K * N, num_v_blocks, dtype=torch.float32, device=dev)
        logprobs = torch.empty(K, N, topk, dtype=torch.float32, device=dev)
    else:  # unused pointers: the kernels skip those parts
        temperatures = tempered_max = slice_sum = logprobs = slice_max
    # Many rows (a path-reading proposal's parents) share a program, so each slice of the weight is read once
    block_m = min(max(ROWS, triton.next_power_of_2(R)), VOCAB_ROWS)
    _vocab_logits_kernel[(groups, triton.cdiv(R, block_m), num_v_blocks)](
        x, vocab_weight, logits, temperatures, slice_max, tempered_max, slice_sum, R, N, stride_xk,
        0 if shared else V * D, num_v_blocks, V=V, D=D, DOT_PRECISION=precision, LOG_PARTITION=log_partition,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=max(16, 8192 // block_v),
        num_warps=4 if block_v * block_m <= 128 * ROWS else 8, **launch_options(x),
    )

    # Stage 3: each row's top-k, from the top-k slices by their maxima (and its log-partition).
    ids = torch.empty(K, N, topk, dtype=torch.long, device=dev)
    block_t = triton.next_power_of_2(topk)
    _topk_kernel[(K * N,)](logits, slice_max, ids, temperatures, tempered_max, slice_sum, logprobs, N, num_v_blocks,
                           V=V, TOPK=topk, LOG_PARTITION=log_partition, BLOCK_V=block_v,
                           BLOCK_S=triton.next_power_of_2(num_v_blocks), BLOCK_T=block_t,
                           num_warps=8 if block_t * block_v >= 2048 else 4, **launch_options(ids))
    return (ids, logprobs) if log_partition else ids

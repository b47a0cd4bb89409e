"""RoPE on q and k, fused with writing the new keys/values into the KV cache.

`rope_and_cache(q, k, v, cos, sin, kv_cache_layer, prefix_len)` takes the projections in their natural
layout, q [B, T, Hq, D] and k, v [B, T, Hkv, D], and the RoPE tables already gathered for the tokens'
positions, cos and sin [T, D] (or [B, T, D] when rows differ), float32. It rotates q and k with Hugging
Face's rotate-half convention, x * cos + rotate_half(x) * sin, computed in float32 and rounded once to
the model dtype; writes rotated k and raw v into cache slots prefix_len .. prefix_len+T-1 of
kv_cache_layer [2, B, Hkv, S, D]; and returns rotated q as [B, Hq, T, D] contiguous, the layout
tree attention reads. `prefix_len` may be a Python int or a 0-d integer tensor on the device (read
in-kernel: no host sync, so the step can be captured in a CUDA graph).

At batch 1 a decode step is bound by kernel launches, not bytes: done in torch this is ~14 launches
per layer (mul, neg, cat, mul, add for each of q and k, the slot arange, two index_copy_). The Triton
version is one launch with one program per (batch * token, block of heads) over the Hq query heads
followed by the Hkv key/value heads. A query program rotates its rows into the output; a key/value
program rotates the key rows and copies the value rows into the cache slot. Each row is read as its
two halves, so the rotation needs no shuffle: out1 = x1 cos1 - x2 sin1, out2 = x2 cos2 + x1 sin2.

Where the fused q/k/v projection's tiles hold whole heads (a 7B's), the same work runs in that projection's epilogue
instead (`rope_and_cache_tile`, called by kernels/linear.py's `linear_rope_and_cache`), and no kernel of this module
runs: the projection's program has the head's two halves in its output tile already. Same roundings, same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .checks import checked_prefix_len
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, T, H, D]; cos, sin [T, D] or [B, T, D] -> x rotated, in x's dtype.

    With float32 tables the products and the sum are float32 (type promotion) and round once."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def rope_and_cache_reference(q, k, v, cos, sin, kv_cache_layer, prefix_len):
    """q [B, T, Hq, D]; k, v [B, T, Hkv, D]; cos, sin [T, D] or [B, T, D] float32; kv_cache_layer
    [2, B, Hkv, S, D] (written in place) -> rotated q [B, Hq, T, D] contiguous."""
    prefix_len = _check_inputs(q, k, v, cos, sin, kv_cache_layer, prefix_len)
    slots = prefix_len + torch.arange(q.shape[1], device=q.device)  # [T]
    kv_cache_layer[0].index_copy_(2, slots, apply_rope(k, cos, sin).transpose(1, 2))
    kv_cache_layer[1].index_copy_(2, slots, v.transpose(1, 2))
    return apply_rope(q, cos, sin).transpose(1, 2).contiguous()


def rope_and_cache(q, k, v, cos, sin, kv_cache_layer, prefix_len):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(q):
        return rope_and_cache_triton(q, k, v, cos, sin, kv_cache_layer, prefix_len)
    return rope_and_cache_reference(q, k, v, cos, sin, kv_cache_layer, prefix_len)


@triton.jit
def _rotate_rows(src, dst, cos_row, sin_row, d, ok, HALF, mask):
    """dst[h, 0:D] = rotate(src[h, 0:D]) for a block of head rows: src and dst [HEADS] row pointers, d [BLOCK_HALF];
    the two halves are read separately (no shuffle)."""
    x1 = tl.load(src[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)  # [HEADS, BLOCK_HALF]
    x2 = tl.load(src[:, None] + HALF + d[None, :], mask=ok, other=0.0).to(tl.float32)
    d_ok = d < HALF
    c1, c2 = tl.load(cos_row + d, mask=d_ok, other=0.0), tl.load(cos_row + HALF + d, mask=d_ok, other=0.0)
    s1, s2 = tl.load(sin_row + d, mask=d_ok, other=0.0), tl.load(sin_row + HALF + d, mask=d_ok, other=0.0)
    tl.store(dst[:, None] + d[None, :], (x1 * c1[None, :] - x2 * s1[None, :]).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst[:, None] + HALF + d[None, :], (x2 * c2[None, :] + x1 * s2[None, :]).to(dst.dtype.element_ty),
             mask=mask)


@triton.jit
def rope_and_cache_tile(y, rows, first_head, M, cos_ptr, sin_ptr, q_out_ptr, cache_ptr, prefix_len, T, S, n_q_heads,
                        n_kv_heads, stride_cb, PREFIX_IS_PTR: tl.constexpr, HEADS: tl.constexpr,
                        HEAD_DIM: tl.constexpr):
    """`rope_and_cache` of a tile of the fused q/k/v projection's output, in that projection's epilogue
    (kernels/linear.py): y [BLOCK_M, HEADS * HEAD_DIM] (the projection's rounded output) holds whole heads, head
    slots first_head .. first_head + HEADS of rows `rows` (row r: token r % T of batch row r // T; rows >= M are
    padding). Head slot h < n_q_heads is query head h, then come n_kv_heads key heads and n_kv_heads value heads.
    Query heads go rotated to q_out [B, Hq, T, HEAD_DIM], key heads rotated and value heads as they are to cache
    slot prefix_len + t of cache [2, B, Hkv, S, HEAD_DIM] (contiguous); cos, sin [T, HEAD_DIM] (stride_cb 0) or
    [B, T, HEAD_DIM], contiguous float32. The same rounding as the standalone kernel: the projection's output is
    rounded to its dtype first, rotated in float32 and rounded once."""
    HALF: tl.constexpr = HEAD_DIM // 2
    BLOCK_M: tl.constexpr = y.shape[0]
    # Each head's two halves side by side: [BLOCK_M, HEADS, 2, HALF] -> [BLOCK_M, HEADS, HALF, 2] -> split.
    x1, x2 = tl.split(tl.permute(tl.reshape(y.to(tl.float32), [BLOCK_M, HEADS, 2, HALF]), [0, 1, 3, 2]))
    row_ok = rows < M
    b, t = (rows // T).to(tl.int64), rows % T  # [BLOCK_M]
    d = tl.arange(0, HALF)
    head = first_head + tl.arange(0, HEADS)  # [HEADS] head slots
    # the tables' rows, read once for each head of the tile (the same addresses): loaded in x1's shape and layout
    table = (b * stride_cb + t * HEAD_DIM)[:, None, None] + (head * 0)[None, :, None] + d[None, None, :]
    table_ok = row_ok[:, None, None]
    c1 = tl.load(cos_ptr + table, mask=table_ok, other=0.0)  # [BLOCK_M, HEADS, HALF]
    c2 = tl.load(cos_ptr + table + HALF, mask=table_ok, other=0.0)
    s1 = tl.load(sin_ptr + table, mask=table_ok, other=0.0)
    s2 = tl.load(sin_ptr + table + HALF, mask=table_ok, other=0.0)
    # (the very expressions of _rotate_rows, which the standalone kernel computes: the same bits, tests check; a
    # helper shared by the two kernels cost the standalone one's program 0.6% of a SmolLM2-135M tree step)
    out1, out2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2  # [BLOCK_M, HEADS, HALF]
    is_q, is_v = head < n_q_heads, head >= n_q_heads + n_kv_heads
    out1 = tl.where(is_v[None, :, None], x1, out1)  # value heads: not rotated (x1, x2: exact copies of y)
    out2 = tl.where(is_v[None, :, None], x2, out2)
    if PREFIX_IS_PTR:
        slot = tl.load(prefix_len).to(tl.int32) + t  # read on the device: no host sync, graph-capturable
    else:
        slot = prefix_len + t
    kv_head = tl.where(is_v, head - n_kv_heads, head) - n_q_heads  # [HEADS]
    q_row = ((b[:, None] * n_q_heads + head[None, :]) * T + t[:, None]) * HEAD_DIM  # [BLOCK_M, HEADS]
    # cache[0 (k) / 1 (v), b, kv_head, slot]: cache[1] starts B * Hkv * S * HEAD_DIM elements after cache[0]
    kv_row = ((is_v.to(tl.int64)[None, :] * (M // T) + b[:, None]) * n_kv_heads + kv_head[None, :]) * S
    kv_row = (kv_row + slot[:, None]) * HEAD_DIM
    dst = tl.where(is_q[None, :], q_out_ptr + q_row, cache_ptr + kv_row)  # [BLOCK_M, HEADS]
    # A device prefix_len is not checked on the host: never write outside the cache.
    in_cache = (slot >= 0) & (slot < S)
    ok = row_ok[:, None] & (head < n_q_heads + 2 * n_kv_heads)[None, :] & (is_q[None, :] | in_cache[:, None])
    tl.store(dst[:, :, None] + d[None, None, :], out1.to(y.dtype), mask=ok[:, :, None])
    tl.store(dst[:, :, None] + HALF + d[None, None, :], out2.to(y.dtype), mask=ok[:, :, None])


@triton.jit
def _rope_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, cache_ptr, prefix_len,
    T, S, HALF, n_q_heads, n_kv_heads,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_kv, stride_cacheb, stride_cacheh, stride_caches,
    PREFIX_IS_PTR: tl.constexpr, HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
):
    """One (batch * token, block of HEADS heads): blocks below cdiv(Hq, HEADS) hold query heads, the rest
    key/value heads."""
    wait_for_previous_kernels(PDL)
    bt, block = tl.program_id(0), tl.program_id(1)
    b, t = (bt // T).to(tl.int64), bt % T  # int64: batch offsets can pass 2**31 in a large cache
    d = tl.arange(0, BLOCK_HALF)
    cos_row = cos_ptr + b * stride_cb + t * stride_ct  # stride_cb is 0 for tables shared by the batch
    sin_row = sin_ptr + b * stride_cb + t * stride_ct
    q_blocks = tl.cdiv(n_q_heads, HEADS)
    if block < q_blocks:  # query heads: out[b, head, t, :], out contiguous [B, Hq, T, D]
        heads = block * HEADS + tl.arange(0, HEADS)  # [HEADS]
        ok = (heads < n_q_heads)[:, None] & (d < HALF)[None, :]
        dst = q_out_ptr + ((b * n_q_heads + heads) * T + t) * (2 * HALF)
        _rotate_rows(q_ptr + b * stride_qb + t * stride_qt + heads * stride_qh, dst, cos_row, sin_row, d, ok, HALF, ok)
    else:  # key/value heads: cache[0 (k) / 1 (v), b, kv_head, prefix + t, :]
        heads = (block - q_blocks) * HEADS + tl.arange(0, HEADS)
        ok = (heads < n_kv_heads)[:, None] & (d < HALF)[None, :]
        if PREFIX_IS_PTR:
            slot = tl.load(prefix_len).to(tl.int32) + t  # read on the device: no host sync, graph-capturable
        else:
            slot = prefix_len + t
        in_cache = ok & (slot >= 0) & (slot < S)  # a device prefix_len is not checked on the host: never overrun
        dst = cache_ptr + b * stride_cacheb + heads * stride_cacheh + slot.to(tl.int64) * stride_caches
        _rotate_rows(k_ptr + b * stride_kb + t * stride_kt + heads * stride_kh, dst, cos_row, sin_row, d, ok, HALF,
                     in_cache)
        v_src = v_ptr + b * stride_vb + t * stride_vt + heads * stride_vh
        for half in tl.static_range(2):
            col = half * HALF + d[None, :]
            tl.store(dst[:, None] + stride_kv + col, tl.load(v_src[:, None] + col, mask=ok), mask=in_cache)


def _check_inputs(q, k, v, cos, sin, kv_cache_layer, prefix_len):
    """The checks of `rope_and_cache`'s inputs -> prefix_len as the kernels take it (`checked_prefix_len`)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise KernelInputError(f"rope_and_cache got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                               f"pass q [B, T, Hq, D] and k, v [B, T, Hkv, D] (the projections viewed per head).")
    B, T, _, D = q.shape
    if not (q.dtype == k.dtype == v.dtype):
        raise KernelInputError(f"rope_and_cache needs q, k and v in one dtype, got {q.dtype}, {k.dtype} and {v.dtype}.")
    return check_rope_and_cache_inputs(B, T, k.shape[2], D, q.dtype, cos, sin, kv_cache_layer, prefix_len)


def check_rope_and_cache_inputs(B, T, Hkv, D, dtype, cos, sin, kv_cache_layer, prefix_len):
    """The checks of what `rope_and_cache` takes besides q, k and v, for B x T tokens of Hkv KV heads of head_dim D
    in `dtype` (also for a projection that rotates in its epilogue: kernels/linear.py) -> prefix_len as the kernels
    take it (`checked_prefix_len`)."""
    if D % 2:
        raise KernelInputError(f"RoPE rotates pairs of dimensions, so head_dim must be even, not {D}.")
    if cos.shape != sin.shape or cos.shape not in ((T, D), (B, T, D)):
        raise KernelInputError(f"rope_and_cache needs cos and sin shaped ({T}, {D}) or ({B}, {T}, {D}); "
                               f"got {tuple(cos.shape)} and {tuple(sin.shape)}.")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise KernelInputError(f"rope_and_cache needs float32 cos/sin tables, got {cos.dtype} and {sin.dtype}; "
                               f"pass the model's rope tables uncast.")
    if kv_cache_layer.dim() != 5 or kv_cache_layer.shape[:3] != (2, B, Hkv) or kv_cache_layer.shape[4] != D:
        raise KernelInputError(f"rope_and_cache needs a layer cache shaped [2, {B}, {Hkv}, S, {D}], got "
                               f"{tuple(kv_cache_layer.shape)}; pass model.kv_cache[layer].")
    if kv_cache_layer.dtype != dtype:
        raise KernelInputError(f"rope_and_cache needs the projections and the cache in one dtype, got {dtype} "
                               f"projections and a {kv_cache_layer.dtype} cache; cast the cache to the model dtype.")
    return checked_prefix_len("rope_and_cache", prefix_len, kv_cache_layer.device, T, kv_cache_layer.shape[3])


# Head rows per program: a 7B's 32 query and 32 key/value heads are 8 programs per token (a 64-node tree step: 512,
# where one program per head row made 4,096, each too small to cover its own launch and wait).
HEADS_PER_PROGRAM = 8


def rope_and_cache_triton(q, k, v, cos, sin, kv_cache_layer, prefix_len):
    """Same contract as rope_and_cache_reference, in one launch: one program per (batch * token, block of
    HEADS_PER_PROGRAM heads)."""
    prefix_len = _check_inputs(q, k, v, cos, sin, kv_cache_layer, prefix_len)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache_layer.stride(-1) != 1:
        raise KernelInputError("rope_and_cache needs q, k, v and the cache contiguous along head_dim; "
                               "view the projections' outputs as [B, T, H, D] without transposing.")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    cos, sin = cos.contiguous(), sin.contiguous()  # no-ops for tables gathered by indexing
    q_out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    if B * T == 0:
        return q_out
    per_row = cos.dim() == 3
    heads = min(HEADS_PER_PROGRAM, triton.next_power_of_2(max(Hq, Hkv)))
    _rope_and_cache_kernel[(B * T, triton.cdiv(Hq, heads) + triton.cdiv(Hkv, heads))](
        q, k, v, cos, sin, q_out, kv_cache_layer, prefix_len,
        T, kv_cache_layer.shape[3], D // 2, Hq, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        cos.stride(0) if per_row else 0, cos.stride(-2),
        kv_cache_layer.stride(0), kv_cache_layer.stride(1), kv_cache_layer.stride(2), kv_cache_layer.stride(3),
        PREFIX_IS_PTR=isinstance(prefix_len, torch.Tensor), HEADS=heads, BLOCK_HALF=triton.next_power_of_2(D // 2),
        num_warps=1, **launch_options(q),  # a block is at most a few thousand elements
    )
    return q_out

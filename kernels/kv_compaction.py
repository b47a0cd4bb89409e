"""KV compaction: after a Medusa step, move the accepted tree nodes' keys/values into place.

The tree step wrote node j's K/V of every layer at cache slot prefix_len + j. Of those, the nodes on
the accepted path (`accepted` [A], node indices: the root first, then ascending, then 0s where a path
shorter than the tree's depth is padded with the root) must end up at slots prefix_len .. prefix_len + A - 1;
the padding's copies land past the new prefix, on free slots, and the other nodes' entries are simply left to
be overwritten.
The whole cache is one tensor [n_layers, 2, B, Hkv, S, D], so one launch moves every layer.

The Triton version runs one program per (layer, k-or-v, batch, kv head): it gathers the A accepted
rows of its [S, D] slab into registers, waits for the whole program to have read them, then writes
them to their new slots. `prefix_len` may be a Python int or a 0-d device tensor (read in-kernel, so
the step needs no host sync and can be captured in a CUDA graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .checks import checked_prefix_len, is_integer_dtype
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError


def compact_kv_reference(kv, prefix_len, accepted):
    """kv [L, 2, B, Hkv, S, D] (in place); accepted [A] long node indices -> None. A node whose slot lies outside
    the cache moves nothing, as in the kernel: node indices live on the device, where checking them would cost a
    host sync each step (the engine's come from its own tree, always in range)."""
    src = prefix_len + accepted
    dst = prefix_len + torch.arange(accepted.numel(), device=kv.device)
    src = torch.where((src >= 0) & (src < kv.shape[4]), src, dst)  # (a row copied onto itself: no move)
    kv.index_copy_(4, dst, kv.index_select(4, src))


def compact_kv(kv, prefix_len, accepted):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring), each after the same
    input checks."""
    prefix_len = _check_inputs(kv, prefix_len, accepted)
    if use_triton(kv):
        return _compact_kv_launch(kv, prefix_len, accepted)
    return compact_kv_reference(kv, prefix_len, accepted)


@triton.jit
def _compact_kv_kernel(
    kv_ptr, prefix_len, accepted_ptr, A, S, D, batch, n_kv_heads,
    stride_l, stride_c, stride_b, stride_h, stride_s,
    PREFIX_IS_PTR: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """One (layer, k/v, batch, kv head): slab[prefix + i] = slab[prefix + accepted[i]] for i < A."""
    wait_for_previous_kernels(PDL)
    pid = tl.program_id(0)
    head = pid % n_kv_heads
    b = (pid // n_kv_heads) % batch
    kv_half = (pid // (n_kv_heads * batch)) % 2
    layer = pid // (n_kv_heads * batch * 2)
    slab = (kv_ptr + layer.to(tl.int64) * stride_l + kv_half.to(tl.int64) * stride_c
            + b.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h)  # this program's [S, D] rows
    if PREFIX_IS_PTR:
        prefix = tl.load(prefix_len)  # read on the device: no host sync, graph-capturable
    else:
        prefix = prefix_len

    i = tl.arange(0, BLOCK_A)
    node = tl.load(accepted_ptr + i, mask=i < A, other=0)  # [BLOCK_A] int64
    src = prefix + node
    dst = prefix + i
    # Rows already in place (typically the root and the first few nodes) need no traffic.
    moves = (i < A) & (node != i) & (src >= 0) & (src < S) & (dst < S)
    d = tl.arange(0, BLOCK_D)
    mask = moves[:, None] & (d < D)[None, :]
    rows = tl.load(slab + src[:, None] * stride_s + d[None, :], mask=mask)  # [BLOCK_A, BLOCK_D]
    # Sources and destinations overlap: with accepted = [0, 1, 3, 4], slot 3 is read as row 2's source
    # and written as row 3's destination. One thread copying rows in ascending order would be safe (row i's
    # store lands on prefix+i, below every later path node's source prefix+accepted[k] >= prefix+k; the padding
    # reads the root's slot, which no row writes), but Triton spreads a tile's rows over many threads, in no
    # order we control, and may even replicate elements. So: every thread finishes its loads, the CTA barrier
    # (which also orders memory) waits for all of them, and only then does anyone store.
    tl.debug_barrier()
    tl.store(slab + dst[:, None] * stride_s + d[None, :], rows, mask=mask)


def compact_kv_triton(kv, prefix_len, accepted):
    """Same contract as compact_kv_reference: one launch for every layer, K and V, batch row and head."""
    prefix_len = _check_inputs(kv, prefix_len, accepted)
    return _compact_kv_launch(kv, prefix_len, accepted)


def _check_inputs(kv, prefix_len, accepted):
    """What every path refuses alike -> prefix_len as the kernel takes it (`checked_prefix_len`)."""
    if kv.dim() != 6 or kv.shape[1] != 2:
        raise KernelInputError(f"compact_kv needs a cache shaped [L, 2, B, Hkv, S, D]; got shape {tuple(kv.shape)}.")
    if accepted.dim() != 1 or accepted.device != kv.device or not is_integer_dtype(accepted.dtype):
        raise KernelInputError(f"compact_kv needs `accepted` as a 1-d integer index tensor on the cache's device; got "
                               f"a {accepted.dtype} tensor of shape {tuple(accepted.shape)} on {accepted.device}.")
    return checked_prefix_len("compact_kv", prefix_len, kv.device, accepted.numel(), kv.shape[4])


def _compact_kv_launch(kv, prefix_len, accepted):
    """`compact_kv_triton` of checked inputs."""
    if kv.stride(-1) != 1:  # (the torch path takes any layout)
        raise KernelInputError(f"compact_kv needs a cache contiguous along D; got strides {kv.stride()}.")
    L, _, B, Hkv, S, D = kv.shape
    accepted = accepted.contiguous()  # e.g. a slice of a strided index table; the kernel reads it densely
    A = accepted.numel()
    if A == 0:
        return
    _compact_kv_kernel[(L * 2 * B * Hkv,)](
        kv, prefix_len, accepted, A, S, D, B, Hkv,
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), kv.stride(4),
        PREFIX_IS_PTR=isinstance(prefix_len, torch.Tensor),
        BLOCK_A=triton.next_power_of_2(A), BLOCK_D=max(16, triton.next_power_of_2(D)),
        num_warps=4, **launch_options(kv),
    )

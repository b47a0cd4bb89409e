"""The fused RoPE + KV-cache-write kernel against its torch reference (kernels/rope_cache.py).

Without a GPU the kernel runs in Triton's CPU interpreter: fp32 and fp16 (bf16 is broken in the
interpreter, so it is only checked on CUDA). The cache starts as NaN and the op's allocations are
poisoned with NaN, so a slot written that should not be, or an output element never written, shows up.
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, i.e. when kernels/ is imported:
    # this must be set before that import.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels.errors import KernelInputError  # noqa: E402
from kernels.rope_cache import rope_and_cache_reference, rope_and_cache_triton, rotate_half  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
S = 23  # cache slots


def rope_tables(positions, D):
    """float32 cos, sin [*positions.shape, D] as the model builds them (theta 10000, rotate-half layout)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device=DEVICE) / D)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def make_case(B, T, Hq, Hkv, D, prefix, per_row, dtype):
    """q, k, v as the model makes them (per-head views of one fused projection output, so strided), the
    RoPE tables for positions prefix + t (shifted per row when per_row) and a NaN-filled cache."""
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, device=DEVICE)
    q = qkv[..., :Hq * D].view(B, T, Hq, D)
    k = qkv[..., Hq * D:(Hq + Hkv) * D].view(B, T, Hkv, D)
    v = qkv[..., (Hq + Hkv) * D:].view(B, T, Hkv, D)
    positions = prefix + torch.arange(T, device=DEVICE)  # [T]
    if per_row:
        positions = positions - torch.arange(B, device=DEVICE)[:, None] * 3  # [B, T]: left-padded rows
    cos, sin = rope_tables(positions, D)
    cache = torch.full((2, B, Hkv, S, D), float("nan"), dtype=dtype, device=DEVICE)
    return q, k, v, cos, sin, cache


def check_cache(cache, expected, prefix, T):
    """The new slots hold what `expected` holds; every other slot is still NaN."""
    written = torch.zeros(S, dtype=torch.bool, device=DEVICE)
    written[prefix:prefix + T] = True
    assert cache[:, :, :, ~written].isnan().all(), "a slot outside prefix .. prefix+T-1 was written"
    assert not cache[:, :, :, written].isnan().any(), "a new slot was not written"
    tol = dict(rtol=1e-6, atol=1e-6) if cache.dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cache[:, :, :, written], expected[:, :, :, written], **tol)


# (B, T, Hq, Hkv, D, prefix, per-row tables, prefix as a 0-d tensor)
CASES = [
    (1, 1, 4, 4, 16, 9, False, False),  # MHA decode
    (1, 1, 6, 2, 64, 22, False, True),  # GQA decode into the last slot, device prefix_len
    (2, 3, 6, 2, 32, 5, True, False),  # batch with per-row positions
    (2, 7, 6, 2, 16, 0, True, True),  # prefill from an empty cache
    (1, 7, 4, 1, 64, 16, False, False),  # MQA, a tree of 7 ending at the last slot
    (2, 1, 2, 2, 32, 11, True, True),
    (1, 3, 20, 10, 16, 4, False, True),  # more heads than a program takes: several blocks, the last ones part-full
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,prefix,per_row,prefix_as_tensor", CASES)
def test_matches_reference(poisoned_allocations, dtype, B, T, Hq, Hkv, D, prefix, per_row, prefix_as_tensor):
    q, k, v, cos, sin, cache = make_case(B, T, Hq, Hkv, D, prefix, per_row, dtype)
    ref_cache = cache.clone()
    ref_q = rope_and_cache_reference(q, k, v, cos, sin, ref_cache, prefix)
    p = torch.tensor(prefix, device=DEVICE) if prefix_as_tensor else prefix
    out_q = rope_and_cache_triton(q, k, v, cos, sin, cache, p)
    assert out_q.shape == (B, Hq, T, D) and out_q.dtype == dtype and out_q.is_contiguous()
    assert not out_q.isnan().any(), "the rotated q was not fully written"
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out_q, ref_q, **tol)
    check_cache(cache, ref_cache, prefix, T)
    torch.testing.assert_close(cache[1, :, :, prefix:prefix + T], v.transpose(1, 2), rtol=0, atol=0)  # v raw


def old_path(q, k, v, cos, sin, cache, prefix):
    """Attention.forward's cached path before the fused op: heads-first q, k, v, tables cast to the
    model dtype and broadcast over heads, RoPE in the model dtype, two index_copy_."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, D]
    q, k = ((x * cos + rotate_half(x) * sin).to(x.dtype) for x in (q, k))
    slots = prefix + torch.arange(q.shape[2], device=q.device)
    cache[0].index_copy_(2, slots, k)
    cache[1].index_copy_(2, slots, v)
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_row", [False, True])
def test_reference_equals_the_old_path(dtype, per_row):
    # Same result up to rounding: the reference rounds once from float32, the old path rounded the tables
    # and each product to the model dtype (identical in float32).
    q, k, v, cos, sin, cache = make_case(2, 5, 6, 2, 32, 7, per_row, dtype)
    old_cache = cache.clone()
    new_q = rope_and_cache_reference(q, k, v, cos, sin, cache, 7)
    old_q = old_path(q, k, v, cos, sin, old_cache, 7)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(new_q, old_q, **tol)
    torch.testing.assert_close(cache, old_cache, equal_nan=True, **tol)  # untouched slots: NaN in both


def test_device_prefix_past_the_cache_writes_nothing_out_of_bounds():
    # A device prefix_len cannot be checked on the host: tokens that would land past slot S-1 are dropped.
    q, k, v, cos, sin, cache = make_case(1, 3, 4, 2, 16, 0, False, torch.float32)
    rope_and_cache_triton(q, k, v, cos, sin, cache, torch.tensor(S - 1, device=DEVICE))
    assert cache[:, :, :, :S - 1].isnan().all() and not cache[:, :, :, S - 1].isnan().any()


def test_bad_inputs_name_the_fix():
    q, k, v, cos, sin, cache = make_case(1, 3, 4, 2, 16, 0, False, torch.float32)
    with pytest.raises(KernelInputError, match=r"pass q \[B, T, Hq, D\]"):
        rope_and_cache_triton(q.transpose(1, 2), k, v, cos, sin, cache, 0)
    with pytest.raises(KernelInputError, match=r"cos and sin shaped \(3, 16\) or \(1, 3, 16\)"):
        rope_and_cache_triton(q, k, v, cos[:2], sin[:2], cache, 0)
    with pytest.raises(KernelInputError, match="float32 cos/sin"):
        rope_and_cache_triton(q, k, v, cos.half(), sin.half(), cache, 0)
    with pytest.raises(KernelInputError, match="layer cache shaped"):
        rope_and_cache_triton(q, k, v, cos, sin, cache[:, :, :1], 0)
    with pytest.raises(KernelInputError, match="in one dtype"):
        rope_and_cache_triton(q, k, v, cos, sin, cache.half(), 0)
    with pytest.raises(KernelInputError, match="do not fit a cache of 23 slots"):
        rope_and_cache_triton(q, k, v, cos, sin, cache, S - 2)
    with pytest.raises(KernelInputError, match="0-d integer tensor"):
        rope_and_cache_triton(q, k, v, cos, sin, cache, torch.tensor([0], device=DEVICE))
    with pytest.raises(KernelInputError, match="contiguous along head_dim"):
        rope_and_cache_triton(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, cos, sin, cache, 0)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_device_prefix_len_is_graph_capturable():
    q, k, v, cos, sin, cache = make_case(1, 1, 9, 3, 64, 0, False, torch.bfloat16)
    prefix = torch.tensor(0, device=DEVICE)
    rope_and_cache_triton(q, k, v, cos, sin, cache, prefix)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rope_and_cache_triton(q, k, v, cos, sin, cache, prefix)
    for p in (5, 17):
        prefix.fill_(p)
        graph.replay()
        ref_cache = cache.clone()
        ref_q = rope_and_cache_reference(q, k, v, cos, sin, ref_cache, p)
        torch.testing.assert_close(out, ref_q, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(cache[:, :, :, p], ref_cache[:, :, :, p], rtol=1e-2, atol=1e-2)

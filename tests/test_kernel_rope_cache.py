"""The fused RoPE + KV-cache-write kernel against its torch reference (kernels/rope_cache.py), and the same work
done in the epilogue of the fused q/k/v projection (kernels/linear.py's `linear_rope_and_cache`).

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

import kernels  # noqa: E402
from kernels.errors import KernelInputError  # noqa: E402
from kernels.linear import (RopeAndCache, TileConfig, fuses_rope_and_cache, linear_into_residual,  # noqa: E402
                            linear_of_normed, linear_rope_and_cache, linear_triton)
from kernels.rope_cache import rope_and_cache_reference, rope_and_cache_triton, rotate_half  # noqa: E402
from kernels.testing import linear_inputs, same_bits  # noqa: E402

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


# ------------------------------------------------------------------------ in the q/k/v projection's epilogue

def projection_case(B, T, Hq, Hkv, D, K, prefix, dtype, per_row=True, seed=0):
    """x [B, T, K], a fused q/k/v weight [(Hq + 2 Hkv) D, K] and bias, RoPE tables for positions prefix + t (per_row:
    [B, T, D], row b shifted by 3 b, left padding; else [T, D], shared by the rows, as a plain batch has them) and a
    NaN-filled cache of S slots (more where T needs them)."""
    torch.manual_seed(seed)
    x, w, b = linear_inputs(B * T, (Hq + 2 * Hkv) * D, K, dtype, DEVICE)
    positions = prefix + torch.arange(T, device=DEVICE)  # [T]
    if per_row:
        positions = positions - 3 * torch.arange(B, device=DEVICE)[:, None]  # [B, T]
    cos, sin = rope_tables(positions, D)
    slots = max(S, prefix + T)
    return x.view(B, T, K), w, b, cos, sin, torch.full((2, B, Hkv, slots, D), float("nan"), dtype=dtype, device=DEVICE)


def projection_then_rope(x, w, b, cos, sin, cache, prefix, Hq, config):
    """The two-kernel path: the projection's output split per head, then `rope_and_cache_triton`."""
    B, T, _ = x.shape
    Hkv, D = cache.shape[2], cache.shape[4]
    q, k, v = linear_triton(x, w, b, config=config).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    return rope_and_cache_triton(q.view(B, T, Hq, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D), cos, sin, cache,
                                 prefix)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads_per_tile", [1, 2, 4])
@pytest.mark.parametrize("prefix_as_tensor, per_row", [(False, True), (True, False)])
def test_projection_with_rope_gives_the_bits_of_projection_then_rope(poisoned_allocations, dtype, heads_per_tile,
                                                                     prefix_as_tensor, per_row):
    # Grouped queries (6 query heads, 2 KV heads: 10 head slots; with 4 heads a tile, the second tile holds query
    # and key heads, the third value heads and two slots past the last head), two batch rows with their own positions
    # or the batch's shared ones, a bias: q and every cache slot as the projection and then the standalone kernel make
    # them, bit for bit (the same rounding: the projection's output, then the rotation).
    B, T, Hq, Hkv, D, prefix = 2, 5, 6, 2, 16, 4
    x, w, b, cos, sin, cache = projection_case(B, T, Hq, Hkv, D, 40, prefix, dtype, per_row)
    config = TileConfig(block_m=16, block_n=D * heads_per_tile, block_k=32, num_warps=4, num_stages=2)
    expected_cache = cache.clone()
    expected_q = projection_then_rope(x, w, b, cos, sin, expected_cache, prefix, Hq, config)
    p = torch.tensor(prefix, device=DEVICE) if prefix_as_tensor else prefix
    q = linear_rope_and_cache(x, w, b, RopeAndCache(cos, sin, cache, p, Hq), config=config)
    assert q.shape == (B, Hq, T, D) and q.is_contiguous()
    assert same_bits(q, expected_q)
    assert same_bits(cache, expected_cache)  # the new slots alike, every other slot still NaN
    check_cache(cache, expected_cache, prefix, T)


# On a GPU a 7B's wqkv, whose 128-feature tiles hold whole heads: 64 rows load by the TMA, 70 (two batch rows) take
# two tiles of rows, the second part-full
@pytest.mark.parametrize("B,T,Hq,Hkv,D,K", [(1, 20, 4, 2, 16, 40)] + (
    [(1, 64, 32, 32, 128, 4096), (2, 35, 32, 32, 128, 4096)] if DEVICE == "cuda" else []))
def test_projection_with_rope_rows_are_bitwise_their_one_row_calls(B, T, Hq, Hkv, D, K):
    # Each token of a T-token call (a tree step, a prefill) gets the q and the K/V bits a one-token call at its
    # own position and slot (a plain decode step) gives it.
    kernels.set_row_invariant(True)  # (tests/conftest.py restores it)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    prefix = 3
    x, w, b, cos, sin, cache = projection_case(B, T, Hq, Hkv, D, K, prefix, dtype)
    if DEVICE == "cuda":
        assert fuses_rope_and_cache(x, w, b, D) or pytest.fail("the default tiles should hold whole heads")
    config = None if DEVICE == "cuda" else TileConfig(16, 16, 32, 4, 2)
    q = linear_rope_and_cache(x, w, b, RopeAndCache(cos, sin, cache, prefix, Hq), config=config)
    two_kernels_cache = cache.clone().fill_(float("nan"))  # and the bits of the two-kernel path at these tiles
    assert same_bits(q, projection_then_rope(x, w, b, cos, sin, two_kernels_cache, prefix, Hq, config))
    assert same_bits(cache, two_kernels_cache)
    one_row_cache = torch.full_like(cache, float("nan"))
    for t in sorted({0, 1, T // 2, T - 1}):
        one_q = linear_rope_and_cache(x[:, t:t + 1], w, b, RopeAndCache(cos[:, t:t + 1], sin[:, t:t + 1],
                                                                        one_row_cache, prefix + t, Hq), config=config)
        assert same_bits(one_q[:, :, 0], q[:, :, t]), f"q of token {t}"
        assert same_bits(one_row_cache[:, :, :, prefix + t], cache[:, :, :, prefix + t]), f"K/V of token {t}"


def test_projection_with_rope_takes_a_normed_stream(poisoned_allocations):
    # A narrow model folds its RMSNorms (kernels/linear.py's NormedStream): the projection then applies the norm's
    # 1 / rms as linear_of_normed does, and rotates that.
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 16
    x, w, b, cos, sin, cache = projection_case(B, T, Hq, Hkv, D, 40, 5, torch.float32)
    residual = torch.randn(B, T, 40, device=DEVICE)
    stream = linear_into_residual(torch.randn(B, T, 32, device=DEVICE), torch.randn(40, 32, device=DEVICE) / 6, None,
                                  residual, torch.rand(40, device=DEVICE) + 0.5, 1e-5)
    config = TileConfig(16, 16, 32, 4, 2)
    q = linear_rope_and_cache(stream, w, b, RopeAndCache(cos, sin, cache, 5, Hq), config=config)
    qkv = linear_of_normed(stream, w, b)  # (the interpreter's own tiles: 16 features, as config)
    expected_cache = torch.full_like(cache, float("nan"))
    expected_q = rope_and_cache_triton(*(t.view(B, T, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], -1)),
                                       cos, sin, expected_cache, 5)
    assert same_bits(q, expected_q) and same_bits(cache, expected_cache)


def test_projection_with_rope_writes_nothing_past_the_cache(poisoned_allocations):
    # A device prefix_len cannot be checked on the host: the keys and values that would land past slot S - 1 are
    # dropped, as the standalone kernel drops them; q is written whole.
    x, w, b, cos, sin, cache = projection_case(1, 3, 4, 2, 16, 40, 0, torch.float32)
    q = linear_rope_and_cache(x, w, b, RopeAndCache(cos, sin, cache, torch.tensor(S - 1, device=DEVICE), 4),
                              config=TileConfig(16, 32, 32, 4, 2))
    assert cache[:, :, :, :S - 1].isnan().all() and not cache[:, :, :, S - 1].isnan().any()
    assert not q.isnan().any()


def test_fused_only_where_the_tiles_hold_whole_heads():
    kernels.set_backend("triton")
    kernels.set_row_invariant(True)  # tests/conftest.py restores both afterwards
    x, w, b, *_ = projection_case(1, 2, 4, 2, 16, 40, 0, torch.float32)
    assert fuses_rope_and_cache(x, w, b, 16)  # the interpreter's 16-feature tiles
    assert not fuses_rope_and_cache(x, w, b, 32) and not fuses_rope_and_cache(x, w, b, 12)
    kernels.set_row_invariant(False)  # cuBLAS's projection: the standalone kernel
    assert not fuses_rope_and_cache(x, w, b, 16)


def test_projection_with_rope_bad_inputs_name_the_fix():
    x, w, b, cos, sin, cache = projection_case(1, 3, 4, 2, 16, 40, 0, torch.float32)
    config = TileConfig(16, 16, 32, 4, 2)
    with pytest.raises(KernelInputError, match="not 2 query and 2 x 2 key/value heads of 16"):
        linear_rope_and_cache(x, w, b, RopeAndCache(cos, sin, cache, 0, 2), config=config)
    with pytest.raises(KernelInputError, match="contiguous layer cache"):
        linear_rope_and_cache(x, w, b, RopeAndCache(cos, sin, cache.transpose(3, 4), 0, 4), config=config)
    with pytest.raises(KernelInputError, match="tiles of whole heads"):
        linear_rope_and_cache(x, w, b, RopeAndCache(cos, sin, cache, 0, 4), config=config._replace(block_n=8))
    with pytest.raises(KernelInputError, match="do not fit a cache of 23 slots"):
        linear_rope_and_cache(x, w, b, RopeAndCache(cos, sin, cache, S - 2, 4), config=config)
    with pytest.raises(KernelInputError, match=r"x \[B, T, K\]"):
        linear_rope_and_cache(x[0], w, b, RopeAndCache(cos, sin, cache, 0, 4), config=config)

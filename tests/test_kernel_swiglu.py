"""The fused SwiGLU activation kernel against its torch reference (kernels/swiglu.py), and the same activation in the
epilogue of the MLP's gate/up projection (kernels/linear.py's `linear_swiglu`).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py): fp32 and fp16; bf16 on CUDA.
The output is poisoned before each run, so an element the kernel does not write fails the comparison.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import linear
from kernels.errors import KernelInputError
from kernels.linear import (TileConfig, fuses_swiglu, linear_into_residual, linear_of_normed, linear_swiglu,
                            linear_triton)
from kernels.swiglu import silu_mul, silu_mul_reference, silu_mul_triton
from kernels.testing import TOLERANCE, linear_inputs, poisoned_empty, rows_differing_from_one_row_calls, same_bits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2 * 5), (2, 3, 2 * 1536), (4, 2 * 1030), (7, 2 * 2048)])
def test_matches_reference(shape, dtype):
    gate_up = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    with poisoned_empty():
        got = silu_mul_triton(gate_up)
    want = silu_mul_reference(gate_up)
    assert got.shape == want.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_reference_is_swiglu():
    gate, up = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(silu_mul_reference(torch.cat([gate, up], dim=-1)), F.silu(gate) * up)


def test_odd_width_names_the_fix():
    with pytest.raises(KernelInputError, match="even last dimension"):
        silu_mul_triton(torch.randn(2, 7, device=DEVICE))


@pytest.mark.parametrize("shape", [(2, 7), ()])
def test_every_path_refuses_alike(shape):
    # The torch path failed inside torch on an odd width, the kernel on a 0-d tensor.
    messages = set()
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)  # (tests/conftest.py restores it)
        with pytest.raises(KernelInputError) as refused:
            silu_mul(torch.randn(shape, device=DEVICE))
        messages.add(str(refused.value))
    assert messages == {f"silu_mul needs the fused gate/up output, an even last dimension; got shape {shape}: pass "
                        f"the output of the MLP's w13 projection."}


# ------------------------------------------------------------------ in the gate/up projection's epilogue

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("I, K, bias", [(40, 48, True), (64, 80, False)])  # I past a tile's edge; a K tail
@pytest.mark.parametrize("tma", [False, True])
def test_projection_with_swiglu_gives_the_bits_of_projection_then_silu_mul(dtype, I, K, bias, tma):
    # The gate's and the up projection's features accumulate as the [.., 2I] projection's do, and the activation
    # rounds as the SwiGLU kernel's: the same bits, loading the tiles by the TMA (rows of a whole tile) or not.
    x, w, b = linear_inputs(18, 2 * I, K, dtype, DEVICE, bias=bias, lead=(1,))
    config = TileConfig(16, 16, 32, 4, 2, tma=tma)
    assert linear._loads_by_tma(config, x.reshape(-1, K), w) == tma  # (K's rows 16-byte aligned for the TMA)
    with poisoned_empty():
        got = linear_swiglu(x, w, b, config=config)
    assert got.shape == (1, 18, I)
    assert same_bits(got, silu_mul_triton(linear_triton(x, w, b, config=config)))


def test_projection_with_swiglu_takes_a_normed_stream():
    # A narrow model folds its RMSNorms (NormedStream): the projection applies the norm's 1 / rms to both halves.
    residual = torch.randn(2, 3, 40, device=DEVICE)
    stream = linear_into_residual(torch.randn(2, 3, 32, device=DEVICE), torch.randn(40, 32, device=DEVICE) / 6, None,
                                  residual, torch.rand(40, device=DEVICE) + 0.5, 1e-5)
    _, w, _ = linear_inputs(1, 2 * 24, 40, torch.float32, DEVICE)
    # (both on the device's own fp32 tiles, which `_swiglu_tile_config` keeps whole)
    assert same_bits(linear_swiglu(stream, w), silu_mul_triton(linear_of_normed(stream, w)))


# on a GPU a 7B's w13 (tiles of half the projection's features) and Llama-3 8B's (its whole tiles), 64 rows by the TMA
@pytest.mark.parametrize("I, K", [(11008, 4096), (14336, 4096)] if DEVICE == "cuda" else [(40, 48)])
def test_projection_with_swiglu_rows_are_bitwise_their_one_row_calls(I, K):
    kernels.set_backend("triton")
    kernels.set_row_invariant(True)  # (tests/conftest.py restores both)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x, w, _ = linear_inputs(70, 2 * I, K, dtype, DEVICE)
    assert fuses_swiglu(x, w, None)
    config = None if DEVICE == "cuda" else TileConfig(16, 16, 32, 4, 2, tma=True)
    # (on a GPU their own tiles, which may hold half the features of the projection's without SwiGLU: each feature's
    # sum is the same)
    assert same_bits(linear_swiglu(x, w, config=config), silu_mul_triton(linear_triton(x, w, config=config)))
    for M in (64, 70):
        assert rows_differing_from_one_row_calls(lambda t: linear_swiglu(t, w, config=config), x[:M],
                                                 [0, M // 2, M - 1]) == [], M


def test_which_gate_up_projections_take_swiglu():
    # By the weight's shape: on a GPU a 7B's and Llama-3 8B's w13 (64-feature tiles), not a 135M model's (32-feature
    # tiles: it keeps the SwiGLU kernel); the interpreter fuses every shape.
    kernels.set_backend("triton")
    kernels.set_row_invariant(True)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x = torch.empty(1, 4096, dtype=dtype, device=DEVICE)
    for (N, K), fused in [((22016, 4096), True), ((28672, 4096), True), ((3072, 576), DEVICE == "cpu")]:
        assert fuses_swiglu(x[:, :K], torch.empty(N, K, dtype=dtype, device=DEVICE), None) == fused, (N, K)


def test_gpu_tile_choices_for_swiglu():
    # The GPU's choices, which every config's same bits leave to this test: SwiGLU in the epilogue for 64-feature tiles
    # and wider, halved where 4 stages (a 7B's w13), whole at 3 (Llama-3 8B's); a 135M model's 32-feature tiles keep
    # the SwiGLU kernel (bench/RESULTS.md, twenty-third run).
    bf16 = torch.bfloat16
    assert linear._gate_up_takes_swiglu(22016, 4096, bf16, True)
    assert linear._gate_up_takes_swiglu(28672, 4096, bf16, True)
    assert not linear._gate_up_takes_swiglu(3072, 576, bf16, True)
    assert linear._gate_up_takes_swiglu(3072, 576, bf16, False)  # the interpreter fuses every shape
    assert linear._swiglu_tile_config(22016, 4096, bf16, True).block_n == 32
    assert linear._swiglu_tile_config(28672, 4096, bf16, True).block_n == 64
    assert linear._swiglu_tile_config(3072, 576, bf16, False) == linear._tile_config(3072, 576, bf16, False)


def test_projection_with_swiglu_bad_inputs_name_the_fix():
    x, w, _ = linear_inputs(2, 9, 16, torch.float32, DEVICE)
    with pytest.raises(KernelInputError, match="an even number of rows"):
        linear_swiglu(x, w)
    with pytest.raises(KernelInputError, match="without split-K"):
        linear_swiglu(x, torch.cat([w, w[:1]]), config=TileConfig(16, 16, 8, 4, 2, split_k=2))

"""The row-invariant Triton linear (kernels/linear.py) against its torch reference, and its one promise:
row i of an M-row call holds the same bits as the 1-row call on row i, for every M.

Without a GPU the kernel runs in Triton's CPU interpreter: fp32 and fp16 (bf16 is broken in the
interpreter, so it is only checked on CUDA), on small shapes. Outputs are poisoned before each run (see
`poisoned_empty`), so an element the kernel does not write fails the comparison.

What the interpreter can and cannot show: a K schedule that changed with M (BLOCK_K, split-K) changes the
bits there too, and the invariance tests fail; a BLOCK_M that changed with M does not, since the interpreter's
tl.dot rounds a row alike wherever it sits in the tile (kernels/interpreter.py), so only the CUDA run (other MMA
instructions) would catch it, and `_tile_config`'s signature is checked to leave M out.
"""

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels
import kernels.linear as linear_module
from kernels.errors import KernelInputError
from kernels.linear import (CPU_WEIGHT_LEFT_MAX_ROWS, NormedStream, TileConfig, _tile_config, linear,
                            linear_into_residual, linear_into_residual_reference, linear_of_normed,
                            linear_of_normed_reference, linear_triton, torch_linear)
from kernels.rmsnorm import rmsnorm_reference
from kernels.testing import (TOLERANCE, check_linear, linear_inputs, poisoned_empty, rel_error,
                             rows_differing_from_one_row_calls, same_bits)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Split-K over a small K: 16-wide steps, so that K = 80 takes 5 steps in 3 splits of 2, the last short.
SPLIT_3 = TileConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, split_k=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead, M, N, K", [((), 5, 48, 40), ((2,), 3, 20, 33), ((), 17, 50, 70)])
def test_matches_reference(lead, M, N, K, bias, dtype):
    # N and K are not multiples of the tiles (16 x 32 in the interpreter): the tails are masked.
    x, w, b = linear_inputs(M, N, K, dtype, DEVICE, bias=bias, lead=lead)
    assert check_linear(x, w, b).shape == (*lead, M, N)


@pytest.mark.parametrize("bias", [True, False])
def test_split_k_matches_reference(bias):
    check_linear(*linear_inputs(6, 40, 80, torch.float32, DEVICE, bias=bias, lead=(2,)), config=SPLIT_3)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_sums_the_partials_in_split_order(split_k):
    # Each split's partial is its K range's sum in BLOCK_K steps (a one-split call on those columns); the output is
    # their sum in split order, whichever program arrived last. (With 2 splits the order cannot show, p0 + p1 being
    # p1 + p0 bit for bit: that case checks the ranges; with 3, another order fails it.)
    x, w, _ = linear_inputs(20, 40, 80, torch.float32, DEVICE)
    K = x.shape[-1]
    config = SPLIT_3._replace(split_k=split_k)
    per_split = config.block_k * triton.cdiv(triton.cdiv(K, config.block_k), split_k)  # whole BLOCK_K steps a split
    one_split = config._replace(split_k=1)
    partials = [linear_triton(x[:, k:k + per_split].contiguous(), w[:, k:k + per_split].contiguous(), config=one_split)
                for k in range(0, K, per_split)]
    assert len(partials) == split_k
    expected = partials[0]
    for p in partials[1:]:
        expected = expected + p
    assert same_bits(linear_triton(x, w, config=config), expected)


def test_split_k_leaves_its_tile_counters_at_zero():
    # The last program of each tile resets its counter: a second call (a CUDA graph's next replay) finds them
    # at zero again and computes the same bits.
    x, w, b = linear_inputs(20, 40, 80, torch.float32, DEVICE)
    first = linear_triton(x, w, b, config=SPLIT_3)
    assert linear_module._TILE_COUNTERS[x.device][-1].count_nonzero() == 0
    assert same_bits(first, linear_triton(x, w, b, config=SPLIT_3))


@pytest.mark.parametrize("N, K", [(48, 40), (96, 80)])
def test_every_row_is_bitwise_its_one_row_call(N, K):
    x, w, b = linear_inputs(70, N, K, torch.float32, DEVICE)
    for M in (1, 2, 5, 16, 17, 64, 70):
        rows = sorted({0, 1, M // 2, M - 2, M - 1} & set(range(M)))
        assert rows_differing_from_one_row_calls(lambda t: linear_triton(t, w, b), x[:M], rows) == [], M


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_row_invariant_in_16_bit_and_with_split_k(dtype):
    x, w, b = linear_inputs(33, 40, 80, dtype, DEVICE)
    for config in (None, SPLIT_3):
        assert rows_differing_from_one_row_calls(
            lambda t: linear_triton(t, w, b, config=config), x, [0, 15, 16, 31, 32]) == []


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU's tiles: 64 rows and 16 (a 135M model's smallest matrices)")
# (4096, 11008): split-K; (3000, 600): ragged features and a K tail, 64-row calls and more by TMA
@pytest.mark.parametrize("N,K", [(256, 4096), (4096 * 3, 4096), (4096, 11008), (576, 1536), (3000, 600)])
def test_row_invariant_on_the_gpu_at_model_sizes(N, K):
    x, w, b = linear_inputs(128, N, K, torch.bfloat16, DEVICE, bias=False)
    check_linear(x, w)
    for M in (1, 16, 63, 64, 65, 128):
        rows = sorted({0, M // 2, M - 1})
        assert rows_differing_from_one_row_calls(lambda t: linear_triton(t, w), x[:M], rows) == [], M


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs these tiles in bf16 above")
def test_the_gpus_tiles_under_the_interpreter():
    # The tile config a GPU takes for a 135M model's ragged matrix (bf16: 64-row tiles, loaded by the TMA from 64
    # rows on), run in float32 in the interpreter, so that a CPU checks its masks and tails too.
    N, K = 3000, 600  # ragged features and a K tail
    config = _tile_config(N, K, torch.bfloat16, True)
    x, w, _ = linear_inputs(70, N, K, torch.float32, DEVICE, bias=False)
    check_linear(x[:65], w, config=config)
    for M in (1, 63, 64, 65):
        rows = sorted({0, M // 2, M - 1})
        assert rows_differing_from_one_row_calls(lambda t: linear_triton(t, w, config=config), x[:M], rows) == [], M


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch (and the weights' L2 prefetch) needs a Hopper GPU")
@pytest.mark.parametrize("N,K", [(4096, 4096), (1000, 40), (100, 72)])  # ragged N (tiles) and short K (prefetch)
def test_dependent_launch_and_prefetch_change_no_bit(N, K):
    kernels.set_row_invariant(True)  # where the kernels launch that way (tests/conftest.py restores it)
    x, w, b = linear_inputs(64, N, K, torch.bfloat16, bias=True, device=DEVICE)
    kernels.set_dependent_launch(True)
    early = linear_triton(x, w, b)
    kernels.set_dependent_launch(False)
    assert same_bits(early, linear_triton(x, w, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [TileConfig(16, 16, 32, 4, 2), SPLIT_3], ids=["one-split", "split-3"])
def test_tiles_loaded_by_tma_give_the_bits_of_per_thread_loads(config, dtype, monkeypatch):
    # A call of at least BLOCK_M rows loads its tiles by the TMA (a decode's single row never does): the copy
    # engine fills the tile past the tensors' ends (rows past M, features past N, the last K step) with zeros, as
    # the masked loads do, so the same tiles make the same products and the same bits, and each row of a call
    # that loads by TMA is bitwise its 1-row call, which does not. The weight is a slice of a wider matrix (row
    # stride 88, not K = 80), as the descriptor must say.
    x, _, b = linear_inputs(33, 40, 80, dtype, DEVICE)
    w = torch.randn(40, 88, dtype=dtype, device=DEVICE)[:, :80]
    by_tma = config._replace(tma=True)
    took_tma = []
    loads_by_tma = linear_module._loads_by_tma
    monkeypatch.setattr(linear_module, "_loads_by_tma", lambda *a: took_tma.append(loads_by_tma(*a)) or took_tma[-1])
    for M in (16, 20, 33):
        assert same_bits(linear_triton(x[:M], w, b, config=by_tma), linear_triton(x[:M], w, b, config=config)), M
    assert took_tma == [True, False] * 3  # each M by TMA, then by loads
    took_tma.clear()
    assert rows_differing_from_one_row_calls(lambda t: linear_triton(t, w, b, config=by_tma), x, [0, 16, 32]) == []
    assert took_tma.count(True) == 1 and took_tma.count(False) == 3  # the 33-row call, then three 1-row calls


def test_the_bit_check_sees_one_ulp_and_the_sign_of_zero():
    # What the invariance tests compare would catch the smallest change of any schedule.
    a = torch.randn(4, 7)
    assert same_bits(a, a.clone())
    assert not same_bits(a, torch.nextafter(a, torch.full_like(a, float("inf"))))
    assert not same_bits(torch.zeros(3), -torch.zeros(3))  # equal as numbers, not as bits


def test_another_k_schedule_changes_the_bits():
    # The invariance the tests check is not a given: the same rows summed over K in other steps (split-K
    # here) round differently, which is what cuBLAS choosing a kernel by row count does.
    x, w, _ = linear_inputs(8, 48, 80, torch.float32, DEVICE, bias=False)
    assert not same_bits(linear_triton(x, w), linear_triton(x, w, config=SPLIT_3))


def test_the_tile_config_never_sees_the_row_count():
    assert list(inspect.signature(_tile_config).parameters) == ["N", "K", "dtype", "on_gpu"]
    for N, K in [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096), (960, 576)]:
        for dtype in (torch.bfloat16, torch.float32):
            for on_gpu in (True, False):
                cfg = _tile_config(N, K, dtype, on_gpu)
                assert all(v >= 16 and v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, cfg.block_k)), cfg


def test_no_rows_and_3d_shapes():
    w = torch.randn(24, 40, device=DEVICE)
    assert linear_triton(torch.randn(0, 40, device=DEVICE), w).shape == (0, 24)
    assert linear_triton(torch.randn(2, 0, 40, device=DEVICE), w).shape == (2, 0, 24)


def test_dispatch_runs_the_kernel_only_when_row_invariance_is_on(monkeypatch):
    x, w, b = linear_inputs(3, 24, 40, torch.float32, DEVICE)
    calls = []
    real = linear_module.linear_triton
    monkeypatch.setattr(linear_module, "linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    kernels.set_backend("triton")
    kernels.set_row_invariant(True)
    with torch.no_grad():
        out = linear(x, w, b)
    assert calls == [1] and same_bits(out, real(x, w, b))

    def no_kernel(*args, **kwargs):
        raise AssertionError("the Triton linear ran where torch's product should")

    monkeypatch.setattr(linear_module, "linear_triton", no_kernel)
    kernels.set_row_invariant(False)  # row invariance off: torch's product (cuBLAS, or MKL) stays the default
    assert same_bits(linear(x, w, b), torch_linear(x, w, b))
    kernels.set_row_invariant(True)
    kernels.set_backend("torch")
    assert same_bits(linear(x, w, b), torch_linear(x, w, b))
    kernels.set_backend("triton")
    w.requires_grad_(True)  # autograd goes through F.linear, so a trainable weight gets its gradient
    linear(x, w, b).sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 5), (CPU_WEIGHT_LEFT_MAX_ROWS,),
                                  (CPU_WEIGHT_LEFT_MAX_ROWS + 1,), (0,)])
@pytest.mark.parametrize("bias", [False, True])
def test_torch_linear_is_f_linear(lead, bias):
    x, w, b = torch.randn(*lead, 40), torch.randn(24, 40), torch.randn(24) if bias else None
    with torch.no_grad():
        out = torch_linear(x, w, b)
    assert out.shape == (*lead, 24) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_torch_linear_puts_a_cpu_weight_on_the_left_only_where_that_was_faster(monkeypatch):
    """A float32 CPU product of 1 to CPU_WEIGHT_LEFT_MAX_ROWS rows without a gradient runs as weight @ x^T (no
    F.linear); more rows, 16-bit dtypes and products autograd must see go through F.linear."""
    calls = []
    real = F.linear
    monkeypatch.setattr(linear_module.F, "linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    w, b = torch.randn(24, 40), torch.randn(24)
    with torch.no_grad():
        for rows in (1, 2, CPU_WEIGHT_LEFT_MAX_ROWS):
            torch_linear(torch.randn(rows, 40), w, b)
        assert calls == []
        torch_linear(torch.randn(CPU_WEIGHT_LEFT_MAX_ROWS + 1, 40), w, b)
        torch_linear(torch.randn(2, 40, dtype=torch.float16), w.half(), b.half())
        with pytest.raises(RuntimeError):  # a bias of another dtype gets F.linear's own error
            torch_linear(torch.randn(2, 40), w, b.double())
    assert len(calls) == 3
    w.requires_grad_(True)  # as a model's parameters are: decoding runs them under inference mode, swapped
    with torch.inference_mode():
        torch_linear(torch.randn(2, 40), w, b)
    assert len(calls) == 3
    torch_linear(torch.randn(2, 40), w, b).sum().backward()
    assert len(calls) == 4 and w.grad is not None


def test_bad_inputs_name_the_fix():
    x = torch.randn(2, 40, device=DEVICE)
    w = torch.randn(24, 40, device=DEVICE)
    with pytest.raises(KernelInputError, match="last dimension must be K = 40"):
        linear_triton(torch.randn(2, 41, device=DEVICE), w)
    with pytest.raises(KernelInputError, match="must be 2-D"):
        linear_triton(x, w[None])
    with pytest.raises(KernelInputError, match="must share one dtype"):
        linear_triton(x, w.half())
    with pytest.raises(KernelInputError, match="must share one dtype"):
        linear_triton(x, w, torch.zeros(24, dtype=torch.float16, device=DEVICE))
    with pytest.raises(KernelInputError, match=r"must be \(24,\)"):
        linear_triton(x, w, torch.zeros(23, device=DEVICE))
    with pytest.raises(KernelInputError, match="rows must be contiguous"):
        linear_triton(x, torch.randn(40, 24, device=DEVICE).t())
    with pytest.raises(KernelInputError, match="float32, float16 or bfloat16"):
        linear_triton(x.double(), w.double())


def test_a_strided_bias_is_read_as_it_is():
    # A bias that is a column of a stacked table (stride 2) was read as if contiguous: every other element.
    x, w, b = linear_inputs(3, 24, 40, torch.float32, DEVICE)
    strided = torch.stack([b, -b], 1)[:, 0]
    assert strided.stride() == (2,)
    kernels.set_row_invariant(True)  # the dispatcher's kernel path (tests/conftest.py restores it)
    kernels.set_backend("triton")
    assert rel_error(linear(x, w, strided), F.linear(x, w, b)) <= 1e-5


# ------------------------------------------------------------------- RMSNorm folded into the linear layers
# Under --exact a block's output projections add into the residual stream and make the next RMSNorm's stream
# (g * h and h's sums of squares per tile of features); the next linear layer applies its 1 / rms.

def folded_norm_inputs(M, N, K, dtype):
    x, w, b = linear_inputs(M, N, K, dtype, DEVICE)
    residual = torch.randn(M, N, device=DEVICE).to(dtype)
    g = (0.5 + torch.rand(N, device=DEVICE)).to(dtype)
    return x, w, b, residual, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_into_residual_and_of_normed_match_their_references(dtype, bias):
    x, w, b, residual, g = folded_norm_inputs(7, 40, 72, dtype)  # N = 40: the last feature tile ragged
    b = b if bias else None
    with poisoned_empty():
        stream = linear_into_residual(x, w, b, residual, g, 1e-5)
        h = linear_into_residual(x, w, b, residual)
    want = linear_into_residual_reference(x.float(), w.float(), None if b is None else b.float(), residual.float(),
                                          g.float(), 1e-5)
    tol = TOLERANCE[dtype][0]
    assert stream.residual.dtype == stream.scaled.dtype == dtype and stream.sumsq.dtype == torch.float32
    assert same_bits(h, stream.residual)
    assert rel_error(stream.residual, want.residual) <= tol and rel_error(stream.scaled, want.scaled) <= tol
    assert stream.sumsq.shape[1] == 7 and rel_error(stream.sumsq.sum(0), want.sumsq[0]) <= tol
    # The next layer: the norm's 1 / rms in the kernel, against RMSNorm then the product (float32).
    w2, b2 = linear_inputs(1, 24, 40, dtype, DEVICE)[1:]
    with poisoned_empty():
        got = linear_of_normed(stream, w2, b2)
    unfused = F.linear(rmsnorm_reference(want.residual, g.float(), 1e-5), w2.float(), b2.float())
    assert got.dtype == dtype and rel_error(got, unfused) <= tol
    assert rel_error(got, linear_of_normed_reference(stream, w2, b2)) <= tol


def folded_rows_unlike_one_row_calls(M, N, K, next_features, dtype, rows) -> list[int]:
    """The rows i (of `rows`) where the producer's outputs (h, g * h, the tile sums) or the next layer's from
    them, computed for M rows at once, differ in any bit from the same computed for row i alone."""
    x, w, b, residual, g = folded_norm_inputs(M, N, K, dtype)
    w2, b2 = linear_inputs(1, next_features, N, dtype, DEVICE)[1:]

    def outputs(r):
        stream = linear_into_residual(x[r], w, b, residual[r], g, 1e-5)
        return stream.residual, stream.scaled, stream.sumsq.T, linear_of_normed(stream, w2, b2)

    full = outputs(slice(0, M))
    return [i for i in rows
            if not all(same_bits(one[0], whole[i]) for one, whole in zip(outputs(slice(i, i + 1)), full))]


@pytest.mark.parametrize("dtype", DTYPES[1:] if DEVICE == "cuda" else DTYPES)
def test_folded_norm_rows_are_bitwise_their_one_row_calls(dtype):
    M = 70 if DEVICE == "cuda" else 33
    assert folded_rows_unlike_one_row_calls(M, 48, 80, 40, dtype, sorted({0, 1, 15, 16, M // 2, M - 1})) == []


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU's tile configs at a narrow model's sizes")
@pytest.mark.parametrize("N,K", [(576, 1536), (1024, 4096)])  # 16-row tiles; 64-row ones (over 2^20 weights)
def test_folded_norm_rows_are_bitwise_on_the_gpu_at_model_sizes(N, K):
    assert folded_rows_unlike_one_row_calls(70, N, K, 3 * N, torch.bfloat16, [0, 35, 63, 64, 69]) == []


def test_folded_norm_errors_are_one_sentence():
    x, w, b, residual, g = folded_norm_inputs(3, 40, 80, torch.float32)
    with pytest.raises(KernelInputError, match="shaped like the layer's output"):
        linear_into_residual(x, w, b, residual[:, :8], g)
    with pytest.raises(KernelInputError, match="RMSNorm weight"):
        linear_into_residual(x, w, b, residual, g[:8])
    with pytest.raises(KernelInputError, match=re.escape("RMSNorm weight (40,) (torch.float16) must be (40,), the "
                                                         "layer's output, in x's dtype (torch.float32).")):
        linear_into_residual(x, w, b, residual, g.half())


def test_folded_norm_reads_a_strided_norm_weight_as_it_is():
    x, w, b, residual, g = folded_norm_inputs(3, 40, 80, torch.float32)
    strided = torch.stack([g, -g], 1)[:, 0]
    got = linear_into_residual(x, w, b, residual, strided, 1e-5)
    want = linear_into_residual_reference(x, w, b, residual, g, 1e-5)
    assert rel_error(got.scaled, want.scaled) <= 1e-5


def test_folded_norm_with_split_k_is_the_same_sums():
    # The down projections split K: the last-arriving program does the residual add and the norm's part.
    x, w, b, residual, g = folded_norm_inputs(5, 40, 80, torch.float32)
    out, h, sumsq = linear_module._run_linear(x, w, b, SPLIT_3, residual=residual, norm_weight=g)
    want = linear_into_residual_reference(x, w, b, residual, g)
    assert rel_error(h, want.residual) <= 1e-5 and rel_error(out, want.scaled) <= 1e-5
    assert rel_error(sumsq.sum(0), want.sumsq[0]) <= 1e-5
    stream = NormedStream(out, h, sumsq, 1e-5)
    w2, b2 = linear_inputs(1, 24, 40, torch.float32, DEVICE)[1:]
    split = linear_module._run_linear(out, w2, b2, SPLIT_3, sumsq_in=sumsq, eps=1e-5)[0]
    assert rel_error(split, linear_of_normed_reference(stream, w2, b2)) <= 1e-5

"""A row-invariant linear layer: out = x @ weight^T + bias, each row computed the same whatever the row count.

Why: a plain decode step runs the model's linear layers on 1 row, a Medusa tree step on T = 16..128 rows.
cuBLAS picks its kernel (tile shape, split-K, reduction order) by the row count, so the same row comes out
different in the last bits, an argmax flips, and greedy Medusa drifts from plain greedy decoding (README.md,
"Exact greedy").
Here the schedule never looks at the row count M:
  * The tile config (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split-K) comes from `_tile_config(N, K,
    dtype, on_gpu)`: no M anywhere, no autotuning (which would key on M). BLOCK_M is fixed too, so a 1-row
    call runs the very tile a 64-row call does, with 63 zero rows beside it.
  * Each output element is one program's float32 accumulator over K in BLOCK_K steps, in order; with
    split-K (the down projections of 7B-class models; `python -m bench.linear --sweep` tries it), SPLIT_K
    programs take fixed K ranges (by N and K only) and write float32 partial sums; the last of a tile's
    programs to arrive (an atomic counter says which) adds them up in split order, 0, 1, .., whoever arrived
    when (never atomic adds of the sums themselves, whose order is a race).
  * M is an ordinary runtime argument that Triton does not specialise on (`do_not_specialize`), so every M
    runs the same compiled binary; M only masks which rows are loaded and stored. A tensor-core MMA
    computes each row of its tile the same way whatever the other rows hold, so row i of an M-row call is
    bit for bit the 1-row call on row i.

`linear(x, weight, bias)` dispatches: the Triton kernel when Triton kernels are in use (`use_triton`) and
row invariance is on (`kernels.set_row_invariant(True)`: `--exact`, the default on sm_90 / sm_100 GPUs, where with
programmatic dependent launch a step of these kernels runs faster than one with cuBLAS's), else torch's product
(`torch_linear`: F.linear, cuBLAS's on a GPU; on a CPU a float32 product of a few rows is taken the other way round,
weight @ x^T, which MKL streams faster). Shapes: x [..., K], weight [N, K] with contiguous rows,
bias [N] or None -> out [..., N] in x's dtype; weight and bias share x's dtype; float32 accumulation, and
float32 inputs use exact ("ieee") products, not TF32.

The fused q/k/v projection of an attention layer can also rotate q and k and write k and v into the KV cache in its
epilogue (`linear_rope_and_cache`, a kernel of its own: `_linear_rope_kernel`), where its tiles hold whole heads
(`fuses_rope_and_cache`); the layer then runs no RoPE kernel (kernels/rope_cache.py). Likewise the MLP's fused
gate/up projection can apply SwiGLU in its epilogue (`linear_swiglu`, where `fuses_swiglu`: wide models' tiles), each
program accumulating a gate and an up tile; the layer then runs no SwiGLU kernel (kernels/swiglu.py).

The same kernel can take the RMSNorm between two sublayers into its epilogues (a narrow model's blocks under
`--exact`, nanomedusa/model.py): `linear_into_residual` adds its output to the residual stream h and leaves the
next norm half done, a `NormedStream` of g * h and each row's squares of h summed per tile of features; the next
layer's `linear_of_normed` multiplies its product of g * h by 1 / rms(h). No RMSNorm kernel runs between them.

On the GPU the kernel is built for batch-1 decoding, where a linear layer streams its weight once and is
bound by memory bandwidth: a program owns BLOCK_N output features (rows of the weight, each read along K
contiguously) and all BLOCK_M rows of x, so a tree step of up to BLOCK_M = 64 rows (16 for the smallest
matrices, which the L2 holds for the re-reads) reads each weight tile once, and narrow BLOCK_N spreads even a
4096-feature matrix over every SM. A call that fills a tile of rows (a 64-node tree step, a prefill) loads its tiles
by Hopper's tensor memory accelerator (TMA) where the config allows it, a 1-row decode by per-thread loads that
skip its 63 empty rows: how a tile reaches shared memory changes no product and no sum, so the row's bits stay its
1-row call's (`_loads_by_tma`; the tests compare the two paths bit for bit).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import row_invariant, use_triton
from .dependent_launch import hopper_or_newer, launch_options, prefetch_l2, wait_for_previous_kernels
from .errors import KernelInputError
from .interpreter import interpreting
from .rope_cache import check_rope_and_cache_inputs, rope_and_cache_tile

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Split-K's arrival counters, one per output tile, zero between calls (each tile's last program resets its own):
# per device, never freed, since a CUDA graph keeps the address it was captured with. Shared by every call on the
# device, so split-K calls must not run at once on two streams (the engine runs one stream).
_TILE_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
MIN_TILE_COUNTERS = 1 << 14
# Under programmatic dependent launch, each program asks for the first PREFETCH_BYTES of each of its weight rows
# to be brought into the L2 while the kernel before it still runs (the weights depend on no earlier kernel).
PREFETCH_BYTES = 512
# `torch_linear` puts a CPU product's weight on the left up to this many rows (faster at 64 and 128, slower at 256).
CPU_WEIGHT_LEFT_MAX_ROWS = 128


class TileConfig(NamedTuple):
    """How `_linear_kernel` cuts the work; see `_tile_config`."""
    block_m: int  # rows of x per program (fixed: never chosen by M)
    block_n: int  # output features per program
    block_k: int  # K step of the accumulation loop
    num_warps: int
    num_stages: int  # software-pipeline depth of the K loop (bytes in flight per program)
    split_k: int = 1  # programs sharing one output tile, each over a fixed K range
    tma: bool = False  # calls of at least block_m rows load their tiles by the tensor memory accelerator (Hopper)


def _tile_config(N: int, K: int, dtype: torch.dtype, on_gpu: bool) -> TileConfig:
    """The tile config for a weight [N, K] of `dtype`: a function of those alone, never of the row count M,
    because a config chosen by M would give a 1-row decode and a 64-row tree step different reduction
    schedules, hence different bits (the very thing this kernel exists to avoid).

    GPU (bf16/fp16, memory-bound at decode sizes): BLOCK_M = 64, so that a tree step of up to 64 rows reads
    each weight tile once (a 1-row decode then wastes tensor-core work, which it has to spare). The rest was
    read off `python -m bench.linear --sweep` on an H200 (132 SMs; bench/linear-sweep.txt; bench/RESULTS.md,
    "Exact greedy"), choosing by the sum of the 1-row and 64-row times: wide matrices (w13, wqkv, lm_heads) take
    64-feature tiles (a 7B's wqkv 128-feature ones: bench/linear-sweep-7b-n128.txt), narrow ones with a long K (a
    7B's wo) 32-feature tiles with 256-long K steps, which keep more of each weight row in flight per program, and
    the down projections (K >= 8192: a 7B's w2) 64-feature tiles with K split in two (then timed inside graphed
    steps); the small matrices of a 135M model, whose calls are bound by launch latency, take 32 x 128 tiles, and
    the smallest (up to 2^20 weights: its wqkv, wo and w2) 16-row ones, whose short per-program latency outweighs
    reading the weight once per 16 rows (from the L2).
    Interpreter (CPU tests): small tiles, so tests are quick and K takes several steps and a tail.
    """
    if not on_gpu:
        return TileConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=1)
    cfg = _gpu_tile_config(N, K, dtype)
    # Tree steps load by the TMA where it measured faster (bench/linear_tma.py, H200): the 64-row tiles, 0.5-6.9% a
    # call for a 7B's matrices at 64 rows, 3.4-3.7% for a 135M model's w13 and lm_head; graphed 64-node tree steps
    # 2.9% (7B) and 1.5-3.6% (135M-shaped, two calls) faster. The 16-row tiles of the 135M's smallest matrices ran
    # 6-9% slower that way; fp32, not timed, keeps the per-thread loads.
    return cfg._replace(tma=cfg.block_m == 64 and dtype != torch.float32)


def _gpu_tile_config(N: int, K: int, dtype: torch.dtype) -> TileConfig:
    if dtype == torch.float32:  # exact fp32 products run on CUDA cores: smaller tiles, same schedule idea
        return TileConfig(block_m=64, block_n=16, block_k=32, num_warps=4, num_stages=3)
    if N >= 16384:  # w13 [22016, 4096], [28672, 4096] (Llama-3 8B, Mistral 7B), lm_heads [32000, 4096] and more
        # 4 stages (64 KB of shared memory a program, 3 programs an SM) only while the grid fits one wave of an
        # H200's 132 SMs, N <= 396 * 64: a 7B's w13 then takes 45 µs, not 49; past it, 3 stages (4 programs an SM),
        # or the last programs run as a second wave (Llama-3 8B's w13 with 4 stages: decode step 5.30 ms, not 4.80).
        return TileConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4 if N <= 396 * 64 else 3)
    if N >= 12288 and K >= 4096:  # wqkv without grouped queries: a 7B's [12288, 4096] (a 13B's too, not timed)
        # 128-feature tiles, 4 stages (192 KB, one program an SM): 96 programs, not 192 of 64 features, each with
        # twice the bytes in flight; 26.2 µs at one row, not 27.7. Graphed 7B steps: decode 3.994 ms, not 4.039,
        # tree 4.522, not 4.532 (bench/RESULTS.md).
        return TileConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)
    if N >= 6144 and K >= 2048:  # wqkv with grouped queries [6144, 4096] (Llama-3 8B, Mistral 7B)
        # 32 KB of shared memory a stage: 3 stages (2 programs an SM) for a grid of two programs an SM; a grid of at
        # most one an SM takes 5 (Llama-3 8B's wqkv: 15.9 µs at one row, not 22.8 with the 32 x 256 tiles below,
        # whose 192 KB a program ran its 192 programs in two waves).
        return TileConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=5 if N <= 132 * 64 else 3)
    if K >= 8192 and 2 * triton.cdiv(N, 64) <= 132:  # down projections: w2 [4096, 11008], [4096, 14336] (Llama-3 8B)
        # Two K halves in two programs: 128 programs of 64 features fill the SMs once, where
        # the 32 x 256 tiles below gave a 7B's w2 128 programs of half the bytes in flight each. Graphed steps, 7B:
        # decode 4.106 ms, not 4.161, tree 4.664, not 4.677; Llama-3 8B: 4.574 and 5.419, not 4.643 and 5.469.
        # (The same split for wo [4096, 4096] made the tree steps 1% slower.)
        return TileConfig(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=2)
    if N * K <= 1 << 20:  # SmolLM2-135M's wqkv [960, 576], wo [576, 576], w2 [576, 1536]
        return TileConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=5)
    if K >= 2048:  # wo [4096, 4096]; down projections of wider models (a 13B's w2 [5120, 13824])
        return TileConfig(block_m=64, block_n=32, block_k=256, num_warps=4, num_stages=4)
    return TileConfig(block_m=64, block_n=32, block_k=128, num_warps=4, num_stages=4)


def linear_reference(x, weight, bias=None):
    """x [..., K], weight [N, K], bias [N] or None -> x @ weight^T + bias [..., N]: the definition."""
    return F.linear(x, weight, bias)


def runs_row_invariant_kernel(x, params) -> bool:
    """Whether linear layers of these parameters (None entries skipped) run the row-invariant Triton kernel on x:
    Triton kernels in use, row invariance on, and no gradient wanted (the kernel has no autograd; F.linear has)."""
    needs_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    return use_triton(x) and row_invariant() and not needs_grad


def linear(x, weight, bias=None):
    """Dispatch: the row-invariant Triton kernel when `runs_row_invariant_kernel`, else torch's product
    (`torch_linear`: cuBLAS's on a GPU; see module docstring). Autograd always goes through F.linear."""
    if runs_row_invariant_kernel(x, (weight, bias)):
        return linear_triton(x, weight, bias)
    return torch_linear(x, weight, bias)


def torch_linear(x, weight, bias=None):
    """x @ weight^T + bias as torch computes it fastest: F.linear, except for a float32 product on a CPU of at most
    CPU_WEIGHT_LEFT_MAX_ROWS rows that needs no gradient, which is computed as (weight @ x^T)^T, of two rows at least.

    Why: a decode step's products are bound by streaming the weights from memory. On this project's CPU machines
    (torch's MKL on 2 AMD EPYC cores) F.linear streamed the default model's lm_head [49152, 576] at 12 GB/s for one
    row (8.8 ms) and at 4-7.5 GB/s for 2 to 32 rows (15-27 ms), while the product with the weight as its left operand
    streamed it at 40 GB/s for 2 rows (2.8 ms) and 17 GB/s for 8 (6.7 ms); it stayed 5-20% faster up to 128 rows,
    and F.linear was the faster at 256 and 512. One row is computed as two (itself twice), since torch turns a
    one-row product back into F.linear's kind. Plain decoding of the default model on a CPU ran 1.7-1.8x faster
    (bench/RESULTS.md). The sums run in another order than F.linear's, so the last bits differ from its, as
    F.linear's own do between row counts; float16 and bfloat16 products ran slower this way and keep F.linear."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    plain_bias = bias is None or bias.dtype == torch.float32 and bias.shape == weight.shape[:1]
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 2
            or not plain_bias or not 0 < rows <= CPU_WEIGHT_LEFT_MAX_ROWS or torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.linear(x, weight, bias)  # and its checks and messages for whatever the fast path does not take
    x2 = x.reshape(rows, K)
    out = torch.mm(weight, (torch.cat([x2, x2]) if rows == 1 else x2).t())  # [N, rows] (2 for one row)
    if bias is not None:
        out += bias[:, None]
    return out.t()[:rows].contiguous().reshape(*x.shape[:-1], weight.shape[0])


class NormedStream(NamedTuple):
    """The residual stream between two sublayers with the next RMSNorm half done, as `linear_into_residual` leaves
    it: what the next linear layer needs to compute linear(rmsnorm(h)) in its own kernel (`linear_of_normed`), so
    that under row invariance a transformer block runs no RMSNorm kernel of its own."""

    scaled: torch.Tensor  # [..., D] g * h, rounded to h's dtype: the next linear layer's input
    residual: torch.Tensor  # [..., D] the residual stream h itself
    sumsq: torch.Tensor  # [tiles, rows] float32: each row's squares of h, summed over each tile of D
    eps: float

    @property
    def shape(self) -> torch.Size:
        return self.residual.shape


def _input_rows(x) -> torch.Tensor:
    """The rows a linear layer's kernel reads for x: a tensor itself, a NormedStream's g * h."""
    return x.scaled if isinstance(x, NormedStream) else x


def _input_and_norm(x) -> tuple[torch.Tensor, dict]:
    """(`_input_rows(x)`, the `_run_linear` arguments that apply the norm x carries), x checked."""
    if isinstance(x, NormedStream):
        _check_stream(x)
        return x.scaled, dict(sumsq_in=x.sumsq, eps=x.eps)
    return x, {}


class RopeAndCache(NamedTuple):
    """What the fused q/k/v projection of an attention layer needs to rotate q and k and write k and v into the KV
    cache in its own epilogue (`linear_rope_and_cache`), as `kernels.rope_and_cache` takes them."""

    cos: torch.Tensor  # [T, D] or [B, T, D] float32: the RoPE tables at the tokens' positions
    sin: torch.Tensor
    cache: torch.Tensor  # the layer's [2, B, Hkv, S, D], contiguous (KVCache.layer)
    prefix_len: int | torch.Tensor  # the tokens go to cache slots prefix_len .. prefix_len + T - 1
    n_heads: int  # query heads (the projection's rows: n_heads, then Hkv key, then Hkv value heads of D)


def fuses_rope_and_cache(x, weight, bias, head_dim: int) -> bool:
    """Whether the fused q/k/v projection `weight` on x (a tensor or a NormedStream) rotates and writes the cache in
    its epilogue (`linear_rope_and_cache`): it runs the row-invariant kernel, head_dim is a power of 2 and each
    program's tile holds whole heads (a 7B's wqkv: 128-feature tiles of head_dim 128), with no split-K. Decided by
    the weight's shape, never by the row count, so a model's prefill, decode and tree steps all take one path."""
    rows = _input_rows(x)
    return (runs_row_invariant_kernel(rows, (weight, bias))
            and _tiles_hold_whole_heads(_tile_config(*weight.shape, rows.dtype, rows.is_cuda), head_dim))


def _tiles_hold_whole_heads(cfg: TileConfig, head_dim: int) -> bool:
    """Whether the epilogue of a program of `cfg` can rotate its tile's heads: head_dim a power of 2 (the epilogue
    splits each head's halves as tensors), whole heads in a tile, and no split-K (the epilogue runs once a tile)."""
    return head_dim & (head_dim - 1) == 0 and cfg.block_n % head_dim == 0 and cfg.split_k == 1


def linear_rope_and_cache(x, weight, bias, rope: RopeAndCache, *, config: TileConfig | None = None):
    """`rope_and_cache(q, k, v, ...)` of the fused projection q, k, v = linear(x, weight, bias) (x [B, T, K], or a
    NormedStream: linear_of_normed), in the projection's kernel: no (q, k, v) tensor and no RoPE kernel -> rotated
    q [B, Hq, T, D]. Row-invariant like `linear_triton` (every row computed and rotated on its own); only where
    `fuses_rope_and_cache`. `config` overrides `_tile_config` (tests), as in `linear_triton`: its tiles must hold whole
    heads."""
    rows, norm = _input_and_norm(x)
    if rows.dim() != 3:
        raise KernelInputError(f"a projection with RoPE takes x [B, T, K], not {tuple(rows.shape)}.")
    B, T, _ = rows.shape
    cache = rope.cache
    if cache.dim() != 5 or not cache.is_contiguous():
        raise KernelInputError(f"the fused projection writes a contiguous layer cache [2, B, Hkv, S, D], not "
                               f"{tuple(cache.shape)} (contiguous: {cache.is_contiguous()}); pass KVCache.layer(i).")
    Hkv, D = cache.shape[2], cache.shape[4]
    if weight.shape[0] != (rope.n_heads + 2 * Hkv) * D:
        raise KernelInputError(f"the fused projection's {weight.shape[0]} rows are not {rope.n_heads} query and "
                               f"2 x {Hkv} key/value heads of {D}; check n_heads against the cache.")
    prefix_len = check_rope_and_cache_inputs(B, T, Hkv, D, rows.dtype, rope.cos, rope.sin, cache, rope.prefix_len)
    cfg = config or _tile_config(*weight.shape, rows.dtype, rows.is_cuda)
    if not _tiles_hold_whole_heads(cfg, D):
        raise KernelInputError(f"a projection with RoPE needs tiles of whole heads ({cfg.block_n} features a tile, "
                               f"head_dim {D}, split-K {cfg.split_k}); check fuses_rope_and_cache first.")
    # (.contiguous(): no-ops for gathered tables)
    rope = rope._replace(cos=rope.cos.contiguous(), sin=rope.sin.contiguous(), prefix_len=prefix_len)
    return _run_linear(rows, weight, bias, cfg, rope=rope, **norm)[0]


def fuses_swiglu(x, weight, bias) -> bool:
    """Whether the MLP's fused gate/up projection `weight` [2I, K] on x (a tensor or a NormedStream) computes SwiGLU
    in its epilogue (`linear_swiglu`): it runs the row-invariant kernel, without split-K, and on a GPU its tiles are
    64 features or wider. Decided by the weight's shape, never by the row count.

    Why the width (H200, graphed steps, bench/RESULTS.md, twenty-third run): a 7B's and Llama-3 8B's w13, 64-feature
    tiles, ran their tree steps 1.2-1.6% faster with SwiGLU in the epilogue (`_swiglu_tile_config`); a 135M model's
    32-feature tiles ran its tree step 4.4% slower halved and its decode step 1.2% slower whole, so it keeps the
    SwiGLU kernel. The interpreter fuses every shape, so the CPU tests take the fused path through the model."""
    rows = _input_rows(x)
    if not runs_row_invariant_kernel(rows, (weight, bias)) or weight.shape[0] % 2:
        return False
    return _gate_up_takes_swiglu(*weight.shape, rows.dtype, rows.is_cuda)


def _gate_up_takes_swiglu(N: int, K: int, dtype: torch.dtype, on_gpu: bool) -> bool:
    """`fuses_swiglu`'s rule for a gate/up weight [N, K], given that the row-invariant kernel runs."""
    cfg = _tile_config(N, K, dtype, on_gpu)
    return cfg.split_k == 1 and (cfg.block_n >= 64 or not on_gpu)


def linear_swiglu(x, weight, bias=None, *, config: TileConfig | None = None):
    """`silu_mul(linear(x, weight, bias))` (x [..., K], or a NormedStream: linear_of_normed) in the projection's
    kernel: no [..., 2I] tensor and no SwiGLU kernel -> silu(gate) * up [..., I], the same bits. Row-invariant like
    `linear_triton`; only where `fuses_swiglu`. `config` overrides `_swiglu_tile_config` (tests)."""
    rows, norm = _input_and_norm(x)
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise KernelInputError(f"a projection with SwiGLU needs the fused gate/up weight [2I, K], an even number of "
                               f"rows; got {tuple(weight.shape)}.")
    cfg = config or _swiglu_tile_config(*weight.shape, rows.dtype, rows.is_cuda)
    if cfg.split_k != 1:
        raise KernelInputError(f"a projection with SwiGLU runs without split-K, not {cfg.split_k} splits; check "
                               f"fuses_swiglu first.")
    return _run_linear(rows, weight, bias, cfg, gate_up=True, **norm)[0]


def _swiglu_tile_config(N: int, K: int, dtype: torch.dtype, on_gpu: bool) -> TileConfig:
    """The tiles of the gate/up projection [N, K] with SwiGLU, each program loading a gate and an up tile a stage:
    the projection's own (`_tile_config`), with half the features where it pipelines 4 or more stages on a GPU.

    Measured (H200, graphed steps, bench/RESULTS.md, twenty-third run): a 7B's w13 (4 stages) with whole tiles holds
    96 KB of shared memory a program, 2 programs an SM, and its decode step ran 0.4% slower; halved, 64 KB and 3 an
    SM as without SwiGLU, level. Llama-3 8B's (3 stages, 72 KB whole) ran its decode step 0.8-1.0% slower halved
    and level whole; its tree step 1.6% faster either way."""
    cfg = _tile_config(N, K, dtype, on_gpu)
    return cfg._replace(block_n=cfg.block_n // 2) if on_gpu and cfg.num_stages >= 4 and cfg.block_n >= 64 else cfg


def linear_into_residual_reference(x, weight, bias, residual, norm_weight=None, eps=0.0):
    """residual + linear(x, weight, bias), rounded as those two ops round; with norm_weight, the NormedStream of
    the RMSNorm(norm_weight, eps) after it (its sumsq one tile of the whole D)."""
    h = F.linear(x, weight, bias) + residual
    if norm_weight is None:
        return h
    hf = h.float()
    return NormedStream((norm_weight.float() * hf).to(h.dtype), h, hf.pow(2).sum(-1).reshape(1, -1), eps)


def linear_of_normed_reference(stream: NormedStream, weight, bias=None):
    """linear(rmsnorm(h, g, eps), weight, bias), h = stream.residual, computed as the kernel does: 1 / rms times
    the product of stream.scaled (g * h) with the weight, plus the bias."""
    rstd = torch.rsqrt(stream.sumsq.sum(0) / stream.residual.shape[-1] + stream.eps)  # [rows]
    y = F.linear(stream.scaled.float(), weight.float()) * rstd.view(*stream.residual.shape[:-1], 1)
    return (y if bias is None else y + bias.float()).to(stream.residual.dtype)


def linear_into_residual(x, weight, bias, residual, norm_weight=None, eps=0.0):
    """`linear_into_residual_reference` in the Triton kernel's epilogue (see `_linear_kernel`): h, or the
    NormedStream of the next RMSNorm. Row-invariant like `linear_triton`; no autograd
    (callers check `runs_row_invariant_kernel`)."""
    N = weight.shape[0]
    if residual.shape != (*x.shape[:-1], N) or residual.dtype != x.dtype:
        raise KernelInputError(f"the residual {tuple(residual.shape)} ({residual.dtype}) must be shaped like the "
                               f"layer's output {(*x.shape[:-1], N)} in x's dtype ({x.dtype}).")
    if norm_weight is not None and (norm_weight.shape != (N,) or norm_weight.dtype != x.dtype):
        raise KernelInputError(f"the RMSNorm weight {tuple(norm_weight.shape)} ({norm_weight.dtype}) must be ({N},), "
                               f"the layer's output, in x's dtype ({x.dtype}).")
    out, h, sumsq = _run_linear(x, weight, bias, residual=residual, norm_weight=norm_weight)
    return h if norm_weight is None else NormedStream(out, h, sumsq, eps)


def linear_of_normed(stream: NormedStream, weight, bias=None):
    """`linear_of_normed_reference` in the Triton kernel (see `_linear_kernel`). Row-invariant like `linear_triton`."""
    _check_stream(stream)
    return _run_linear(stream.scaled, weight, bias, sumsq_in=stream.sumsq, eps=stream.eps)[0]


def _check_stream(stream: NormedStream) -> None:
    rows = stream.residual.reshape(-1, stream.residual.shape[-1]).shape[0]
    if stream.sumsq.dim() != 2 or stream.sumsq.shape[1] != rows:
        raise KernelInputError(f"the stream's sums of squares {tuple(stream.sumsq.shape)} must be [tiles, rows] "
                               f"for its {tuple(stream.residual.shape)} rows; make the stream with "
                               f"linear_into_residual.")


@triton.jit(do_not_specialize=["M"])
def _linear_kernel(x_ptr, w_ptr, x_desc, w_desc, b_ptr, out_ptr, partial_ptr, counter_ptr, residual_ptr, norm_w_ptr,
                   h_ptr, sumsq_in_ptr, sumsq_out_ptr, eps, M, N, K, stride_wn, k_per_split,
                   HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr,
                   NORM_IN_TILES: tl.constexpr, NORM_IN_BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                   NORM_OUT: tl.constexpr, TMA: tl.constexpr, GATE_UP: tl.constexpr):
    """A linear layer: `_linear_program` without RoPE (see there)."""
    _linear_program(x_ptr, w_ptr, x_desc, w_desc, b_ptr, out_ptr, partial_ptr, counter_ptr, residual_ptr, norm_w_ptr,
                    h_ptr, sumsq_in_ptr, sumsq_out_ptr, eps,
                    cos_ptr=0, sin_ptr=0, cache_ptr=0, prefix_len=0, T=1, S=0, n_q_heads=0, n_kv_heads=0, stride_cb=0,
                    M=M, N=N, K=K, stride_wn=stride_wn, k_per_split=k_per_split, HAS_BIAS=HAS_BIAS, SPLIT_K=SPLIT_K,
                    DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                    PREFETCH_LINES=PREFETCH_LINES, LINE=LINE, PDL=PDL, NORM_IN_TILES=NORM_IN_TILES,
                    NORM_IN_BLOCK=NORM_IN_BLOCK, ADD_RESIDUAL=ADD_RESIDUAL, NORM_OUT=NORM_OUT, TMA=TMA, ROPE_HEAD_DIM=0,
                    PREFIX_IS_PTR=False, GATE_UP=GATE_UP)


# (a kernel of its own, so that the other linear layers' launches do not carry the RoPE arguments: a first version
# that passed them to every launch ran a launch-bound SmolLM2-135M-shaped tree step 1.2% slower, part of it the
# arguments, bench/RESULTS.md)
@triton.jit(do_not_specialize=["M", "T", "prefix_len"])
def _linear_rope_kernel(x_ptr, w_ptr, x_desc, w_desc, b_ptr, out_ptr, sumsq_in_ptr, eps, cos_ptr, sin_ptr, cache_ptr,
                        prefix_len, T, S, n_q_heads, n_kv_heads, stride_cb, M, N, K, stride_wn,
                        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH_LINES: tl.constexpr,
                        LINE: tl.constexpr, PDL: tl.constexpr, NORM_IN_TILES: tl.constexpr,
                        NORM_IN_BLOCK: tl.constexpr, TMA: tl.constexpr, ROPE_HEAD_DIM: tl.constexpr,
                        PREFIX_IS_PTR: tl.constexpr):
    """The fused q/k/v projection rotating q and k and writing the KV cache: `_linear_program` with RoPE (no split-K,
    no residual)."""
    _linear_program(x_ptr, w_ptr, x_desc, w_desc, b_ptr, out_ptr,
                    partial_ptr=0, counter_ptr=0, residual_ptr=0, norm_w_ptr=0, h_ptr=0, sumsq_in_ptr=sumsq_in_ptr,
                    sumsq_out_ptr=0, eps=eps, cos_ptr=cos_ptr, sin_ptr=sin_ptr, cache_ptr=cache_ptr,
                    prefix_len=prefix_len, T=T, S=S, n_q_heads=n_q_heads, n_kv_heads=n_kv_heads, stride_cb=stride_cb,
                    M=M, N=N, K=K, stride_wn=stride_wn, k_per_split=K, HAS_BIAS=HAS_BIAS, SPLIT_K=1,
                    DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                    PREFETCH_LINES=PREFETCH_LINES, LINE=LINE, PDL=PDL, NORM_IN_TILES=NORM_IN_TILES,
                    NORM_IN_BLOCK=NORM_IN_BLOCK, ADD_RESIDUAL=False, NORM_OUT=False, TMA=TMA,
                    ROPE_HEAD_DIM=ROPE_HEAD_DIM, PREFIX_IS_PTR=PREFIX_IS_PTR, GATE_UP=False)


@triton.jit
def _linear_program(x_ptr, w_ptr, x_desc, w_desc, b_ptr, out_ptr, partial_ptr, counter_ptr, residual_ptr, norm_w_ptr,
                    h_ptr, sumsq_in_ptr, sumsq_out_ptr, eps, cos_ptr, sin_ptr, cache_ptr, prefix_len, T, S, n_q_heads,
                    n_kv_heads, stride_cb, M, N, K, stride_wn, k_per_split,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr, PDL: tl.constexpr,
                    NORM_IN_TILES: tl.constexpr, NORM_IN_BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                    NORM_OUT: tl.constexpr, TMA: tl.constexpr, ROPE_HEAD_DIM: tl.constexpr,
                    PREFIX_IS_PTR: tl.constexpr, GATE_UP: tl.constexpr):
    """Program (m, n, s): rows m*BLOCK_M.. and output features n*BLOCK_N.., over K range s.

    x [M, K] contiguous; w [N, K] with row stride stride_wn (K contiguous); b [N]; out [M, N] = x @ w^T + b,
    rounded once to out's dtype (with GATE_UP, w [2N, K], w_desc over all 2N rows, and b [2N]: see below). K range
    s is [s * k_per_split, (s + 1) * k_per_split), k_per_split a multiple of BLOCK_K, so the steps are the same
    BLOCK_K-aligned steps for every split count.
    SPLIT_K > 1: each program stores its float32 sum at partial [SPLIT_K, M, N][s], then counts itself in at
    counter_ptr[tile] (int32, zero before the call); the last to arrive sums the tile's partials in split order,
    writes out, and sets the counter back to zero.
    PDL: first prefetch PREFETCH_LINES lines of LINE elements of each weight row into the L2, then wait for the
    kernel that wrote x (dependent_launch.py).
    TMA: the x and weight tiles come through x_desc [M, K] and w_desc [N, K] (tensor descriptors of
    [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K] boxes), not x_ptr and w_ptr: the same tiles, the same bits.
    Without TMA, x_desc and w_desc are stand-in tensors the kernel never reads.
    RMSNorm folded in (`NormedStream`; with split-K, in the last-arriving program):
      NORM_IN_TILES > 0: x is g * h of a stream, sumsq_in [NORM_IN_TILES, M] float32 its rows' squares summed
        per tile; out = rstd * acc + b, rstd = 1 / sqrt(sum of the tiles / K + eps) (one fixed reduction).
      ADD_RESIDUAL: h = round(round(acc + b) + residual) [M, N] (linear(x) + residual's roundings), stored at h_ptr
        (only there: without NORM_OUT, h_ptr is out's buffer);
        with NORM_OUT, out = round(g * h), g = norm_w [N], and sumsq_out [cdiv(N, BLOCK_N), M] = h's squares summed
        over this tile's features (one reduction of a fixed-shape tile: each row alike whatever the others hold).
    RoPE and the KV cache written in the epilogue (ROPE_HEAD_DIM > 0: the fused q/k/v projection, tiles of whole
    heads, no split-K): out is the rotated q [B, n_q_heads, T, ROPE_HEAD_DIM], and the rotated keys and the values
    go to cache [2, B, n_kv_heads, S, ROPE_HEAD_DIM] at slots prefix_len + t (`rope_cache.rope_and_cache_tile`,
    which says what cos_ptr, sin_ptr and stride_cb are).
    SwiGLU in the epilogue (GATE_UP: the MLP's fused gate/up projection, w [2N, K], gate rows then up rows; no
    split-K, no residual): a second accumulator over the up rows n*BLOCK_N + N.., and out [M, N] = silu(gate) * up
    of the two rounded outputs, computed as kernels/swiglu.py's kernel does (the same bits as the projection's [M, 2N]
    output through that kernel).
    """
    tl.static_assert(not GATE_UP or (SPLIT_K == 1 and not ADD_RESIDUAL and ROPE_HEAD_DIM == 0),
                     "SwiGLU in the epilogue takes no split-K, residual or RoPE")
    m_block, n_block, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = n_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features = weight rows
    row_ok = rows < M
    col_ok = cols < N
    k_start = split * k_per_split
    # (with GATE_UP only the gate rows: prefetching the up rows too measured no faster, a 7B step +0.2%, H200,
    # bench/RESULTS.md, twenty-third run)
    if PDL and PREFETCH_LINES > 0:  # addresses clamped into the weight: a prefetch must not leave it
        line_k = tl.minimum(k_start + tl.arange(0, PREFETCH_LINES) * LINE, K - 1)  # [PREFETCH_LINES]
        prefetch_l2(w_ptr + tl.minimum(cols, N - 1)[:, None].to(tl.int64) * stride_wn + line_k[None, :])
    wait_for_previous_kernels(PDL)
    k_end = tl.minimum(k_start + k_per_split, K)
    if not TMA:  # per-thread loads: the tiles' addresses, moved along K step by step
        ks = k_start + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        # int64 row offsets: M * K and N * K can pass 2**31 (long prefills, big vocabularies)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K], K contiguous

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATE_UP:  # the up projection's features, N weight rows further on
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):  # in order: the accumulation's one fixed schedule
        if TMA:  # the same tiles, their rows and columns past the tensors' ends filled with zeros by the copy engine
            x = x_desc.load([m_block * BLOCK_M, k0])  # [BLOCK_M, BLOCK_K]
            w = w_desc.load([n_block * BLOCK_N, k0])  # [BLOCK_N, BLOCK_K]
            if GATE_UP:
                w_up = w_desc.load([N + n_block * BLOCK_N, k0])
        else:
            k_ok = (k0 + tl.arange(0, BLOCK_K)) < K  # only the last step of all can be short
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            if GATE_UP:
                w_up = tl.load(w_ptrs + N * stride_wn, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if GATE_UP:
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=DOT_PRECISION)

    out_mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]  # [BLOCK_M, BLOCK_N] into out (and each split's partials)
    last = True
    if SPLIT_K > 1:
        split_size = M.to(tl.int64) * N
        tl.store(partial_ptr + split * split_size + offsets, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial stored before the count below releases them
        tile = m_block * tl.num_programs(1) + n_block
        last = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:  # the partials read through the L2 (".cg"), where the other programs' stores are
            acc = tl.load(partial_ptr + offsets, mask=out_mask, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                acc += tl.load(partial_ptr + s * split_size + offsets, mask=out_mask, cache_modifier=".cg")
            tl.store(counter_ptr + tile, 0)
    if last:
        if NORM_IN_TILES > 0:  # the RMSNorm before this layer: its 1 / rms, from the stream's tile sums
            tiles = tl.arange(0, NORM_IN_BLOCK)  # [NORM_IN_BLOCK]: NORM_IN_TILES rounded up to a power of 2
            sums = tl.load(sumsq_in_ptr + tiles[:, None] * M + rows[None, :],
                           mask=(tiles < NORM_IN_TILES)[:, None] & row_ok[None, :], other=0.0)  # [.., BLOCK_M]
            rstd = tl.rsqrt(tl.sum(sums, 0) / K + eps)[:, None]
            acc = acc * rstd
            if GATE_UP:
                acc_up = acc_up * rstd
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if GATE_UP:
                acc_up += tl.load(b_ptr + N + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(out_ptr.dtype.element_ty)
        if GATE_UP:  # silu(gate) * up of the rounded outputs, as kernels/swiglu.py computes it
            gate, up = y.to(tl.float32), acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
            tl.store(out_ptr + offsets, (gate * tl.sigmoid(gate) * up).to(y.dtype), mask=out_mask)
        elif ROPE_HEAD_DIM > 0:
            rope_and_cache_tile(y, rows, n_block * (BLOCK_N // ROPE_HEAD_DIM), M, cos_ptr, sin_ptr, out_ptr, cache_ptr,
                                prefix_len, T, S, n_q_heads, n_kv_heads, stride_cb, PREFIX_IS_PTR,
                                BLOCK_N // ROPE_HEAD_DIM, ROPE_HEAD_DIM)
        elif ADD_RESIDUAL:  # the residual add and, with NORM_OUT, the next RMSNorm's per-feature part
            r = tl.load(residual_ptr + offsets, mask=out_mask, other=0.0)
            h = (y.to(tl.float32) + r.to(tl.float32)).to(y.dtype)  # masked features: 0 (masked rows: never stored)
            tl.store(h_ptr + offsets, h, mask=out_mask)
            if NORM_OUT:
                hf = h.to(tl.float32)
                tl.store(sumsq_out_ptr + n_block * M + rows, tl.sum(hf * hf, 1), mask=row_ok)
                g = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + offsets, (g[None, :] * hf).to(y.dtype), mask=out_mask)
        else:
            tl.store(out_ptr + offsets, y, mask=out_mask)


def _loads_by_tma(cfg: TileConfig, x2, weight) -> bool:
    """Whether this call loads its tiles by the tensor memory accelerator: its config says so, x2 [M, K] fills at
    least one tile of rows, the device has a TMA (sm_90 and newer, measured on sm_90; the interpreter emulates
    one), and the starts and row strides are 16-byte aligned, as it requires. Why a tile of rows: a 1-row decode
    by TMA (a first version took it at every row count) ran a 7B's w13 74% slower than the per-thread loads, which
    skip the tile's 63 masked rows (bench/RESULTS.md, twentieth run). Outside a CUDA graph each such launch also
    encodes its two descriptors on the host (a prefill, an eager tree step; graphed steps hold them captured)."""
    if not (cfg.tma and x2.shape[0] >= cfg.block_m):  # (every decode call ends here)
        return False
    has_tma = interpreting() if not x2.is_cuda else hopper_or_newer(x2.device)
    nbytes = x2.element_size()
    return has_tma and all(n % 16 == 0 for n in (x2.data_ptr(), weight.data_ptr(), x2.stride(0) * nbytes,
                                                 weight.stride(0) * nbytes))


def _tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 counters, zero, for split-K's last-arriving programs (one per output tile)."""
    counters = _TILE_COUNTERS.setdefault(device, [])
    if not counters or counters[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise KernelInputError("a split-K linear layer met a larger grid than before inside a CUDA graph "
                                   "capture; run the step once before capturing it (a warm-up).")
        counters.append(torch.zeros(max(n, MIN_TILE_COUNTERS), dtype=torch.int32, device=device))
    return counters[-1]


def _check_inputs(x, weight, bias) -> None:
    if weight.dim() != 2:
        raise KernelInputError(f"the linear weight must be 2-D [N, K], not {tuple(weight.shape)}; pass the "
                               f"layer's weight matrix.")
    N, K = weight.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise KernelInputError(f"x {tuple(x.shape)} does not fit the weight [N={N}, K={K}]: x's last dimension "
                               f"must be K = {K}.")
    if x.dtype not in DTYPES:
        raise KernelInputError(f"the Triton linear takes float32, float16 or bfloat16 inputs, not {x.dtype}.")
    if weight.dtype != x.dtype or bias is not None and bias.dtype != x.dtype:
        raise KernelInputError(f"x ({x.dtype}), weight ({weight.dtype}) and bias "
                               f"({None if bias is None else bias.dtype}) must share one dtype; cast the "
                               f"layer to the activations' dtype.")
    if bias is not None and bias.shape != (N,):
        raise KernelInputError(f"the bias has shape {tuple(bias.shape)} but must be ({N},) to match the "
                               f"weight [N={N}, K={K}].")
    if K > 1 and weight.stride(1) != 1:
        raise KernelInputError("the linear weight's rows must be contiguous (stride 1 along K); make it "
                               "contiguous once when loading the model (weight.contiguous()), not per call.")


def linear_triton(x, weight, bias=None, *, config: TileConfig | None = None):
    """Same contract as `linear_reference`, row-invariant (see module docstring), in one launch. `config`
    overrides `_tile_config` (the benchmark's sweep; tests of split-K): any config is row-invariant, as long as
    one config serves every row count."""
    return _run_linear(x, weight, bias, config)[0]


def _run_linear(x, weight, bias, config: TileConfig | None = None, *, residual=None, norm_weight=None,
                sumsq_in=None, eps=0.0, rope: RopeAndCache | None = None, gate_up: bool = False):
    """The launch of `_linear_kernel` (with rope: `_linear_rope_kernel`) -> (out, h, sumsq_out): out [..., N] (g * h
    with norm_weight; with rope, the rotated q [B, Hq, T, D]), and with a residual h [..., N] and, with norm_weight,
    sumsq_out [tiles, M] (else None). sumsq_in: x is a NormedStream's scaled rows, their sums of squares [tiles, M].
    gate_up: the weight is a fused gate/up projection, out [..., N / 2] = silu(gate) * up."""
    _check_inputs(x, weight, bias)
    N, K = weight.shape  # (N: the weight's rows; the kernel's N is the output's features, N / 2 with gate_up)
    cfg = config or _tile_config(N, K, x.dtype, x.is_cuda)
    n_out = N // 2 if gate_up else N
    x2 = x.reshape(-1, K).contiguous()  # [M, K]; a no-op for the usual contiguous activations
    M = x2.shape[0]
    if rope is None:
        out = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    else:  # x [B, T, K]: the rotated q, [B, Hq, T, D]
        out = torch.empty(x.shape[0], rope.n_heads, x.shape[1], rope.cache.shape[-1], dtype=x.dtype, device=x.device)
    # h: the new residual stream. Without a norm it is the output itself (the kernel stores h only, at h_ptr).
    h = torch.empty_like(out) if residual is not None and norm_weight is not None else out
    m_blocks, n_blocks = triton.cdiv(M, cfg.block_m), triton.cdiv(n_out, cfg.block_n)
    sumsq_out = torch.empty(n_blocks, M, dtype=torch.float32, device=x.device) if norm_weight is not None else None
    if M == 0 or N == 0:  # (K = 0 never gets here: x.reshape(-1, 0) refuses)
        return out, h if residual is not None else None, sumsq_out
    # The K ranges of the splits: whole BLOCK_K steps, the same for every M.
    k_steps = triton.cdiv(K, cfg.block_k)
    split_k = min(cfg.split_k, k_steps)
    k_per_split = triton.cdiv(k_steps, split_k) * cfg.block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty split (e.g. 5 steps in 4 splits of 2 is 3 splits)
    if split_k > 1:  # float32 partial sums [split_k, M, N], and a counter per output tile
        partial = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        counters = _tile_counters(x.device, m_blocks * n_blocks)
    else:
        partial = counters = out  # stand-in pointers the kernel never reads
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else weight  # weight: a stand-in pointer the kernel never reads (as below)
    line = 128 // weight.element_size()  # weight elements per 128-byte line
    prefetch_lines = min(PREFETCH_BYTES // 128, triton.cdiv(k_per_split, line))
    prefetch_lines = 1 << (prefetch_lines.bit_length() - 1) if prefetch_lines else 0  # a power of 2, at most that
    norm_in_tiles = 0 if sumsq_in is None else sumsq_in.shape[0]
    tma = _loads_by_tma(cfg, x2, weight)  # descriptors of x and the weight, or stand-ins the kernel never reads
    x_desc = TensorDescriptor.from_tensor(x2, [cfg.block_m, cfg.block_k]) if tma else x2
    w_desc = TensorDescriptor(weight, [N, K], [weight.stride(0), 1], [cfg.block_n, cfg.block_k]) if tma else weight
    # (Inside a CUDA graph the descriptors are kernel arguments, captured by value with the addresses they hold.)
    grid = (m_blocks, n_blocks, split_k)
    sumsq_in = out if sumsq_in is None else sumsq_in.contiguous()
    shared = dict(
        # (tf32 names the float32 inputs' mode; 16-bit inputs ignore it)
        HAS_BIAS=has_bias, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PREFETCH_LINES=prefetch_lines, LINE=line,
        NORM_IN_TILES=norm_in_tiles, NORM_IN_BLOCK=triton.next_power_of_2(max(norm_in_tiles, 1)), TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x))
    if rope is not None:  # (split_k is 1: linear_rope_and_cache checked the config)
        cos, sin, cache = rope.cos, rope.sin, rope.cache
        per_row_tables = cos.dim() == 3  # [B, T, D], else [T, D] shared by the batch rows: a batch stride of 0
        _linear_rope_kernel[grid](
            x2, weight, x_desc, w_desc, b, out, sumsq_in, float(eps), cos, sin, cache, rope.prefix_len,
            x.shape[1], cache.shape[3], rope.n_heads, cache.shape[2], cos.stride(0) if per_row_tables else 0,
            M, N, K, weight.stride(0),
            ROPE_HEAD_DIM=cache.shape[4], PREFIX_IS_PTR=isinstance(rope.prefix_len, torch.Tensor), **shared)
        return out, None, None
    _linear_kernel[grid](
        x2, weight, x_desc, w_desc, b, out, partial, counters,
        out if residual is None else residual.reshape(M, N).contiguous(),
        b if norm_weight is None else norm_weight.contiguous(), h, sumsq_in, out if sumsq_out is None else sumsq_out,
        float(eps), M, n_out, K, weight.stride(0), k_per_split, SPLIT_K=split_k, ADD_RESIDUAL=residual is not None,
        NORM_OUT=norm_weight is not None, GATE_UP=gate_up, **shared)
    return out, h if residual is not None else None, sumsq_out

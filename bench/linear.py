"""Benchmark of the row-invariant Triton linear (kernels/linear.py) against cuBLAS (F.linear), on the weight
matrices of a Llama-7B-shaped model and of SmolLM2-135M (or of --models), at the row counts of a decode step
and a tree step.

    python -m bench.linear [--sweep] [--json [FILE]]            # on a CUDA machine, bf16
    python -m bench.linear --sweep --models Llama-3-8B           # another model's matrices
    python -m bench.linear --sweep-tree                          # tiles for the tree step, same K schedule
    TRITON_INTERPRET=1 python -m bench.linear --smoke [--sweep]  # without a GPU: tiny shapes, float32

For each matrix: a correctness check (the kernel at the largest row count against F.linear computed in
float32, every output poisoned first), then row invariance, bitwise (row i of the M = 64 call against the
1-row call on row i, every row; for the kernel and, to show the problem it solves, for cuBLAS), then the
timing table: M = 1, 16, 64 rows through the kernel's own config (`_tile_config`) and through F.linear.
GB/s counts the weight's bytes only, which is what a memory-bound linear layer must move; % copy is that
share of the device-to-device copy bandwidth (bench/timer.py).

Timing is how a graphed decode step pays for a layer: a CUDA graph of back-to-back calls, timed by
bench/timer.py, divided by the calls. The calls cycle through copies of the weight that together hold
WORKING_SET_L2 x the L2, so that each call streams its weight from HBM as a forward through all the
layers does (a lone small matrix would otherwise be read from the L2).

--sweep then times a grid of tile configs (SWEEP_*: BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, then split-K
for the best of each BLOCK_N) per matrix at M = 1 and M = 64, each config checked against the reference and
for invariance on two rows before it is timed, and prints the best few per matrix: what to put in
`kernels.linear._tile_config`. Configs that cannot run (shared memory) are skipped. The configs are compiled
first in parallel worker processes (Triton's disk cache then serves them), since compiling a hundred configs
one by one would take minutes of the GPU slot.

--sweep-tree times, per matrix, the configs that keep `_tile_config`'s schedule over K (BLOCK_M, BLOCK_K,
split-K) and change only how the features are cut and pipelined (BLOCK_N, warps, stages), at the tree step's
M = 16 and 64: each call checked first, every row bit for bit against the 1-row calls of `_tile_config`'s own
config. A config that passes could serve the tree step while the decode step keeps its own: each output element
still sums the same products in the same order. (An MMA computes an element from its own row
and column; that the tile's width leaves its bits alone is what the check tests, on this GPU.)

--smoke (the tests' run, in Triton's interpreter on a CPU) takes the same path on two tiny float32 matrices, with
host timing of eager calls in place of CUDA graphs and a two-config sweep. On a GPU it times CUDA graphs of one
weight copy: outsizing the L2 with a tiny matrix takes some 50,000 copies, a graph of as many calls per timing,
minutes of launches for a run that checks the path, not the speed.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import multiprocessing
import os
import statistics
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import triton

from kernels.linear import TileConfig, _tile_config, linear_triton
from kernels.testing import TOLERANCE, poisoned_empty, rel_error, rows_differing_from_one_row_calls, same_bits
from nanomedusa.cli import ArgumentParser, exit_with, run_reporting_errors

from .checks import check_kernel_benchmark
from .report import DEFAULT_OUT, device_name, metadata, print_table, save, say
from .steps import SHAPES
from .timer import capture_graph, copy_bandwidth, time_ms

DEFAULT_JSON = str(DEFAULT_OUT / "linear.json")  # --json alone (git-ignored: bench/linear.json is a record)


class Matrix(NamedTuple):
    model: str
    name: str
    N: int  # output features
    K: int  # input features


def model_matrices(model: str, shape: dict) -> list[Matrix]:
    """The weight matrices of one decoder layer and the lm_head of a model of `shape` (bench/steps.py's SHAPES),
    [N, K] as nn.Linear holds them."""
    dim, n_heads, n_kv_heads = shape["big_dim"], shape["big_heads"], shape["big_kv_heads"]
    head_dim = dim // n_heads
    return [Matrix(model, "wqkv", (n_heads + 2 * n_kv_heads) * head_dim, dim),
            Matrix(model, "wo", dim, n_heads * head_dim),
            Matrix(model, "w13", 2 * shape["big_ffn"], dim),
            Matrix(model, "w2", dim, shape["big_ffn"]),
            Matrix(model, "lm_head", shape["big_vocab"], dim)]


MODELS = {model: model_matrices(model, SHAPES[shape])
          for model, shape in (("7B", "7b"), ("SmolLM2-135M", "smollm2-135m"), ("Llama-3-8B", "llama3-8b"))}
DEFAULT_MODELS = ("7B", "SmolLM2-135M")
MATRICES = [m for name in DEFAULT_MODELS for m in MODELS[name]]
ROWS = (1, 16, 64)  # decode, a small tree, the default 64-node tree; the sweep takes the first and last
SWEEP_BLOCK_M, SWEEP_BLOCK_N, SWEEP_BLOCK_K = (16, 64), (16, 32, 64), (64, 128, 256)
SWEEP_WARPS, SWEEP_STAGES = (4, 8), (3, 4, 5)
SWEEP_SPLITS = (2, 4)  # tried on the best config of each BLOCK_N, per matrix
TREE_BLOCK_N, TREE_WARPS, TREE_STAGES = (32, 64, 128, 256), (4, 8), (2, 3, 4, 5)  # --sweep-tree's grid
TREE_ROWS = (16, 64)
SWEEP_SHOW = 5  # configs printed per matrix
WORKING_SET_L2 = 3  # the weight copies of one graph hold this many times the L2
MIN_CALLS = 8  # calls per graph at least

SMOKE_MATRICES = [Matrix("tiny", "a", 24, 40), Matrix("tiny", "b", 40, 24)]
SMOKE_ROWS = (1, 16)
SMOKE_SWEEP = [TileConfig(16, 16, 32, 4, 1), TileConfig(16, 32, 16, 4, 1)]
SMOKE_SPLITS = (2,)
SMOKE_TREE_BLOCK_N = (16, 32)


class Reps(NamedTuple):
    """time_ms settings: samples, rep_ms (GPU time per timing), warmup_ms."""
    samples: int
    rep_ms: float
    warmup_ms: float


TABLE_REPS = Reps(10, 40.0, 20.0)
SWEEP_REPS = Reps(5, 5.0, 5.0)


def config_label(cfg: TileConfig) -> str:
    return (f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
            + (f" split{cfg.split_k}" if cfg.split_k > 1 else ""))


# ------------------------------------------------------------------------------------------- inputs

class Case(NamedTuple):
    """One matrix's inputs: copies of its weight (each call of a graph reads the next) and x per row count."""
    matrix: Matrix
    weights: list[torch.Tensor]  # [N, K] each, same values, distinct memory
    x: dict[int, torch.Tensor]  # M -> [M, K]
    ref: torch.Tensor  # x[max M] @ weight^T computed in float32, once: every config is checked against it

    @property
    def weight_bytes(self) -> int:
        return self.weights[0].numel() * self.weights[0].element_size()


def make_case(matrix: Matrix, rows, dtype, device, l2_bytes: int) -> Case:
    weight = (matrix.K**-0.5 * torch.randn(matrix.N, matrix.K, device=device)).to(dtype)
    copies = max(1, math.ceil(WORKING_SET_L2 * l2_bytes / (weight.numel() * weight.element_size())))
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    x = {M: torch.randn(M, matrix.K, device=device).to(dtype) for M in rows}
    return Case(matrix, weights, x, F.linear(x[max(rows)].float(), weight.float()))


def us_per_call(call: Callable[[torch.Tensor, torch.Tensor], object], case: Case, M: int, reps: Reps) -> float:
    """Microseconds per call(x, weight): a CUDA graph of calls over the weight copies in turn, timed by
    bench/timer.py. On CPU (the smoke, in the interpreter) one eager call under the host clock: that
    checks the path, not the speed."""
    x, weights = case.x[M], case.weights
    if not x.is_cuda:
        start = time.perf_counter()
        call(x, weights[0])
        return 1e6 * (time.perf_counter() - start)
    n = max(len(weights), MIN_CALLS)
    graph, _ = capture_graph(lambda: [call(x, weights[i % len(weights)]) for i in range(n)])
    try:
        samples = time_ms(graph.replay, x.device, samples=reps.samples, rep_ms=reps.rep_ms, warmup_ms=reps.warmup_ms)
    finally:
        del graph
    return 1e3 * statistics.median(samples) / n


def triton_call(config: TileConfig | None = None):
    return lambda x, w: linear_triton(x, w, config=config)


def cublas_call(x, w):
    return F.linear(x, w)


# ------------------------------------------------------------------------------------------- checks

def check(case: Case, config: TileConfig | None, rows) -> tuple[float, list[int]]:
    """The kernel (config, else its own) against the float32 reference at the largest row count, every
    output poisoned first (raises on a mismatch, as kernels/testing.py's checks do); returns the error
    max |out - ref| / max |ref| and the rows (of `rows`) that differ in any bit from their 1-row call."""
    x, w = case.x[max(case.x)], case.weights[0]
    with poisoned_empty():
        got = linear_triton(x, w, config=config)
    rtol, atol = TOLERANCE[x.dtype]
    torch.testing.assert_close(got.float(), case.ref, rtol=rtol, atol=atol)
    return rel_error(got, case.ref), rows_differing_from_one_row_calls(lambda t: linear_triton(t, w, config=config),
                                                                       x, rows)


# ----------------------------------------------------------------------------------------- sweeping

def sweep_configs(smem_bytes: int, itemsize: int) -> list[TileConfig]:
    """The grid, without the configs whose pipeline overflows shared memory (Triton keeps `stages` buffers
    of the x and weight tiles)."""
    grid = itertools.product(SWEEP_BLOCK_M, SWEEP_BLOCK_N, SWEEP_BLOCK_K, SWEEP_WARPS, SWEEP_STAGES)
    return [cfg for cfg in itertools.starmap(TileConfig, grid) if fits_smem(cfg, smem_bytes, itemsize)]


def fits_smem(cfg: TileConfig, smem_bytes: int, itemsize: int) -> bool:
    """Whether the config's pipeline, `stages` buffers of the x and weight tiles, fits shared memory."""
    return cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * itemsize <= smem_bytes


def time_config(row: dict, cfg: TileConfig, case: Case, reps: Reps) -> None:
    """Fill a sweep row's µs and GB/s at each of the case's row counts."""
    for M in case.x:
        us = us_per_call(triton_call(cfg), case, M, reps)
        row["us"][M], row["gbs"][M] = us, case.weight_bytes / us / 1e3


def record_config_error(row: dict, exc: Exception, on_gpu: bool) -> None:
    """A config that cannot run here (e.g. out of shared memory): its error in the row. On a GPU a sticky CUDA
    error then surfaces here rather than in the next config."""
    row["error"] = repr(exc)[:300]
    if on_gpu:
        try:
            torch.cuda.synchronize()
        except Exception as sync_exc:  # noqa: BLE001
            row["error"] += f"; then {sync_exc!r}"[:300]


def _compile_in_worker(config: tuple, dtype_name: str, device: str) -> str | None:
    """Compile one config into Triton's disk cache (a worker process): a call on a small weight whose N, K
    and strides have the divisibility of every benchmarked shape, so the cache key is theirs. Returns the
    error, if any."""
    dtype = getattr(torch, dtype_name)
    x = torch.zeros(1, 512, dtype=dtype, device=device)
    w = torch.zeros(64, 512, dtype=dtype, device=device)
    try:
        linear_triton(x, w, config=TileConfig(*config))
        if x.is_cuda:
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: the main process skips it too
        return repr(exc)[:200]
    return None


def precompile(configs: list[TileConfig], dtype: torch.dtype, device: torch.device,
               log: Callable[[str], None] = say) -> None:
    """Best effort: compile the configs in parallel worker processes; anything that fails here is simply
    compiled (or found failing) by the main process later."""
    workers = max(1, min(len(configs), (os.cpu_count() or 2) - 1, 16))
    start = time.perf_counter()
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            errors = list(pool.map(_compile_in_worker, [tuple(c) for c in configs],
                                   itertools.repeat(str(dtype).removeprefix("torch.")), itertools.repeat(str(device))))
        failed = sum(e is not None for e in errors)
        log(f"compiled {len(configs)} configs in {workers} processes in {time.perf_counter() - start:.0f} s "
            f"({failed} failed to compile or run)")
    except Exception as exc:  # noqa: BLE001
        log(f"parallel compilation failed ({exc!r:.200}); compiling as the sweep goes")


def sweep_matrix(case: Case, configs: list[TileConfig], splits, reps: Reps, results: dict) -> list[dict]:
    """Every config, then split-K on the best config of each BLOCK_N (split-K lets a wide tile, which
    re-reads x less, still spread over every SM), at the case's row counts, each checked first; returns the
    rows that ran, best first by the sum of their times (decode and tree step count alike)."""
    rows_of = tuple(case.x)

    def run(cfg: TileConfig) -> dict:
        row = {"model": case.matrix.model, "matrix": case.matrix.name, "config": cfg._asdict(),
               "label": config_label(cfg), "us": {}, "gbs": {}, "check_error": None, "error": None}
        try:
            row["check_error"], differing = check(case, cfg, [0, max(rows_of) - 1])
            if differing:
                raise AssertionError(f"rows {differing} differ from their 1-row calls")
            time_config(row, cfg, case, reps)
        except AssertionError as exc:  # a wrong result: a failure of the run, not just of this config
            row["error"] = repr(exc)[:300]
            results["failures"].append(f"sweep {case.matrix.model} {case.matrix.name} {row['label']}: {row['error']}")
        except Exception as exc:  # noqa: BLE001 - this config cannot run here (e.g. out of shared memory)
            record_config_error(row, exc, case.weights[0].is_cuda)
        return row

    done = [run(cfg) for cfg in configs]
    ok = sorted((r for r in done if r["error"] is None), key=lambda r: sum(r["us"].values()))
    best = [TileConfig(**next(r for r in ok if r["config"]["block_n"] == n)["config"])
            for n in sorted({r["config"]["block_n"] for r in ok})]
    split_rows = [run(cfg._replace(split_k=s)) for cfg in best for s in splits
                  if s <= triton.cdiv(case.matrix.K, cfg.block_k)]
    ok = sorted(ok + [r for r in split_rows if r["error"] is None], key=lambda r: sum(r["us"].values()))
    results["sweep"].extend(done + split_rows)
    return ok


def tree_configs(own: TileConfig, block_ns, smem_bytes: int, itemsize: int) -> list[TileConfig]:
    """own, and own with every BLOCK_N of block_ns, warps and stages of the tree grid: the same K schedule
    (BLOCK_M, BLOCK_K, split-K), whose pipelines fit shared memory."""
    grid = itertools.product(block_ns, TREE_WARPS, TREE_STAGES)
    configs = [cfg for n, w, s in grid
               if fits_smem(cfg := own._replace(block_n=n, num_warps=w, num_stages=s), smem_bytes, itemsize)]
    return configs if own in configs else [*configs, own]


def sweep_tree_matrix(case: Case, own: TileConfig, configs: list[TileConfig], reps: Reps, results: dict) -> list[dict]:
    """Each config at the case's row counts, each of its calls first checked bit for bit against the 1-row calls of
    `own` (the decode step's config); returns the rows that passed and ran, fastest at the largest M first."""
    w = case.weights[0]
    decode_rows = {M: torch.cat([linear_triton(x[i:i + 1], w, config=own) for i in range(M)])  # [M, N]
                   for M, x in case.x.items()}
    done = []
    for cfg in configs:
        row = {"model": case.matrix.model, "matrix": case.matrix.name, "config": cfg._asdict(),
               "label": config_label(cfg), "us": {}, "gbs": {}, "rows_differing": None, "error": None}
        try:
            row["rows_differing"] = sorted({i for M, x in case.x.items()
                                            for i, got in enumerate(linear_triton(x, w, config=cfg))
                                            if not same_bits(got, decode_rows[M][i])})
            if not row["rows_differing"]:
                time_config(row, cfg, case, reps)
        except Exception as exc:  # noqa: BLE001 - this config cannot run here (e.g. out of shared memory)
            record_config_error(row, exc, w.is_cuda)
        done.append(row)
    results["sweep_tree"].extend(done)
    return sorted((r for r in done if r["us"]), key=lambda r: r["us"][max(case.x)])


def print_sweep(case: Case, ranked: list[dict], current: dict, copy_gbs: float | None) -> None:
    m = case.matrix
    lo, hi = min(case.x), max(case.x)

    def cells(r):
        pct = (lambda M: 100 * r["gbs"][M] / copy_gbs) if copy_gbs else (lambda M: None)
        return [r["label"], r["us"][lo], r["gbs"][lo], pct(lo), r["us"][hi], r["gbs"][hi], pct(hi),
                r["us"][hi] / r["us"][lo]]

    shown = ranked[:SWEEP_SHOW]
    extra = [("best at M=%d" % M, min(ranked, key=lambda r: r["us"][M])) for M in (lo, hi)] if ranked else []
    table = [["", *cells(r)] for r in shown] + [[name, *cells(r)] for name, r in extra if r not in shown]
    if current.get("us"):
        table.append(["_tile_config", *cells(current)])
    print_table(f"Sweep {m.model} {m.name} [{m.N}, {m.K}]: best {len(shown)} of {len(ranked)} by µs(M={lo}) + "
                f"µs(M={hi})", ["", "config", f"µs M={lo}", "GB/s", "% copy", f"µs M={hi}", "GB/s", "% copy",
                                f"M={hi} / M={lo}"], table)


# -------------------------------------------------------------------------------------------- the run

def run_sweep_tree(cases, tree_grid: Callable[[TileConfig], list[TileConfig]], reps: Reps, results: dict,
                   checkpoint: Callable[[], None]) -> None:
    """--sweep-tree (see the module docstring): per matrix, the tree grid around its own config, and a summary."""
    summary = []
    for matrix, label, own, case in cases():
        configs = tree_grid(own)
        tree_case = case._replace(x={M: case.x[M] for M in TREE_ROWS if M in case.x} or case.x)
        ranked = sweep_tree_matrix(tree_case, own, configs, reps, results)
        differing = [r for r in results["sweep_tree"][-len(configs):] if r["rows_differing"]]
        hi = max(tree_case.x)
        current = next((r for r in ranked if r["config"] == own._asdict()), None)
        print_table(f"Tree tiles {label} [{matrix.N}, {matrix.K}], K schedule of {config_label(own)}: "
                    f"{len(ranked)} of {len(configs)} configs bitwise equal to its 1-row calls and timed"
                    + (f", {len(differing)} differing" if differing else ""),
                    ["config", *(f"µs M={M}" for M in tree_case.x), f"GB/s M={hi}", "own µs / µs"],
                    [[r["label"], *(r["us"][M] for M in tree_case.x), r["gbs"][hi],
                      current and current["us"][hi] / r["us"][hi]] for r in ranked[:SWEEP_SHOW]]
                    + ([["own: " + current["label"], *(current["us"][M] for M in tree_case.x), current["gbs"][hi], 1.0]]
                       if current and current not in ranked[:SWEEP_SHOW] else []))
        if differing:
            results["failures"].append(f"tree tiles {label}: {', '.join(r['label'] for r in differing)} differ from "
                                       f"the 1-row calls of {config_label(own)}")
        if ranked:
            summary.append([label, config_label(own), current and current["us"][hi], ranked[0]["label"],
                            ranked[0]["us"][hi]])
        checkpoint()
    print_table("Tree tiles summary: µs at the tree's row count, _tile_config's own config and the fastest with its "
                "K schedule", ["matrix", "own", "µs", "fastest", "µs"], summary)


def run(matrices, rows, *, device, dtype, sweep: bool, sweep_grid, splits, table_reps: Reps, sweep_reps: Reps,
        results: dict, checkpoint: Callable[[], None] = lambda: None, log: Callable[[str], None] = say,
        tree_grid: Callable[[TileConfig], list[TileConfig]] | None = None, outsize_l2: bool = True) -> None:
    """Fill `results` (the JSON document) part by part, calling `checkpoint` after each (the JSON is
    rewritten, so that a run that fails late keeps what it measured): checks, timing table, sweep, tree sweep
    (`tree_grid`: own config -> the configs to try, own included). `outsize_l2=False` times one weight copy."""
    results.update(checks=[], timings=[], sweep=[], sweep_tree=[], failures=[])
    on_gpu = device.type == "cuda"
    copy_gbs, l2_bytes = None, 0
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", 0) or 50 << 20
        copy_gbs = copy_bandwidth(device) / 1e9
        results.update(sm_count=props.multi_processor_count, l2_bytes=l2_bytes, copy_gbs=copy_gbs)
        log(f"{device_name(device)}: {props.multi_processor_count} SMs, L2 {l2_bytes / 2**20:.0f} MiB, "
            f"device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    pct = (lambda gbs: 100 * gbs / copy_gbs) if copy_gbs else (lambda gbs: None)

    def cases():
        """Each matrix's inputs in turn, one matrix in memory at a time."""
        for matrix in matrices:
            case = make_case(matrix, rows, dtype, device, l2_bytes if outsize_l2 else 0)
            yield matrix, f"{matrix.model} {matrix.name}", _tile_config(matrix.N, matrix.K, dtype, on_gpu), case
            del case
            if on_gpu:
                torch.cuda.empty_cache()

    # 1. Correctness and row invariance of the kernel's own config, and cuBLAS's invariance beside it.
    check_rows, passed = [], set()
    all_rows = range(max(rows))
    for matrix, label, own, case in cases():
        try:
            error, differing = check(case, None, all_rows)
        except Exception as exc:  # noqa: BLE001 - report, go on with the other matrices
            results["failures"].append(f"check {label}: {exc!r:.300}")
            check_rows.append([label, f"{matrix.N} x {matrix.K}", config_label(own), None, "CHECK FAILED", None])
            continue
        cublas_differing = rows_differing_from_one_row_calls(lambda t: F.linear(t, case.weights[0]),
                                                             case.x[max(rows)], all_rows)
        if differing:
            results["failures"].append(f"{label}: rows {differing} differ from their 1-row calls")
        else:
            passed.add(matrix)
        results["checks"].append({"model": matrix.model, "matrix": matrix.name, "N": matrix.N, "K": matrix.K,
                                  "config": own._asdict(), "rel_error": error, "rows_checked": max(rows),
                                  "triton_rows_differing": differing, "cublas_rows_differing": cublas_differing})
        check_rows.append([label, f"{matrix.N} x {matrix.K}", config_label(own), error,
                           "yes" if not differing else f"NO ({len(differing)} rows)",
                           "yes" if not cublas_differing else f"no ({len(cublas_differing)} rows)"])
    print_table(f"Checks ({str(dtype).removeprefix('torch.')}): max |triton - fp32 ref| / max |ref|, and whether "
                f"row i of the M={max(rows)} call equals the 1-row call on row i, bit for bit, for every i",
                ["matrix", "N x K", "config", "rel error", "triton row-invariant", "cuBLAS row-invariant"],
                check_rows)
    checkpoint()

    # 2. The timing table: the kernel's own config against cuBLAS.
    table_rows = []
    for matrix, label, own, case in cases():
        for M in rows:
            try:
                ours = us_per_call(triton_call(), case, M, table_reps) if matrix in passed else None
                ref = us_per_call(cublas_call, case, M, table_reps)
            except Exception as exc:  # noqa: BLE001 - a failed capture or launch fails this row only
                results["failures"].append(f"timing {label} M={M}: {exc!r:.300}")
                continue
            gbs, ref_gbs = ours and case.weight_bytes / ours / 1e3, case.weight_bytes / ref / 1e3
            results["timings"].append({"model": matrix.model, "matrix": matrix.name, "N": matrix.N, "K": matrix.K,
                                       "M": M, "weight_copies": len(case.weights), "triton_us": ours,
                                       "triton_gbs": gbs, "cublas_us": ref, "cublas_gbs": ref_gbs,
                                       "cublas_over_triton": ours and ref / ours})
            table_rows.append([label, M, ours, gbs, gbs and pct(gbs), ref, ref_gbs, pct(ref_gbs), ours and ref / ours])
    print_table("Time per call (µs), weight GB/s, % of copy bandwidth; cuBLAS / triton > 1: triton faster",
                ["matrix", "M", "triton µs", "GB/s", "% copy", "cuBLAS µs", "GB/s", "% copy", "cuBLAS / triton"],
                table_rows)
    checkpoint()
    if tree_grid is not None:
        if on_gpu:
            owns = {_tile_config(m.N, m.K, dtype, on_gpu) for m in matrices}
            precompile(sorted({cfg for own in owns for cfg in tree_grid(own)}), dtype, device, log)
        run_sweep_tree(cases, tree_grid, sweep_reps, results, checkpoint)
    if not sweep:
        return

    # 3. The sweep: every config of the grid, then split-K for the best few, at the first and last row count.
    if on_gpu:
        precompile(sweep_grid, dtype, device, log)
    suggestions = []
    for matrix, label, own, case in cases():
        sweep_case = case._replace(x={M: case.x[M] for M in (min(rows), max(rows))})
        configs = sweep_grid if own in sweep_grid else [*sweep_grid, own]
        ranked = sweep_matrix(sweep_case, configs, splits, sweep_reps, results)
        current = next((r for r in ranked if r["config"] == own._asdict()), {})
        print_sweep(sweep_case, ranked, current, copy_gbs)
        if ranked:
            suggestions.append([label, f"{matrix.N} x {matrix.K}", ranked[0]["label"], config_label(own)])
        checkpoint()
    print_table(f"Sweep summary: the fastest config per matrix (µs at M={min(rows)} + M={max(rows)}) beside "
                f"_tile_config's", ["matrix", "N x K", "fastest", "_tile_config"], suggestions)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="store_true", help="also time a grid of tile configs per matrix")
    p.add_argument("--sweep-tree", action="store_true",
                   help="also time, per matrix, tiles for the tree step that keep its K schedule (checked bitwise)")
    p.add_argument("--json", nargs="?", const=DEFAULT_JSON, default=None, metavar="FILE",
                   help="write every number to FILE (--json alone: work/bench/linear.json, git-ignored)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(DEFAULT_MODELS),
                   help=f"whose weight matrices (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--smoke", action="store_true",
                   help="tiny float32 shapes, eager calls (CPU: needs TRITON_INTERPRET=1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    checked = run_reporting_errors(lambda: check_kernel_benchmark("linear", args.smoke, "--json", args.json))
    return checked or run_benchmark(args)


def run_benchmark(args) -> int:
    """The benchmark (or with --smoke its path on tiny shapes), its flags checked: 1 if any check failed, else 0."""
    started = time.perf_counter()
    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype, matrices, rows, grid, splits = torch.float32, SMOKE_MATRICES, SMOKE_ROWS, SMOKE_SWEEP, SMOKE_SPLITS
        table_reps = sweep_reps = TABLE_REPS  # used on a GPU only: on a CPU the smoke times one eager call
        tree_block_ns, smem = SMOKE_TREE_BLOCK_N, 1 << 30
    else:
        matrices = [m for name in args.models for m in MODELS[name]]
        device, dtype, rows, splits = torch.device("cuda"), torch.bfloat16, ROWS, SWEEP_SPLITS
        smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 227 << 10)
        grid = sweep_configs(smem, dtype.itemsize)
        table_reps, sweep_reps = TABLE_REPS, SWEEP_REPS
        tree_block_ns = TREE_BLOCK_N
    results = {"benchmark": "linear", "mode": "smoke" if args.smoke else "full", **metadata(args, device, dtype),
               "method": "µs per call = median over samples of back-to-back CUDA-graph replays (calls cycling "
                         "through weight copies that outsize the L2) / calls per graph; GB/s = weight bytes / time"
                         if not args.smoke else "smoke (checks the path, not the speed): on a CPU one eager call, "
                         "on a GPU CUDA-graph replays of one weight copy"}
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            run(matrices, rows, device=device, dtype=dtype, sweep=args.sweep, sweep_grid=grid, splits=splits,
                table_reps=table_reps, sweep_reps=sweep_reps, results=results,
                tree_grid=(lambda own: tree_configs(own, tree_block_ns, smem, dtype.itemsize)) if args.sweep_tree
                else None,
                checkpoint=lambda: args.json and save(results, args.json), outsize_l2=not args.smoke)
    finally:
        results["seconds"] = time.perf_counter() - started
        if args.json:
            save(results, args.json)
    failures = results.get("failures", [])
    if failures:
        say(f"\n{len(failures)} failure(s):\n  " + "\n  ".join(failures))
    say(f"\ntook {results['seconds']:.0f} s" + (f"; wrote {args.json}" if args.json else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    exit_with(main())

"""Benchmark of the tree-attention kernel against the torch reference and PyTorch SDPA, timed as a
decode step pays for it: every layer's call in one CUDA graph, every layer reading its own cache.

    python -m bench.tree_attention [--quick] [--row-invariant] [--out FILE.json]   # on a CUDA machine
    TRITON_INTERPRET=1 python -m bench.tree_attention --smoke                     # without a GPU: untimed

Shapes: attention layers like Llama-2-7B (32 layers; 32 query heads, GQA 32/8 and MHA 32/32,
head_dim 128, 2048 cached tokens) and like SmolLM2-135M (30 layers; 9/3 heads, head_dim 64, 512 cached
tokens), batch 1, bf16, T in {1, 16, 64} new tokens: a plain decode (T = 1, tree_mask None) or the first T
nodes of the Medusa tree mc_sim_7b_63 (the default kernel's cost does not depend on the mask's shape, the
row-invariant mode's does: it gathers the keys of every node whose ancestors are not contiguous). The
caches hold exactly S = prefix + T slots, so the whole cache is read. --row-invariant instead times the
default kernel against its row-invariant mode only, on the 7B GQA and SmolLM2 layers at prefixes
RI_PREFIXES, for a decode and a 64-node tree.

Implementations: `triton` (the split-K heuristic, prefix_len a Python int), `triton 0-d prefix` (the
same with prefix_len a 0-d device tensor, as the engine calls it under CUDA graphs: the grid is then
sized on S), `triton split N` for N in SPLITS (the table shows the fastest as `triton best`, and a
sweep section lists them all beside the heuristic's pick: that is what tunes the heuristic),
`triton row-invariant` (row_invariant=True, 0-d prefix: what the engine runs under
kernels.set_row_invariant(True)), `torch reference`, and `torch SDPA` with a dense bool mask [T, S] built
once outside the timed region.

Method, in order:
  1. Correctness: every implementation on fresh random bf16 inputs of each case against the reference
     computed in float64: max |out - ref| / max |ref| <= MAX_REL_ERROR. (This also compiles the
     Triton kernels, so compilation never lands in a capture or a timing.)
  2. Copy bandwidth: a 1 GiB device-to-device copy, read + write counted (bench/timer.py).
  3. Per case and implementation: one input set (q, K cache, V cache) per layer of the model, so that
     each call reads its cache from HBM as in a real forward, where the weights and other layers
     stream through the L2 between two visits of one layer. When a model's caches together
     are smaller than WORKING_SET_L2 x the L2 (SmolLM2), the sets are repeated as further passes of
     distinct buffers until they are not. One warm-up pass outside the capture on a side stream (the
     allocator fills its pool), then a CUDA graph records one call per set, in order. Its outputs are
     poisoned with NaN, the graph replayed once, and the first and last outputs checked against the
     float64 reference again (a graph that skipped a call or computed garbage fails here).
  4. Timing: bench/timer.py's CUDA events around back-to-back replays (median over samples; each
     sample several replays), divided by the calls per graph = time per layer.
The table gives time per layer, the bytes one call must move (K/V read + q read + out written), the
achieved GB/s, and that as a share of the copy bandwidth. --out writes every number (all samples,
the spread, every split) as JSON; the exit code is 1 when any check failed or any row errored.

The CPU smoke (`smoke`, `--smoke`, run by the tests under TRITON_INTERPRET=1) takes the same path on a
tiny shape in float32 with one untimed eager pass in place of steps 2-4's graph capture and timing:
input sets, every implementation, checks, table, sweep and JSON are the code the GPU run uses.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import triton

from kernels.testing import rel_error, tree_attention_inputs
from kernels.tree_attention import split_heuristic, tree_attention_reference, tree_attention_triton
from nanomedusa.cli import ArgumentParser, exit_with, run_reporting_errors
from nanomedusa.tree import PRESETS, TreeBuffers

from .checks import check_kernel_benchmark
from .report import save
from .timer import capture_graph, copy_bandwidth, time_ms


@dataclass(frozen=True)
class Shape:
    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    prefix_len: int  # cached tokens before the T new ones
    n_layers: int


SHAPES = [
    Shape("7B GQA 32/8", 32, 8, 128, 2048, 32),
    Shape("7B MHA 32/32", 32, 32, 128, 2048, 32),
    Shape("SmolLM2 9/3", 9, 3, 64, 512, 30),
]
NEW_TOKENS = (1, 16, 64)
# --row-invariant: decode and a 64-node tree at these prefixes. Over the default, the mode pays a second kernel
# (every token's tail, one tile of at most 16 keys per KV head, and the merge) and fixed 64-row body tiles,
# wherever the prefix falls: at 250 the second kernel weighs most, at 4000 the bodies.
RI_PREFIXES = (250, 1000, 4000)
RI_SHAPES = [Shape(f"{name} L={p}", h, kv, d, p, n) for name, h, kv, d, n in
             [("7B GQA", 32, 8, 128, 32), ("SmolLM2", 9, 3, 64, 30)] for p in RI_PREFIXES]
RI_NEW_TOKENS = (1, 64)
TREE = "mc_sim_7b_63"  # T > 1 new tokens are this tree's first T nodes
SPLITS = (1, 2, 4, 8, 16, 32)
MAX_REL_ERROR = 1e-2  # bf16 inputs
# The input sets of one graph hold at least this many times the L2: a cyclic walk over them finds
# nothing of the previous replay in the cache.
WORKING_SET_L2 = 4
# (rep_ms of GPU time per implementation, samples, warm-up ms) for the full run and --quick.
REPS = {"full": (100.0, 20, 25.0), "quick": (20.0, 8, 10.0)}

SMOKE_SHAPE = Shape("tiny 4/2", 4, 2, 16, 9, 2)
SMOKE_NEW_TOKENS = (1, 5)  # 5 nodes: node 3 (path [1]) has its ancestors apart
SMOKE_MAX_REL_ERROR = 1e-5  # float32 inputs


def medusa_tree_mask(T: int, device) -> torch.Tensor:
    """The ancestor mask [T, T] of the first T nodes of the TREE preset (T <= 64; T = 1: the root alone)."""
    if T == 1:
        return torch.ones(1, 1, dtype=torch.bool, device=device)
    return TreeBuffers.from_choices(PRESETS[TREE][:T - 1], device=device).attn_mask


def dense_mask(prefix_len: int, tree_mask: torch.Tensor, S: int) -> torch.Tensor:
    """The op's visibility as a dense bool mask [T, S]: every prefix slot, then the tree mask."""
    T = tree_mask.shape[0]
    mask = torch.zeros(T, S, dtype=torch.bool, device=tree_mask.device)
    mask[:, :prefix_len] = True
    mask[:, prefix_len:prefix_len + T] = tree_mask[:, :S - prefix_len]
    return mask


class LayerInputs(NamedTuple):
    """Inputs of n_sets calls of one shape. Each call has its own q and caches, as each layer of a
    forward has; the prefix and the masks are shared, as they are across the layers of a step."""
    q: list[torch.Tensor]  # n_sets x [1, Hq, T, D]
    k_cache: list[torch.Tensor]  # n_sets x [1, Hkv, S, D], S = prefix_len + T
    v_cache: list[torch.Tensor]  # n_sets x [1, Hkv, S, D]
    prefix_len: int
    prefix_tensor: torch.Tensor  # 0-d int64 on the device, == prefix_len
    tree_mask: torch.Tensor  # [T, T] bool
    sdpa_mask: torch.Tensor  # [T, S] bool, for SDPA; built here, outside anything timed

    @property
    def n_sets(self) -> int:
        return len(self.q)

    @property
    def call_mask(self) -> torch.Tensor | None:
        """The tree_mask argument as the engine passes it: None (causal) for a plain decode."""
        return None if self.tree_mask.shape[0] == 1 else self.tree_mask


def layer_inputs(q, k_caches, v_caches, prefix_len: int, tree_mask) -> LayerInputs:
    q, k_caches, v_caches = list(q), list(k_caches), list(v_caches)
    S = k_caches[0].shape[2]
    return LayerInputs(q, k_caches, v_caches, prefix_len, torch.tensor(prefix_len, device=q[0].device),
                       tree_mask, dense_mask(prefix_len, tree_mask, S))


def make_layer_inputs(shape: Shape, T: int, n_sets: int, dtype: torch.dtype, device) -> LayerInputs:
    """n_sets random input sets of `shape` with T new tokens, the first T nodes of TREE (see LayerInputs)."""
    sets = [tree_attention_inputs(shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.prefix_len, T, dtype,
                                  device) for _ in range(n_sets)]
    q, k, v, prefix_len, _ = zip(*sets)
    return layer_inputs(q, k, v, prefix_len[0], medusa_tree_mask(T, device))


def bytes_per_call(shape: Shape, T: int, dtype: torch.dtype) -> int:
    """K and V read once, q read once, out written once."""
    S = shape.prefix_len + T
    return dtype.itemsize * (2 * shape.n_kv_heads * S + 2 * shape.n_heads * T) * shape.head_dim


def n_input_sets(shape: Shape, T: int, dtype: torch.dtype, l2_bytes: int) -> int:
    """shape.n_layers sets, times the passes that bring the sets together to WORKING_SET_L2 x the L2."""
    model_bytes = shape.n_layers * bytes_per_call(shape, T, dtype)
    return shape.n_layers * max(1, math.ceil(WORKING_SET_L2 * l2_bytes / model_bytes))


# ------------------------------------------------------------------------------ implementations

def sdpa_attention(q, k_cache, v_cache, mask):
    """The same op through F.scaled_dot_product_attention with the dense boolean mask [T, S]."""
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                          enable_gqa=q.shape[1] != k_cache.shape[1]).transpose(1, 2)  # [B, T, Hq, D]


def _triton_split(n: int) -> Callable[[LayerInputs, int], torch.Tensor]:
    return lambda x, i: tree_attention_triton(x.q[i], x.k_cache[i], x.v_cache[i], x.prefix_len, x.call_mask,
                                              num_splits=n)


ROW_INVARIANT = "triton row-invariant"
# name -> call i of a LayerInputs. Every one is graph-capturable: no host sync, fixed shapes.
IMPLEMENTATIONS: dict[str, Callable[[LayerInputs, int], torch.Tensor]] = {
    "triton": lambda x, i: tree_attention_triton(x.q[i], x.k_cache[i], x.v_cache[i], x.prefix_len, x.call_mask),
    "triton 0-d prefix": lambda x, i: tree_attention_triton(x.q[i], x.k_cache[i], x.v_cache[i],
                                                            x.prefix_tensor, x.call_mask),
    **{f"triton split {n}": _triton_split(n) for n in SPLITS},
    ROW_INVARIANT: lambda x, i: tree_attention_triton(x.q[i], x.k_cache[i], x.v_cache[i], x.prefix_tensor,
                                                      x.call_mask, row_invariant=True),
    "torch reference": lambda x, i: tree_attention_reference(x.q[i], x.k_cache[i], x.v_cache[i], x.prefix_len,
                                                             x.call_mask),
    "torch SDPA": lambda x, i: sdpa_attention(x.q[i], x.k_cache[i], x.v_cache[i], x.sdpa_mask),
}
RI_IMPLEMENTATIONS = {name: IMPLEMENTATIONS[name] for name in ("triton 0-d prefix", ROW_INVARIANT)}
SPLIT_NAMES = {n: f"triton split {n}" for n in SPLITS}
BEST = "triton best"  # derived row: the fastest of the split sweep
TABLE_ROWS = ("triton", "triton 0-d prefix", BEST, ROW_INVARIANT, "torch reference", "torch SDPA")


# ----------------------------------------------------------------------------------- correctness

def reference(x: LayerInputs, i: int) -> torch.Tensor:
    """Call i computed by the reference in float64."""
    return tree_attention_reference(x.q[i].double(), x.k_cache[i].double(), x.v_cache[i].double(), x.prefix_len,
                                    x.call_mask)


def checked_error(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """`rel_error` of an output that must have the reference's shape and the inputs' dtype."""
    if out.shape != ref.shape or out.dtype != dtype:
        raise AssertionError(f"output {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(ref.shape)}")
    return rel_error(out, ref)


def max_rel_errors(q, k_cache, v_cache, prefix_len, tree_mask, implementations=None) -> dict[str, float]:
    """max |out - ref| / max |ref| for every implementation, ref = the reference computed in float64."""
    x = layer_inputs([q], [k_cache], [v_cache], prefix_len, tree_mask)
    ref = reference(x, 0)
    return {name: checked_error(fn(x, 0), ref, q.dtype) for name, fn in (implementations or IMPLEMENTATIONS).items()}


def check_pass(outs: list[torch.Tensor], x: LayerInputs) -> float:
    """Error of one pass over all sets: inf when any output holds a NaN (outputs start poisoned, so an
    unwritten element shows), else the worse of the first and last set vs the float64 reference."""
    if len(outs) != x.n_sets:
        raise AssertionError(f"the pass returned {len(outs)} outputs for {x.n_sets} input sets")
    if torch.stack([o.isnan().any() for o in outs]).any().item():
        return math.inf
    return max(checked_error(outs[i], reference(x, i), x.q[i].dtype) for i in {0, x.n_sets - 1})


def layer_pass(fn: Callable[[LayerInputs, int], torch.Tensor], x: LayerInputs) -> Callable[[], list]:
    """One call of `fn` per input set, in order: what the graph records (a forward's attention calls)."""
    return lambda: [fn(x, i) for i in range(x.n_sets)]


# ------------------------------------------------------------------------------------- measuring

class Measurement(NamedTuple):
    check_error: float  # of the pass that was timed (check_pass)
    samples_ms: list[float]  # ms per pass, one per sample; empty when untimed


def measure_untimed(run_pass: Callable[[], list], x: LayerInputs, **_) -> Measurement:
    """The CPU smoke's stand-in for measure_graph: one eager pass, checked, not timed."""
    return Measurement(check_pass(run_pass(), x), [])


def measure_graph(run_pass: Callable[[], list], x: LayerInputs, *, rep_ms: float, n_samples: int,
                  warmup_ms: float) -> Measurement:
    """Capture one pass as a CUDA graph, check a replay on poisoned outputs, time the replays."""
    graph, outs = capture_graph(run_pass)
    try:
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        check = check_pass(outs, x)
        samples_ms = time_ms(graph.replay, x.q[0].device, samples=n_samples, rep_ms=rep_ms, warmup_ms=warmup_ms)
        return Measurement(check, samples_ms)
    finally:
        del graph, outs


# -------------------------------------------------------------------------------------- the run

def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def make_row(shape: Shape, T: int, name: str, n_bytes: int, n_sets: int, copy_gbs: float | None,
             m: Measurement | None = None, error: str | None = None, num_splits: int | None = None) -> dict:
    """One table/JSON row; times are per call (= per layer), in µs."""
    row = {"layer": shape.name, "T": T, "implementation": name, "num_splits": num_splits,
           "calls_per_graph": n_sets, "mb_moved": n_bytes / 1e6, "time_us": None, "time_us_p20": None,
           "time_us_p80": None, "samples_us": [], "gbs": None, "pct_copy": None,
           "check_error": None if m is None else m.check_error, "error": error}
    if m is not None and m.samples_ms:
        us = [1e3 * ms / n_sets for ms in m.samples_ms]
        row.update(time_us=statistics.median(us), time_us_p20=_quantile(us, 0.2), time_us_p80=_quantile(us, 0.8),
                   samples_us=us)
        row["gbs"] = n_bytes / row["time_us"] / 1e3
        if copy_gbs:
            row["pct_copy"] = 100 * row["gbs"] / copy_gbs
    return row


def row_ok(row: dict, max_error: float) -> bool:
    return row["error"] is None and row["check_error"] is not None and row["check_error"] <= max_error


def best_split_row(rows: dict[str, dict], max_error: float) -> dict | None:
    """The split-sweep row with the lowest median time among those that passed their check (untimed:
    the first that passed)."""
    ran = [rows[SPLIT_NAMES[n]] for n in SPLITS if SPLIT_NAMES[n] in rows and row_ok(rows[SPLIT_NAMES[n]], max_error)]
    if not ran:
        return None
    timed = [r for r in ran if r["time_us"] is not None]
    best = min(timed, key=lambda r: r["time_us"]) if timed else ran[0]
    return {**best, "implementation": BEST}


def table_label(row: dict) -> str:
    name, n = row["implementation"], row["num_splits"]
    return f"{name} ({n} split{'s' if n != 1 else ''})" if n is not None else name


TABLE_HEADER = (f"{'layer':13s} {'T':>3s}  {'implementation':28s} {'time µs':>9s} {'MB moved':>9s} "
                f"{'GB/s':>7s} {'% copy':>7s}")


def format_row(row: dict, max_error: float) -> str:
    def num(value, spec):
        return "-" if value is None else format(value, spec)

    line = (f"{row['layer']:13s} {row['T']:3d}  {table_label(row):28s} {num(row['time_us'], '9.1f'):>9s} "
            f"{row['mb_moved']:9.2f} {num(row['gbs'], '7.0f'):>7s} "
            f"{num(row['pct_copy'], '6.1f') + ('%' if row['pct_copy'] is not None else ''):>7s}")
    if row["error"] is not None:
        line += f"  ERROR {row['error']}"
    elif not row_ok(row, max_error):
        line += f"  CHECK FAILED (error {row['check_error']:.1e})"
    return line


def format_sweep(layer: str, T: int, rows: dict[str, dict], heuristic: int, best: dict | None) -> str:
    parts = []
    for n in SPLITS:
        row = rows[SPLIT_NAMES[n]]
        t = "err" if row["error"] is not None else "-" if row["time_us"] is None else f"{row['time_us']:.1f}"
        parts.append(f"{n}:{t}{'*' if best is not None and best['num_splits'] == n else ''}")
    return f"  {layer:13s} T={T:<3d} " + " ".join(f"{p:>10s}" for p in parts) + f"   heuristic {heuristic}"


def summarize_errors(errors: dict[str, float]) -> dict[str, float]:
    """The correctness line: the split sweep (if run) folded into its worst error."""
    splits = [errors[name] for name in SPLIT_NAMES.values() if name in errors]
    short = {k: v for k, v in errors.items() if k not in SPLIT_NAMES.values()}
    if splits:
        short[f"splits {SPLITS[0]}-{SPLITS[-1]}"] = max(splits)
    return {k.removeprefix("torch ").removeprefix("triton ") if k != "triton" else k: v for k, v in short.items()}


def run_benchmark(results: dict, shapes, new_tokens, *, device, dtype: torch.dtype, timed: bool,
                  max_error: float, rep_ms: float = 0.0, n_samples: int = 0, warmup_ms: float = 0.0,
                  log: Callable[[str], None] = print, implementations=IMPLEMENTATIONS) -> None:
    """Fill `results` (the JSON document) as it goes, so that a crash still leaves what was measured.
    timed=True: CUDA graphs and events (CUDA only); timed=False: one eager untimed pass (the smoke)."""
    results.update(correctness=[], timings=[], splits=[], failures=[])
    cases = [(shape, T) for shape in shapes for T in new_tokens]
    copy_gbs = None
    l2_bytes = 0  # untimed: one set per layer is enough
    if timed:
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", 0) or 64 << 20
        copy_gbs = copy_bandwidth(device) / 1e9
        results.update(device=torch.cuda.get_device_name(device), sm_count=props.multi_processor_count,
                       l2_bytes=l2_bytes, copy_gbs=copy_gbs)
        log(f"{results['device']}: device-to-device copy {copy_gbs:.0f} GB/s (read + write), "
            f"L2 {l2_bytes / 2**20:.0f} MiB\n")
    measure = (functools.partial(measure_graph, rep_ms=rep_ms, n_samples=n_samples, warmup_ms=warmup_ms)
               if timed else measure_untimed)

    log(f"max relative error vs the float64 reference ({str(dtype).removeprefix('torch.')} inputs):")
    for shape, T in cases:
        try:
            q, k, v, prefix_len, _ = tree_attention_inputs(shape.n_heads, shape.n_kv_heads, shape.head_dim,
                                                           shape.prefix_len, T, dtype, device)
            errors = max_rel_errors(q, k, v, prefix_len, medusa_tree_mask(T, device), implementations)
        except Exception as exc:  # noqa: BLE001 - report, go on with the other cases
            results["failures"].append(f"check {shape.name} T={T}: {exc!r}")
            log(f"  {shape.name:13s} T={T:<3d} ERROR {exc!r}")
            continue
        ok = max(errors.values()) <= max_error
        results["correctness"].append({"layer": shape.name, "T": T, "errors": errors, "ok": ok})
        if not ok:
            results["failures"].append(f"check {shape.name} T={T}: {errors}")
        log(f"  {shape.name:13s} T={T:<3d} " + "  ".join(f"{k} {v:.1e}" for k, v in summarize_errors(errors).items())
            + f"  {'ok' if ok else 'FAILED'}")

    log(f"\ntime per layer: one CUDA graph of every layer's call, median of back-to-back replays "
        f"/ calls per graph{'' if timed else ' (untimed smoke: one eager pass)'}")
    log(TABLE_HEADER)
    sweeps = []
    for shape, T in cases:
        n_sets = n_input_sets(shape, T, dtype, l2_bytes)
        n_bytes = bytes_per_call(shape, T, dtype)
        rows: dict[str, dict] = {}
        try:
            x = make_layer_inputs(shape, T, n_sets, dtype, device)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: go on with the other cases
            results["failures"].append(f"inputs {shape.name} T={T}: {exc!r}")
            log(f"{shape.name:13s} {T:3d}  ERROR building {n_sets} input sets: {exc!r}")
            continue
        heuristic = split_heuristic(x.q[0], x.k_cache[0], x.prefix_len)
        heuristic_dev = split_heuristic(x.q[0], x.k_cache[0], x.prefix_tensor)
        for name, fn in implementations.items():
            splits = {"triton": heuristic, "triton 0-d prefix": heuristic_dev}.get(name)
            if name.startswith("triton split "):
                splits = int(name.removeprefix("triton split "))
            try:
                m = measure(layer_pass(fn, x), x)
                rows[name] = make_row(shape, T, name, n_bytes, n_sets, copy_gbs, m, num_splits=splits)
            except Exception as exc:  # noqa: BLE001 - a failed capture or launch fails this row only
                rows[name] = make_row(shape, T, name, n_bytes, n_sets, copy_gbs, error=repr(exc)[:300],
                                      num_splits=splits)
                if timed:  # surface a sticky CUDA error here rather than in the next row
                    try:
                        torch.cuda.synchronize()
                    except Exception as sync_exc:  # noqa: BLE001
                        rows[name]["error"] += f"; then {sync_exc!r}"[:300]
            if not row_ok(rows[name], max_error):
                results["failures"].append(f"{shape.name} T={T} {name}: "
                                           f"{rows[name]['error'] or rows[name]['check_error']}")
            results["timings"].append(rows[name])
        best = best_split_row(rows, max_error)
        for name in TABLE_ROWS:
            row = best if name == BEST else rows.get(name)
            if row is not None:
                log(format_row(row, max_error))
        if all(name in rows for name in SPLIT_NAMES.values()):
            results["splits"].append({"layer": shape.name, "T": T, "heuristic": heuristic,
                                      "best": None if best is None else best["num_splits"],
                                      "time_us": {n: rows[SPLIT_NAMES[n]]["time_us"] for n in SPLITS}})
            sweeps.append(format_sweep(shape.name, T, rows, heuristic, best))
        del x
        if timed:
            torch.cuda.empty_cache()

    if sweeps:
        log("\nsplit sweep, µs per layer (num_splits:time, * fastest) and the heuristic's pick:")
        for line in sweeps:
            log(line)


def new_results(mode: str, **settings) -> dict:
    return {"benchmark": "tree_attention", "mode": mode, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "settings": settings,
            "method": "time per layer = median over samples of back-to-back CUDA-graph replays (one call per "
                      "input set, every layer its own q and K/V) / calls per graph; MB moved per call"}


def smoke(device: str | torch.device = "cpu", log: Callable[[str], None] = print,
          results: dict | None = None) -> dict:
    """Everything but the CUDA-graph capture and timing, on a tiny float32 shape (CPU: needs
    TRITON_INTERPRET=1 set before kernels/ is imported). Fills and returns the results document."""
    if results is None:
        results = {}
    results.update(new_results("smoke", shapes=[SMOKE_SHAPE.name], new_tokens=list(SMOKE_NEW_TOKENS),
                               splits=list(SPLITS), max_rel_error=SMOKE_MAX_REL_ERROR))
    with torch.no_grad():
        run_benchmark(results, [SMOKE_SHAPE], SMOKE_NEW_TOKENS, device=device, dtype=torch.float32,
                      timed=False, max_error=SMOKE_MAX_REL_ERROR, log=log)
    return results


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="also write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer timed replays (about a quarter of the GPU time)")
    p.add_argument("--row-invariant", action="store_true",
                   help="only the default kernel against its row-invariant mode, decode and a 64-node tree at "
                        f"prefixes {', '.join(map(str, RI_PREFIXES))}")
    p.add_argument("--smoke", action="store_true",
                   help="untimed run on a tiny shape, CUDA if there is one, else CPU (needs TRITON_INTERPRET=1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    checked = run_reporting_errors(lambda: check_kernel_benchmark("tree_attention", args.smoke, "--out", args.out))
    return checked or run(args)


def run(args) -> int:
    """The benchmark (or with --smoke its untimed run), its flags checked: 1 if any check of a kernel failed, else 0."""
    log = functools.partial(print, flush=True)
    if args.smoke:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        results = {}
        try:
            smoke(device, log, results)
        finally:
            if args.out:
                save(results, args.out)
    else:
        rep_ms, n_samples, warmup_ms = REPS["quick" if args.quick else "full"]
        shapes, new_tokens, implementations = ((RI_SHAPES, RI_NEW_TOKENS, RI_IMPLEMENTATIONS) if args.row_invariant
                                               else (SHAPES, NEW_TOKENS, IMPLEMENTATIONS))
        results = new_results(("row-invariant " if args.row_invariant else "") + ("quick" if args.quick else "full"),
                              rep_ms=rep_ms, n_samples=n_samples, warmup_ms=warmup_ms, working_set_l2=WORKING_SET_L2,
                              splits=list(SPLITS), max_rel_error=MAX_REL_ERROR, tree=TREE,
                              shapes=[s.name for s in shapes], new_tokens=list(new_tokens))
        torch.manual_seed(0)
        try:
            with torch.no_grad():
                run_benchmark(results, shapes, new_tokens, device="cuda", dtype=torch.bfloat16, timed=True,
                              max_error=MAX_REL_ERROR, rep_ms=rep_ms, n_samples=n_samples, warmup_ms=warmup_ms,
                              log=log, implementations=implementations)
        finally:
            if args.out:
                save(results, args.out)
    failures = results.get("failures", [])
    if failures:
        log(f"\n{len(failures)} failure(s):\n  " + "\n  ".join(failures))
    if args.out:
        log(f"\nwrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    exit_with(main())

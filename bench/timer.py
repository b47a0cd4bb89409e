"""The one timer of every benchmark here (`time_ms`), what it times (`capture_graph`), and the yardstick
for memory-bound times (`copy_bandwidth`).

`time_ms` gives the milliseconds per call of a function, one number per sample; the benchmarks report the
median (and keep the samples in their JSON). It measures what the GPU spends, as a CUDA-graphed decode step
pays it, and that is why it measures the way it does:

  * The function is a CUDA-graph replay: the engine's own graphed step (bench/steps.py), or calls captured
    with `capture_graph` (bench/tree_attention.py, bench/small_kernels.py). Eager calls of a kernel that
    runs for microseconds would time mostly Python and the launch path, which a graphed step does not pay.
  * CUDA events around back-to-back calls, not a host clock around each: the host enqueues replays far
    faster than the GPU runs them, so after the warm-up the GPU never waits for a launch and no sample
    encloses host time. The gaps between a graph's nodes are in the time; a real graphed step pays those.
  * Warm-up first: the first call compiles and allocates (never timed); then `warmup_ms` of calls raise the
    GPU's clocks and put the host ahead of the GPU.
  * Many samples, the median reported: one slow sample (another process, a clock dip) does not move it.
    A sample is one call, or with `rep_ms` as many back-to-back calls as make all the samples together last
    about `rep_ms`, for calls too short for one pair of events to time well.
  * Not `triton.testing.do_bench`: it zeroes a 256 MB buffer before every run to flush the L2, which
    leaves the L2 full of dirty lines whose write-back the next run pays. A benchmark that must not find
    its inputs in the L2 gives each call of the graph its own (bench/tree_attention.py).

On a CPU (the benchmarks' smoke tests) the same loop runs with `time.perf_counter` around each sample:
CPU work is synchronous, and there are no clocks to raise, so the first call is the only warm-up.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], device: str | torch.device, *, samples: int = 20, rep_ms: float = 0.0,
            warmup_ms: float = 25.0) -> list[float]:
    """Milliseconds per call of `fn` on `device`, one per sample (see the module docstring)."""
    device = torch.device(device)
    fn()  # compiles, allocates, fills caches: never timed
    estimate = max(_elapsed_ms(fn, 3, device) / 3, 1e-3)
    per_sample = max(1, round(rep_ms / samples / estimate))
    if device.type != "cuda":
        return [_elapsed_ms(fn, per_sample, device) / per_sample for _ in range(samples)]
    for _ in range(max(1, math.ceil(warmup_ms / estimate))):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(samples)]
    for start, end in events:  # no sync in between: the host stays ahead of the GPU
        start.record()
        for _ in range(per_sample):
            fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / per_sample for start, end in events]


def _elapsed_ms(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Milliseconds of `calls` back-to-back calls of `fn`, from an idle device to their end."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def capture_graph(run: Callable[[], list]) -> tuple[torch.cuda.CUDAGraph, list]:
    """Warm up outside the capture on a side stream (as the torch docs ask: the caching allocator and any
    lazy initialisation settle there), then record one call of `run`; returns the graph and its outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream_before = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            outs = run()
    finally:  # a capture that fails can leave its capture stream current: later work must not run there
        torch.cuda.set_stream(stream_before)
    torch.cuda.synchronize()
    return graph, outs


def copy_bandwidth(device: str | torch.device, nbytes: int = 1 << 30, samples: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, each copy counted as a read and a write of `nbytes`
    (the median of `samples` copies): what a memory-bound kernel or step can hope to reach."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = statistics.median(time_ms(lambda: y.copy_(x), device, samples=samples))
    return 2 * nbytes / (ms / 1e3)

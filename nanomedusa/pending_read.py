"""Reading a step's tokens on the host without leaving the GPU idle: the copy is queued, the next step too.

A decoding loop has to read each step's tokens on the host (to stream them, to stop at eos), and the plain
way, `tokens.tolist()` right after the step, waits for the GPU to finish, then leaves it idle while Python
reads the values, streams them and launches the next step: some 30 µs a step on an H200, 3-4% of the default
model's decoding step (bench/RESULTS.md). So the loops (generation.py, medusa_generation.py) read one step behind:

    read = PendingRead(out.tokens)          # the copy to the host, queued behind the kernels that compute them
    out = step(out.prefix, *out.next_tree)  # the next step, queued before waiting: its inputs never left the GPU
    tokens = read.tolist()                  # waits for the copy only; the GPU is busy with the next step meanwhile

They queue a step ahead only while the run surely goes on past the tokens being read, so the one step that can be
wasted is one queued before an eos is read. A CPU runs each step as it is queued, so there the values are on the host
before the next step: `ready_at` says when, which is where a prefill's time ends.
"""

from __future__ import annotations

import time

import torch


class PendingRead:
    """values (a device tensor) on their way to the host; `tolist()` waits for them. The copy goes to page-locked
    memory, which a copy can fill asynchronously, and is taken before anything queued after it (the next step's
    graph replay, which overwrites its static outputs) runs."""

    def __init__(self, values: torch.Tensor):
        self._done = None
        self.ready_at: float | None = None  # time.perf_counter() when the values were on the host (see tolist)
        if values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:  # the CPU computes eagerly: nothing to wait for, but the next step may overwrite values
            self._host = values.clone()
            self.ready_at = time.perf_counter()  # (before the step queued after it, which a CPU runs there and then)

    def tolist(self):
        if self._done is not None:
            self._done.synchronize()
            self.ready_at = self.ready_at or time.perf_counter()
        return self._host.tolist()

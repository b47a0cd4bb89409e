"""Replay fixed-shape steps as CUDA graphs, so a decode step costs one launch instead of hundreds.

At batch 1 a small model's step is a few hundred tiny kernels; launching them from Python costs more
than running them. A CUDA graph records the launches once and replays them. That needs every input
to live at a fixed address (we copy new values into static buffers) and no host sync inside the
step, which is why `prefix_len` travels as a 0-d device tensor through the model and the kernels.

    step = GraphedStep(lambda tokens, prefix_len: model(tokens, prefix_len)[0, -1],
                       torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.tensor(0, device="cuda"))
    logits = step(next_tokens, torch.tensor(pos))   # copies inputs in, replays, returns static output

On the CPU (or with graphs disabled) it simply calls the function.

A step that draws random numbers (`torch.rand(..., generator=g)`) passes `generator=g`: the graph is
registered with it (`CUDAGraph.register_generator_state`, torch >= 2.3), so each replay draws fresh numbers
from g's current seed and offset (advancing it as an eager call would), and re-seeding g between replays
takes effect. Warm-up and capture leave g's state as they found it.

Each graph keeps the memory its step worked in (its pool) for as long as it lives. Graphs captured with one
`pool` (`torch.cuda.graph_pool_handle()`) share theirs, each capture reusing the blocks the pool already holds:
it grows by less than the graphs' sum (as little as the largest step's need where larger steps come first), but
a replay may overwrite what another graph of the pool returned. Share a pool only among graphs whose output is
used before another of them replays, as the decoder's prefills are (decoder.py).
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    def __init__(self, fn: Callable, *example_inputs: torch.Tensor, enabled: bool = True,
                 generator: torch.Generator | None = None, pool: tuple | None = None):
        self.fn = fn
        self.enabled = enabled and example_inputs[0].is_cuda
        if not self.enabled:
            return
        self.inputs = [x.clone() for x in example_inputs]
        rng_state = generator.get_state() if generator is not None else None
        # Warm up on a side stream (allocator pools, Triton compilation), then record.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)
        if generator is not None:
            generator.set_state(rng_state)

    def __call__(self, *inputs: torch.Tensor):
        if not self.enabled:
            return self.fn(*inputs)
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.output

"""Programmatic dependent launch (PDL, Hopper and newer): a kernel starts while the one before it finishes.

A CUDA-graphed decode step is a chain of some 300 small kernels. Launched the ordinary way, each starts only
once the previous one has finished and flushed its writes: every boundary leaves the SMs idle while the last
programs of one kernel drain and the next kernel's programs are scheduled and issue their first loads, a
microsecond or two each: 5% of a 7B decode step, a quarter of a 135M model's. With PDL (`launch_pdl=True`) the
next kernel is launched as soon as every program of the running one has signalled
(`griddepcontrol.launch_dependents`); its programs take the SMs the running one frees, do what does not depend
on it (the linear layer prefetches its first weight tiles into the L2, the RMSNorm loads its weight), and stop at
`griddepcontrol.wait` until the running kernel has completed and its writes are visible.
So a kernel launched this way must wait before it reads anything the kernel before it wrote, or writes anything
an earlier kernel may still read: `wait_for_previous_kernels` first. What a kernel does before its wait reads
only weights, which no kernel of a step writes (the linear layer's L2 prefetch, the RMSNorm's weight through the
L2; a strided weight, which a copy makes contiguous just before, launches without PDL), except in the two
row-invariant attention kernels. Their tails read, before
their wait, what the kernels before their predecessor wrote (which that predecessor, having waited for them
before letting the tails launch, guarantees complete), through the L2 only (kernels/tree_attention.py,
`_ri_tails_kernel`); that predecessor's programs with nothing to compute end without waiting, but one of its
programs always waits, which keeps the guarantee (`_ri_bodies_kernel`).

What the kernels compute is unchanged (this is scheduling only); the ordinary launch is kept outside the
row-invariant mode (see `launch_options`), where PDL is not available (CPU interpreter, GPUs before sm_90), or
when switched off with `kernels.set_dependent_launch(False)` or NANOMEDUSA_PDL=0 (bench/step_profile.py times
both). Inside a CUDA graph the launches become programmatic edges of the graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import dependent_launch_enabled, row_invariant
from .interpreter import interpreting


@functools.lru_cache(maxsize=None)
def hopper_or_newer(device: torch.device) -> bool:
    """NVIDIA sm_90 and newer, which have griddepcontrol (PDL) and the tensor memory accelerator (a ROCm build
    reports AMD's own versions)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(t: torch.Tensor) -> dict:
    """The launch keywords of a kernel whose tensors live where `t` does: {"PDL": True, "launch_pdl": True}
    when PDL is on and available there and the row-invariant mode is on, else {"PDL": False} (the kernel's
    `PDL` constexpr then compiles the waits away).

    Only in the row-invariant mode, where every kernel of a step is one of ours: otherwise the linear layers are
    cuBLAS kernels, which may let our next kernel in early (its programs then wait on SMs cuBLAS could use), and
    no wait of ours shortens their own drain. On an H200 that mix decoded the default model 1-4% slower with PDL
    than without, where the all-Triton step ran 9-31% faster (bench/RESULTS.md)."""
    if (dependent_launch_enabled() and row_invariant() and t.is_cuda and not interpreting()
            and hopper_or_newer(t.device)):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_previous_kernels(PDL: tl.constexpr):
    """Block until the kernels before this one have completed (their writes visible), then let the next kernel
    launch: its programs may take SMs from here on, and in turn wait for this one's end before they read."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the 128-byte lines at `ptrs` (a tensor of addresses, one per line) to be brought into the L2,
    without waiting for them and without registers to hold them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                              pack=1)

"""Triton kernels for the hot paths of a Medusa step, each beside the plain-PyTorch reference
that defines what it computes.

Every public op (`tree_attention`, `rmsnorm`, `rope_and_cache`, `silu_mul`, `compact_kv`, `accept_candidates`,
`sample_token`, `medusa_topk`, a dynamic tree's `tree_choice` and `tree_layout`, path-reading heads' `path_input` and
`place_guesses`, `linear`) dispatches in its own module through `use_triton` below: the Triton version on CUDA
tensors, the torch reference elsewhere (`linear` takes its kernel only under
`set_row_invariant(True)`; otherwise torch's product, `torch_linear`; on a CPU `tree_attention` and `sample_token`
give the reference's results with host-side shortcuts a CUDA graph could not have). `set_backend` forces one side
("torch" or "triton"; "triton" on CPU tensors needs TRITON_INTERPRET=1, which is how CI checks every kernel against
its reference: see `interpreter.py`). `set_row_invariant(True)` makes the Triton side compute every row of a call
exactly as a one-row call would (fixed reduction schedules, whatever the row count), so that a Medusa tree step
reproduces plain decoding bit for bit; the torch side is unchanged by it. An input a kernel cannot take raises
`KernelInputError` (`errors.py`; checks several ops share, so that their torch and Triton paths refuse alike, are in
`checks.py`); `testing.py` holds the correctness checks the tests and the benchmarks share. In
the row-invariant mode on Hopper and newer GPUs every kernel launches while the one before it still runs and waits
on the device for its inputs (`dependent_launch.py`; `set_dependent_launch(False)` or NANOMEDUSA_PDL=0 turns it
off). Nothing here imports the application above.
"""

from __future__ import annotations

import os

import torch

from .errors import KernelInputError
from .interpreter import interpreting, patch_interpreter

if interpreting():
    patch_interpreter()

_BACKENDS = ("auto", "torch", "triton")
_backend = "auto"
_row_invariant = False
# Programmatic dependent launch (dependent_launch.py) where the GPU has it; NANOMEDUSA_PDL=0 switches it off.
_dependent_launch = os.environ.get("NANOMEDUSA_PDL", "1") != "0"


def set_backend(name: str) -> None:
    """Choose the kernel implementation: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton" (on CPU
    tensors only with Triton's interpreter on, see interpreter.py; without it the first op says so)."""
    global _backend
    if name not in _BACKENDS:
        raise KernelInputError(f"unknown kernel backend {name!r}; use one of {', '.join(_BACKENDS)}.")
    _backend = name


def get_backend() -> str:
    return _backend


def set_row_invariant(flag: bool) -> None:
    """Whether Triton kernels use row-invariant schedules (`linear`, `tree_attention`; the other kernels
    are per row whatever the row count)."""
    global _row_invariant
    _row_invariant = bool(flag)


def row_invariant() -> bool:
    return _row_invariant


def set_dependent_launch(flag: bool) -> None:
    """Whether Triton kernels launch while the kernel before them still runs, in the row-invariant mode on
    Hopper and newer GPUs (programmatic dependent launch, see dependent_launch.py); the results are the same
    either way."""
    global _dependent_launch
    _dependent_launch = bool(flag)


def dependent_launch_enabled() -> bool:
    return _dependent_launch


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor `t` should run its Triton kernel. Under the "triton" backend a CPU tensor needs the
    interpreter, which must have been on since triton was imported: without it, `KernelInputError` (where Triton
    itself would fail on finding no GPU driver)."""
    if _backend == "torch" or torch.is_grad_enabled() and t.requires_grad:
        return False  # kernels are inference-only; autograd goes through the references
    if _backend == "triton":
        if not t.is_cuda and not interpreting():
            raise KernelInputError("the Triton kernels run on CUDA tensors, or on CPU tensors in Triton's "
                                   "interpreter: set TRITON_INTERPRET=1 before anything imports triton (slow, for "
                                   "checking kernels), or use the torch backend (kernels.set_backend('torch')).")
        return True
    return t.is_cuda

"""RMSNorm with the residual add fused in.

`rmsnorm(x, weight, eps)` returns weight * x / rms(x).
`rmsnorm(x, weight, eps, residual=r)` first forms h = x + r and returns (rmsnorm(h), h): the
transformer block needs both, and fusing saves a full read and write of the hidden state.
Statistics are computed in float32 whatever the input dtype, as Hugging Face Llama does.

The Triton kernel runs one program per row and keeps the whole row in registers, so each element
is read once and written once; rows up to MAX_D = 8192 wide (any width, the tail is masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError

MAX_D = 8192  # one row must fit in one program's registers


def rmsnorm_reference(x, weight, eps, residual=None):
    """x [..., D], weight [D] -> out [..., D] (and h = x + residual when residual is given)."""
    h = x if residual is None else x + residual
    hf = h.float()
    out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * out.to(x.dtype)
    return out if residual is None else (out, h)


def rmsnorm(x, weight, eps, residual=None):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring); both refuse the same
    shapes."""
    _check_inputs(x, weight, residual)
    if use_triton(x):
        return _rmsnorm_launch(x, weight, eps, residual)
    return rmsnorm_reference(x, weight, eps, residual)


@triton.jit
def _rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, h_ptr, D, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """Program r normalises row r: x, residual, h, out are [rows, D] contiguous, weight is [D].

    Every rounding step mirrors `rmsnorm_reference`: h is rounded to h's dtype (as torch's x + r is: x's
    and the residual's promoted), the normalised row is rounded to x's dtype before the weight multiplies
    it, and that product is rounded once to out's dtype.
    """
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    # g before the wait for the kernel that wrote x (dependent_launch.py): no kernel of a step writes it, and its load
    # then runs while that kernel drains (H200, graphed steps: a 7B's decode 0.4-0.5% faster, Llama-3 8B's 0.3-0.4%).
    # Through the L2 only (".cg"), the one kind of early load kernels/compile_check.py lets through, so that the check
    # still catches any other read moved above the wait.
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg")
    wait_for_previous_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)  # rows * D can pass 2**31 at long prefills
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0)  # [BLOCK_D]
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * D + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * D + cols, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)  # masked lanes are 0, so they add nothing to the sum of squares
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / D + eps)
    normed = (hf * rstd).to(x.dtype)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_inputs(x, weight, residual) -> None:
    """What every path refuses alike. (A residual of another dtype is taken: under autocast a bf16 sublayer output
    meets a float32 stream, and h = x + residual is then float32, as torch's sum.)"""
    if x.dim() == 0:
        raise KernelInputError("RMSNorm normalises the last dimension of x [..., D]; got a 0-d x.")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise KernelInputError(f"RMSNorm weight has shape {tuple(weight.shape)} but must be ({D},) to match "
                               f"the last dimension of x.")
    if residual is not None and residual.shape != x.shape:
        raise KernelInputError(f"the residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}.")


def _launch_options(x, weight) -> dict:
    """`launch_options`, but without PDL for a strided weight: the kernel loads g before it waits for the kernel
    before it, which would then be the copy that makes g contiguous, so that launch must start after the copy."""
    return launch_options(x) if weight.is_contiguous() else {"PDL": False}


def rmsnorm_triton(x, weight, eps, residual=None):
    """Same contract as `rmsnorm_reference`, in one kernel launch (one program per row)."""
    _check_inputs(x, weight, residual)
    return _rmsnorm_launch(x, weight, eps, residual)


def _rmsnorm_launch(x, weight, eps, residual):
    """`rmsnorm_triton` of checked inputs."""
    D = x.shape[-1]
    if D > MAX_D:
        raise KernelInputError(f"the Triton RMSNorm handles rows up to {MAX_D} wide, not {D}; "
                               f"use the torch backend (kernels.set_backend('torch')) for wider models.")
    has_residual = residual is not None
    x2 = x.reshape(-1, D).contiguous()  # [rows, D]; a no-op for the usual contiguous hidden state
    # Without a residual, x2 stands in for the residual and h pointers, which the kernel never touches.
    r2 = residual.reshape(-1, D).contiguous() if has_residual else x2
    h_dtype = torch.promote_types(x.dtype, residual.dtype) if has_residual else x.dtype
    h = torch.empty(x2.shape, dtype=h_dtype, device=x.device) if has_residual else x2
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0] > 0:
        block_d = triton.next_power_of_2(D)
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), out, h, D, eps, HAS_RESIDUAL=has_residual, BLOCK_D=block_d,
            # 8 to 32 elements per thread: wider rows get more warps rather than more registers each.
            num_warps=min(max(block_d // 256, 1), 8), **_launch_options(x, weight),
        )
    return (out, h.view(x.shape)) if has_residual else out

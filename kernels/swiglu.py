"""SwiGLU's activation: silu(gate) * up, read from the fused gate/up projection's output.

`silu_mul(gate_up)` takes the output of the MLP's fused `w13` projection, [..., 2 * I] with the gate in
the first half of each row and the up projection in the second, and returns silu(gate) * up [..., I].
In torch that is two launches (silu, then the product) and an [..., I] intermediate in memory; at batch 1
a decode step is bound by launches, so the Triton kernel does it in one: each program takes a BLOCK of
one row's I columns, computes in float32 and rounds once, as the reference's upcast does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError

BLOCK = 1024  # columns per program


def silu_mul_reference(gate_up):
    """gate_up [..., 2I] -> silu(gate) * up [..., I], computed in float32 and rounded once."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def silu_mul(gate_up):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring); both refuse the same
    shapes."""
    _check_inputs(gate_up)
    if use_triton(gate_up):
        return _silu_mul_launch(gate_up)
    return silu_mul_reference(gate_up)


def _check_inputs(gate_up) -> None:
    """What every path refuses alike (the dispatcher's, whichever it takes, and `silu_mul_triton`'s)."""
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise KernelInputError(f"silu_mul needs the fused gate/up output, an even last dimension; got shape "
                               f"{tuple(gate_up.shape)}: pass the output of the MLP's w13 projection.")


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row, block): out[row, cols] = silu(gate_up[row, cols]) * gate_up[row, I + cols]."""
    wait_for_previous_kernels(PDL)
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_up_ptr + row * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * I + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up):
    """Same contract as `silu_mul_reference`, in one launch."""
    _check_inputs(gate_up)
    return _silu_mul_launch(gate_up)


def _silu_mul_launch(gate_up):
    """`silu_mul_triton` of checked inputs."""
    I = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * I).contiguous()  # [R, 2I]; a no-op for a projection's output
    out = torch.empty(*gate_up.shape[:-1], I, dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] > 0:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(I, BLOCK))](rows, out, I, BLOCK=BLOCK, num_warps=4,
                                                                     **launch_options(rows))
    return out

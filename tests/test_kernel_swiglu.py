"""The fused SwiGLU activation kernel against its torch reference (kernels/swiglu.py).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py): fp32 and fp16; bf16 on CUDA.
The output is poisoned before each run, so an element the kernel does not write fails the comparison.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.errors import KernelInputError
from kernels.swiglu import silu_mul_reference, silu_mul_triton
from kernels.testing import TOLERANCE, poisoned_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2 * 5), (2, 3, 2 * 1536), (4, 2 * 1030), (7, 2 * 2048)])
def test_matches_reference(shape, dtype):
    gate_up = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    with poisoned_empty():
        got = silu_mul_triton(gate_up)
    want = silu_mul_reference(gate_up)
    assert got.shape == want.shape == (*shape[:-1], shape[-1] // 2) and got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_reference_is_swiglu():
    gate, up = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(silu_mul_reference(torch.cat([gate, up], dim=-1)), F.silu(gate) * up)


def test_odd_width_names_the_fix():
    with pytest.raises(KernelInputError, match="even last dimension"):
        silu_mul_triton(torch.randn(2, 7, device=DEVICE))

"""The Triton RMSNorm kernel against its torch reference (kernels/rmsnorm.py).

Without a GPU the kernel runs in Triton's CPU interpreter: fp32 and fp16 (bf16 is broken in the
interpreter, so it is only checked on CUDA). Outputs are poisoned before each run (see
`poisoned_empty`), so an element the kernel does not write fails the comparison.
"""

import os
import re

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, i.e. when triton and kernels/
    # are imported: this must be set before those imports.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
import kernels.rmsnorm as rmsnorm_module  # noqa: E402
from kernels.errors import KernelInputError  # noqa: E402
from kernels.rmsnorm import rmsnorm, rmsnorm_reference, rmsnorm_triton  # noqa: E402
from kernels.testing import check_rmsnorm, rel_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", [(1, 40), (3, 96), (2, 3, 100), (4, 1, 2, 257)])
def test_matches_reference(shape, residual, dtype):
    check_rmsnorm(shape, dtype, DEVICE, residual=residual)


def test_widest_row():
    check_rmsnorm((2, 8192), torch.float32, DEVICE)


def test_weight_of_another_dtype_promotes_like_the_reference():
    # An fp32 weight on fp16 activations gives an fp32 output in the reference; the kernel must agree.
    check_rmsnorm((3, 100), torch.float16, DEVICE, weight_dtype=torch.float32)


def test_strided_weight():
    # The kernel reads its weight before waiting for the kernel before it (PDL, in the row-invariant mode on Hopper),
    # which here is the copy that makes the weight contiguous: that launch must wait for it, or it reads what the
    # copy has not written yet.
    kernels.set_row_invariant(True)  # (tests/conftest.py restores it)
    assert not check_rmsnorm((64, 96), torch.float32, DEVICE, strided_weight=True)[1].is_contiguous()


def test_a_strided_weight_launches_without_pdl(monkeypatch):
    # The race itself needs a GPU; the decision is checked here as if PDL were available.
    monkeypatch.setattr(rmsnorm_module, "launch_options", lambda t: {"PDL": True, "launch_pdl": True})
    x, weight = torch.randn(2, 96), torch.randn(96, 2)
    assert rmsnorm_module._launch_options(x, weight[:, 0].contiguous()) == {"PDL": True, "launch_pdl": True}
    assert rmsnorm_module._launch_options(x, weight[:, 0]) == {"PDL": False}


def test_no_rows():
    x = torch.randn(0, 40, device=DEVICE)
    out, h = rmsnorm_triton(x, torch.ones(40, device=DEVICE), 1e-5, torch.randn(0, 40, device=DEVICE))
    assert out.shape == h.shape == (0, 40)


def test_statistics_are_per_row():
    # Rows of very different scale: a kernel mixing rows' sums of squares would be far off.
    x = torch.randn(3, 96, device=DEVICE) * torch.tensor([[1e-3], [1.0], [1e3]], device=DEVICE)
    out = rmsnorm_triton(x, torch.ones(96, device=DEVICE), 1e-10)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(3, device=DEVICE), rtol=1e-4, atol=1e-4)


def test_bad_inputs_name_the_fix():
    x = torch.randn(2, 40, device=DEVICE)
    with pytest.raises(KernelInputError, match="torch backend"):
        rmsnorm_triton(torch.randn(1, 8200, device=DEVICE), torch.ones(8200, device=DEVICE), 1e-5)
    with pytest.raises(KernelInputError, match=r"must be \(40,\)"):
        rmsnorm_triton(x, torch.ones(41, device=DEVICE), 1e-5)
    with pytest.raises(KernelInputError, match=re.escape("the residual (40,) must have x's shape (2, 40).")):
        rmsnorm_triton(x, torch.ones(40, device=DEVICE), 1e-5, residual=x[0])


@pytest.mark.parametrize("case", ["weight [1, D]", "residual broadcast", "0-d x"])
def test_every_path_refuses_alike(case):
    # The torch path broadcast what the kernel refused.
    x, weight, residual = torch.randn(2, 40, device=DEVICE), torch.ones(40, device=DEVICE), None
    if case == "weight [1, D]":
        weight = weight[None]
    elif case == "residual broadcast":
        residual = x[0]
    else:
        x = x[0, 0]
    messages = set()
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)  # (tests/conftest.py restores it)
        with pytest.raises(KernelInputError) as refused:
            rmsnorm(x, weight, 1e-5, residual)
        messages.add(str(refused.value))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("x_dtype,residual_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_a_residual_of_another_dtype_adds_as_torch_adds(x_dtype, residual_dtype):
    # As under autocast (a bf16 sublayer output, a float32 stream), which the torch path takes: h in the promoted
    # dtype, the normalised row rounded to x's.
    x, weight = torch.randn(3, 96, device=DEVICE).to(x_dtype), torch.randn(96, device=DEVICE)
    residual = torch.randn(3, 96, device=DEVICE).to(residual_dtype)
    (out, h), (want, want_h) = rmsnorm_triton(x, weight, 1e-5, residual), rmsnorm_reference(x, weight, 1e-5, residual)
    assert h.dtype == torch.float32 and torch.equal(h, want_h)
    assert out.dtype == want.dtype and rel_error(out, want) <= 1e-5

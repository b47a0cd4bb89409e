"""Test-session setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. `TRITON_INTERPRET` is read
when a kernel is *defined*, so it must be set before anything imports `kernels/`: here, before any
test module is collected.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402  (with TRITON_INTERPRET set, this patches the interpreter for numpy >= 2.4)
from kernels.testing import poisoned_empty  # noqa: E402


@pytest.fixture(autouse=True)
def restore_kernel_backend():
    """A test that picks a backend (`kernels.set_backend`, or a CLI's `--kernels` run in-process) must not
    leave it to the tests after it: a leaked "triton" runs every later test in the slow interpreter."""
    backend, row_invariant, early = kernels.get_backend(), kernels.row_invariant(), kernels.dependent_launch_enabled()
    yield
    kernels.set_backend(backend)
    kernels.set_row_invariant(row_invariant)
    kernels.set_dependent_launch(early)


@pytest.fixture(autouse=True)
def seeded_random_numbers():
    """torch's global random state is the same at the start of every test, so a test's random inputs do not depend
    on which tests ran before it: run alone (`-k`) or in the whole suite, it draws the same numbers. (A module-scoped
    fixture runs before this one: it seeds itself where it draws.)"""
    torch.manual_seed(0)


@pytest.fixture
def poisoned_allocations():
    """Every buffer a kernel allocates (torch.empty, torch.empty_like) starts poisoned, NaN for floats, so
    that an output element or partial result it never writes shows up."""
    with poisoned_empty():
        yield

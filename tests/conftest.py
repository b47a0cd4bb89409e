"""Test-session setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. `TRITON_INTERPRET` is read
when a kernel is *defined*, so it must be set before anything imports `kernels/`: here, before any
test module is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    import kernels  # noqa: F401  (with TRITON_INTERPRET set, this patches the interpreter for numpy >= 2.4)

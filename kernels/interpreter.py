"""Triton's interpreter: the kernels on CPU tensors, with TRITON_INTERPRET=1 set before they are defined.

That is how CI checks every kernel against its reference, and how `--kernels triton` runs on a CPU.
`TRITON_INTERPRET` is read when a kernel is *defined*, so it must be in the environment before anything
imports the kernel modules; `kernels/__init__.py` then applies `patch_interpreter`.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors) in this process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_patched = False


def patch_interpreter() -> None:
    """Two changes to Triton 3.6's interpreter (idempotent); compiled (CUDA) kernels never see them.

    * Loops with a runtime bound under numpy >= 2.4: the interpreter turns a loop bound into an int with
      int(array of shape (1,)), which numpy >= 2.4 rejects, so every `for ... in range(runtime_value)` fails.
      `.item()` works with every numpy.
    * `tl.dot` row by row alike: the interpreter multiplies with np.matmul, whose BLAS computes a row by a different
      micro-kernel depending on where it sits in the tile on some CPUs (OpenBLAS's AVX2 kernels on an AMD EPYC: the
      tile's last rows), so a row's bits would depend on the rows beside it, which a GPU's tensor cores never do and
      the row-invariance tests (tests/test_exact.py and each kernel's) check. np.einsum without BLAS sums each element
      over k in an order set by K and the operands' layout, the same for every row.
    """
    global _patched
    if _patched:
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: self.handle.data.item())

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        # (8-bit operands, fp8 or int8, which none of our kernels has: the original)
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = d.data.dtype
        product = np.einsum("...ik,...kj->...ij", a.data.astype(acc), b.data.astype(acc))  # (no BLAS: optimize=False)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = create_dot
    _patched = True

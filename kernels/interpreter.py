"""Triton's interpreter: the kernels on CPU tensors, with TRITON_INTERPRET=1 set before they are defined.

That is how CI checks every kernel against its reference, and how `--kernels triton` runs on a CPU.
`TRITON_INTERPRET` is read when a kernel is *defined*, so it must be in the environment before anything
imports the kernel modules; `kernels/__init__.py` then applies `patch_for_numpy_24`.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (on CPU tensors) in this process."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_patched = False


def patch_for_numpy_24() -> None:
    """Let the interpreter run loops with a runtime bound under numpy >= 2.4 (idempotent).

    Triton 3.6's interpreter turns a loop bound into an int with int(array of shape (1,)), which numpy
    >= 2.4 rejects, so every `for ... in range(runtime_value)` fails. `.item()` works with every numpy.
    Only the interpreter is patched; compiled (CUDA) kernels never see it.
    """
    global _patched
    if _patched:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: self.handle.data.item())

    interpreter._patch_lang_tensor = patch_lang_tensor
    _patched = True

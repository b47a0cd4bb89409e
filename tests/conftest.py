"""Test-session setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. `TRITON_INTERPRET` is read
when a kernel is *defined*, so it must be set before anything imports `kernels/`: here, before any
test module is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

    from triton.runtime import interpreter

    def _patch_lang_tensor_numpy24(tensor, scope, _original=interpreter._patch_lang_tensor):
        # Triton 3.6's interpreter turns a loop bound into an int with int(array of shape (1,)), which
        # numpy >= 2.4 rejects, so every `for ... in range(runtime_value)` fails. `.item()` works with
        # every numpy. Only the interpreter is patched; compiled (CUDA) kernels never see it.
        _original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: self.handle.data.item())

    interpreter._patch_lang_tensor = _patch_lang_tensor_numpy24

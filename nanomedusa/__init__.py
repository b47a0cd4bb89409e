"""nanomedusa: Medusa speculative decoding of Llama-family models at batch 1 (start reading at generate.py).

Its Triton kernels are the top-level package `kernels`, beside this one. Hugging Face's `kernels` package, which
transformers >= 5.25 installs, has the same import name; where it comes first on the path (nanomedusa imported
from outside the checkout, with that package installed), every module here would fail deep inside its imports.
So the package checks, once and before any module imports `kernels`, that the name finds ours (without importing
it), and names the fix.
"""

import importlib.util
from pathlib import Path

_KERNELS = Path(__file__).resolve().parent.parent / "kernels"  # ours: the checkout's, or the installed wheel's


def _check_kernels_package() -> None:
    try:
        found = importlib.util.find_spec("kernels")
    except ValueError:  # a `kernels` module without a spec already imported: not ours, which has one
        found = None
    origin = Path(found.origin).resolve() if found is not None and found.origin else None
    if origin is None or origin.parent != _KERNELS or not (_KERNELS / "tree_attention.py").is_file():
        raise ImportError(f"`import kernels` finds {origin or 'no package'} instead of nanomedusa's kernels/ "
                          f"({_KERNELS}), usually Hugging Face's `kernels` package, which transformers >= 5.25 "
                          f"installs: run from the nanomedusa checkout's root, or `pip uninstall kernels`.")
    # Installed from wheels into one site-packages, the two packages share the folder, and the last one installed
    # owns its __init__.py; ours is the one that defines row_invariant (which the kernels import from it).
    if "\ndef row_invariant(" not in origin.read_text(encoding="utf-8", errors="replace"):
        raise ImportError(f"{origin} is not nanomedusa's kernels/__init__.py (Hugging Face's `kernels` package, "
                          f"which transformers >= 5.25 installs, wrote over it): `pip uninstall kernels`, then "
                          f"reinstall nanomedusa from its checkout or wheel with `pip install --force-reinstall "
                          f"--no-deps`.")


_check_kernels_package()

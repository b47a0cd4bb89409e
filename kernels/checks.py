"""Host-side input checks that several ops share, so that a dispatcher's torch path and its Triton kernel refuse the
same inputs with the same sentence (`KernelInputError`).

They look at types, shapes, dtypes and devices only, never at a tensor's values: the ops run inside CUDA graph
captures, where reading a device value back would break the capture.
"""

from __future__ import annotations

import numbers

import torch

from .errors import KernelInputError


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether tensors of `dtype` can index (no floats, complex numbers or bools)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def checked_prefix_len(op: str, prefix_len, device: torch.device, new: int, slots: int):
    """`prefix_len` (the cached tokens before `new` new ones, in a cache of `slots` slots) as the kernels take it: a
    Python int from any integral number (a numpy integer too, which Triton's launcher does not take), checked to fit
    the cache; or a 0-d integer tensor on `device`, whose value stays unread (the kernels never write outside the
    cache for it)."""
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dim() != 0 or prefix_len.device != device or not is_integer_dtype(prefix_len.dtype):
            raise KernelInputError(f"{op} needs prefix_len as an int or a 0-d integer tensor on {device}, not a "
                                   f"{prefix_len.dtype} tensor of shape {tuple(prefix_len.shape)} on "
                                   f"{prefix_len.device}.")
        return prefix_len
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, numbers.Integral):
        raise KernelInputError(f"{op} needs prefix_len as an int or a 0-d integer tensor, not "
                               f"{type(prefix_len).__name__} {prefix_len!r}; pass the number of cached tokens.")
    prefix_len = int(prefix_len)
    if prefix_len < 0:
        raise KernelInputError(f"{op} needs prefix_len >= 0 (the number of cached tokens), not {prefix_len}.")
    if prefix_len > slots - new:
        raise KernelInputError(f"{new} new tokens at prefix_len {prefix_len} do not fit a cache of {slots} slots; "
                               f"set up a larger cache.")
    return prefix_len

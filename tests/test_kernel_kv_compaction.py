"""The Triton KV-compaction kernel against its torch reference (kernels/kv_compaction.py).

Without a GPU the kernel runs in Triton's CPU interpreter (fp32 and fp16; bf16 only on CUDA, as it is
broken in the interpreter). Copies are exact, so the whole cache must equal the reference's bit for bit.
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, i.e. when kernels/ is imported:
    # this must be set before that import.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels.errors import KernelInputError  # noqa: E402
from kernels.kv_compaction import compact_kv_triton  # noqa: E402
from kernels.testing import check_compaction as check  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def random_accepted(n_nodes: int, A: int) -> torch.Tensor:
    """A ascending node indices out of n_nodes, the root (0) first."""
    rest = torch.randperm(n_nodes - 1)[:A - 1] + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), rest.sort().values]).to(DEVICE)


# (L, B, Hkv, S, D, prefix, n tree nodes, A, prefix as tensor)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,B,Hkv,S,D,prefix,n_nodes,A,prefix_as_tensor", [
    (2, 1, 2, 37, 16, 11, 13, 1, False),  # only the root accepted: nothing moves
    (2, 2, 3, 37, 32, 0, 7, 4, True),  # prefix 0, device prefix_len
    (1, 1, 2, 37, 64, 9, 26, 9, False),  # tree ends at S - 2
    (3, 1, 1, 80, 16, 5, 75, 64, True),  # the largest step: A = 64
])
def test_matches_reference(dtype, L, B, Hkv, S, D, prefix, n_nodes, A, prefix_as_tensor):
    kv = torch.randn(L, 2, B, Hkv, S, D, device=DEVICE).to(dtype)
    check(kv, prefix, random_accepted(n_nodes, A), prefix_as_tensor)


def test_identity_prefix_and_overlapping_moves():
    kv = torch.randn(2, 2, 1, 2, 37, 16, device=DEVICE)
    check(kv, 7, torch.arange(5, device=DEVICE))  # every node already in place
    # Slot 3 is both row 2's source and row 3's destination; 5 -> 4 -> ... chains the same way.
    check(kv, 7, torch.tensor([0, 1, 3, 4, 5, 8], device=DEVICE), prefix_as_tensor=True)


def test_paths_padded_with_the_root_and_nodes_outside_the_cache():
    kv = torch.randn(2, 2, 1, 2, 37, 16, device=DEVICE)
    # A path shorter than the tree's depth is padded with the root: its copies land past the new prefix.
    check(kv, 7, torch.tensor([0, 2, 5, 0, 0], device=DEVICE), prefix_as_tensor=True)
    # A node whose slot is outside the cache (after slot 36, or before slot 0) moves nothing, on either path.
    before = kv.clone()
    check(kv, 30, torch.tensor([0, 9, 1], device=DEVICE))
    assert torch.equal(kv[..., 31, :], before[..., 31, :]) and torch.equal(kv[..., 32, :], before[..., 31, :])
    check(kv, 0, torch.tensor([0, -1, 2], device=DEVICE), prefix_as_tensor=True)


def test_strided_views():
    big = torch.randn(2, 2, 3, 2, 37, 16, device=DEVICE)
    view = big[:, :, 1:]  # a batch slice: not contiguous, D still unit-stride
    before = big.clone()
    paths = torch.tensor([[0, 0], [1, 2], [2, 3]], device=DEVICE)  # accepted = a column: stride 2
    check(view, 4, paths[:, 1])
    assert torch.equal(big[:, :, :1], before[:, :, :1])  # the rest of the storage is untouched


def test_bad_cache_shape_names_the_fix():
    with pytest.raises(KernelInputError, match=r"shaped \[L, 2, B, Hkv, S, D\]"):
        compact_kv_triton(torch.zeros(2, 2, 4, 8, 16, device=DEVICE), 0, torch.zeros(1, dtype=torch.long))

"""The Triton tree-attention kernel against its torch reference (kernels/tree_attention.py).

Without a GPU the kernels run in Triton's CPU interpreter: tiny shapes, fp32 and fp16 (bf16 is broken
in the interpreter, so it is only checked on CUDA).
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, i.e. when kernels/ is imported:
    # this must be set before that import.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels.errors import KernelInputError  # noqa: E402
from kernels.testing import rel_error, tree_attention_inputs  # noqa: E402
from kernels.tree_attention import tree_attention_reference, tree_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_tree_mask(T: int) -> torch.Tensor:
    """Ancestor mask [T, T] of a random tree: node i > 0 hangs under a random earlier node."""
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[torch.randint(i, ()).item()]
    return mask


def make_mask(kind: str, T: int) -> torch.Tensor:
    if kind == "causal":
        return torch.ones(T, T, dtype=torch.bool).tril()
    if kind == "tree":
        return random_tree_mask(T)
    # "any": the op allows any mask; keep the diagonal so every query sees at least one key
    return (torch.rand(T, T) < 0.5) | torch.eye(T, dtype=torch.bool)


def run_case(B, Hq, Hkv, T, S, D, prefix, mask_kind, dtype, prefix_as_tensor=False, num_splits=None,
             key_valid=None):
    """Kernel output and the float64 reference on fresh random inputs. Cache slots the op must ignore
    (past prefix+T, or hidden by key_valid) hold NaN for the kernel: it must never use them."""
    q = torch.randn(B, Hq, T, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, Hkv, S, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, Hkv, S, D, dtype=dtype, device=DEVICE)
    tree_mask = make_mask(mask_kind, T).to(DEVICE)
    ref = tree_attention_reference(q.double(), k.double(), v.double(), prefix, tree_mask, key_valid)
    unused = (torch.arange(S, device=DEVICE) >= prefix + T).expand(B, S)  # [B, S]
    if key_valid is not None:
        unused = unused | ~key_valid
    k = k.masked_fill(unused[:, None, :, None], float("nan"))
    v = v.masked_fill(unused[:, None, :, None], float("nan"))
    p = torch.tensor(prefix, device=DEVICE) if prefix_as_tensor else prefix
    out = tree_attention_triton(q, k, v, p, tree_mask, key_valid, num_splits=num_splits)
    return out, ref


# (B, Hq, Hkv, T, S, D, prefix, mask, prefix as tensor, num_splits)
FP32_CASES = [
    (1, 4, 4, 1, 37, 16, 36, "causal", False, None),  # MHA decode, heuristic splits
    (1, 8, 2, 1, 37, 32, 20, "causal", True, 2),  # GQA decode, device prefix_len, trailing slots unused
    (2, 4, 2, 3, 37, 32, 0, "causal", False, 1),  # prefill from empty: single chunk writes out directly
    (1, 6, 2, 7, 37, 64, 17, "tree", True, None),  # group of 3 (M rows not a power of two)
    (1, 2, 2, 13, 37, 16, 24, "tree", False, 3),  # tree ends exactly at S
    (1, 4, 1, 13, 37, 16, 5, "any", True, 8),  # more chunks than key tiles: empty chunks
    (1, 4, 2, 40, 40, 16, 0, "causal", False, 2),  # long T: several query-row blocks
    # Prefixes longer than a GPU key tile (64), so whole prefix-only tiles take the mask-free path:
    (1, 8, 2, 9, 200, 64, 170, "tree", False, None),  # head_dim = the tile's: unmasked K/V loads
    (1, 4, 2, 5, 150, 24, 130, "tree", True, 3),  # head_dim 24 < its 32-wide tile: loads keep a dim mask
]


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,prefix,mask_kind,prefix_as_tensor,num_splits", FP32_CASES)
def test_fp32_matches_float64_reference(poisoned_allocations, B, Hq, Hkv, T, S, D, prefix, mask_kind,
                                        prefix_as_tensor, num_splits):
    out, ref = run_case(B, Hq, Hkv, T, S, D, prefix, mask_kind, torch.float32, prefix_as_tensor, num_splits)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert not out.isnan().any()
    assert rel_error(out, ref) <= 1e-5


HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,prefix,mask_kind,prefix_as_tensor,num_splits", [
    (1, 4, 2, 1, 37, 64, 31, "causal", True, None),
    (1, 6, 3, 7, 37, 32, 11, "tree", False, 2),
])
def test_half_precision_matches_reference(poisoned_allocations, dtype, B, Hq, Hkv, T, S, D, prefix,
                                          mask_kind, prefix_as_tensor, num_splits):
    out, ref = run_case(B, Hq, Hkv, T, S, D, prefix, mask_kind, dtype, prefix_as_tensor, num_splits)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_error(out, ref) <= 1e-2


@pytest.mark.parametrize("prefix_as_tensor,num_splits", [(False, 1), (True, 3)])
def test_key_valid_hides_left_padding(poisoned_allocations, prefix_as_tensor, num_splits):
    B, S, prefix = 3, 37, 20
    key_valid = torch.arange(S, device=DEVICE)[None, :] >= torch.tensor([0, 5, 19], device=DEVICE)[:, None]
    key_valid[1, 9] = False  # and a hole that is not padding
    out, ref = run_case(B, 4, 2, 3, S, 16, prefix, "tree", torch.float32, prefix_as_tensor, num_splits, key_valid)
    assert not out.isnan().any()
    assert rel_error(out, ref) <= 1e-5


@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_query_that_sees_no_key_gets_zeros(poisoned_allocations, num_splits):
    # Row 1 hides every slot (a padding token of a left-padded batch): zeros, not NaN, from both sides.
    B, S, prefix, T = 2, 37, 20, 3
    key_valid = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    key_valid[1] = False
    out, ref = run_case(B, 4, 2, T, S, 16, prefix, "causal", torch.float32, False, num_splits, key_valid)
    assert (ref[1] == 0).all() and (out[1] == 0).all()
    assert rel_error(out, ref) <= 1e-5


def test_chunking_does_not_change_the_result():
    q, k, v, prefix, tree_mask = tree_attention_inputs(4, 2, 16, 30, 5, torch.float32, DEVICE)
    one = tree_attention_triton(q, k, v, prefix, tree_mask, num_splits=1)
    for n in (2, 3):
        assert rel_error(tree_attention_triton(q, k, v, prefix, tree_mask, num_splits=n), one) <= 1e-6


def test_bad_inputs_name_the_fix():
    q = torch.randn(1, 6, 2, 16, device=DEVICE)
    k = torch.randn(1, 4, 8, 16, device=DEVICE)
    mask = torch.ones(2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(KernelInputError, match="multiple of the 4 KV heads"):
        tree_attention_triton(q, k, k, 3, mask)
    with pytest.raises(KernelInputError, match=r"bool tree_mask of shape \(2, 2\)"):
        tree_attention_triton(q[:, :4], k, k, 3, mask[:1])
    with pytest.raises(KernelInputError, match=r"key_valid as a bool \[B, S\] = \(1, 8\)"):
        tree_attention_triton(q[:, :4], k, k, 3, mask, torch.ones(1, 7, dtype=torch.bool, device=DEVICE))


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_device_prefix_len_is_graph_capturable():
    q, k, v, _, tree_mask = tree_attention_inputs(8, 2, 64, 200, 4, torch.bfloat16, DEVICE)
    prefix = torch.tensor(100, device=DEVICE)
    tree_attention_triton(q, k, v, prefix, tree_mask)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention_triton(q, k, v, prefix, tree_mask)
    for p in (150, 7):
        prefix.fill_(p)
        graph.replay()
        assert rel_error(out, tree_attention_reference(q, k, v, p, tree_mask)) <= 1e-2

"""The sampling distribution's kernel against its torch reference (kernels/target_probs.py), and what the
reference cuts: temperature, top k, and the nucleus with its ties.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py): fp32 and fp16 logits; bf16 on CUDA.
The output is poisoned before each run, so an element the kernel does not write fails the comparison.
"""

import pytest
import torch

from kernels.target_probs import target_probs_reference, target_probs_triton
from kernels.testing import poisoned_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SETTINGS = [(0.7, 0, 0.9), (1.0, 50, 1.0), (0.5, 20, 0.8), (1.3, 0, 1.0), (1.0, 5000, 0.5), (0.8, 1, 0.9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1000), (5, 3000), (3, 2, 777)])
@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_matches_reference(shape, dtype, temperature, top_k, top_p):
    logits = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    with poisoned_empty():
        got = target_probs_triton(logits, temperature, top_k, top_p)
    want = target_probs_reference(logits, temperature, top_k, top_p)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    assert_same_distribution(got, want)


def assert_same_distribution(got, want):
    # The same tokens kept (a GPU's exp flushes probabilities under ~1e-38 to 0, which the reference keeps), and
    # the same probabilities.
    assert torch.equal(got > 1e-30, want > 1e-30)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_strided_row_and_a_large_vocabulary():
    logits = torch.randn(3, 2 * 40_000, device=DEVICE)[:, :40_000] * 4  # [3, 40000], row stride 80000
    with poisoned_empty():
        got = target_probs_triton(logits, 0.7, 0, 0.95)
    assert_same_distribution(got, target_probs_reference(logits, 0.7, 0, 0.95))


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (3, 1.0), (3, 0.9)])
def test_tokens_ruled_out_by_minus_infinity_stay_out(top_k, top_p):
    logits = torch.randn(2, 300, device=DEVICE) * 2
    logits[:, ::3] = float("-inf")  # e.g. a vocabulary mask
    with poisoned_empty():
        got = target_probs_triton(logits, 0.8, top_k, top_p)
    assert (got[:, ::3] == 0).all()
    assert_same_distribution(got, target_probs_reference(logits, 0.8, top_k, top_p))


@pytest.mark.parametrize("impl", [target_probs_reference, target_probs_triton])
def test_a_tie_at_the_nucleus_edge_is_kept_whole(impl):
    # softmax: 0.421 for token 0, 0.155 each for the three tied, 0.057 each for the last two. The mass above the
    # tie (0.421) is under 0.6, so all three stay, though two of them would already reach 0.6.
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, 0.0]], device=DEVICE)
    full = logits.softmax(-1)
    p = impl(logits, 1.0, 0, 0.6)
    assert (p[0, :4] > 0).all() and (p[0, 4:] == 0).all()
    torch.testing.assert_close(p[0, :4], full[0, :4] / full[0, :4].sum())
    p = impl(logits, 1.0, 0, 0.4)  # token 0 alone reaches 0.4: the whole tie goes
    assert p[0, 0] == 1 and (p[0, 1:] == 0).all()
    p = impl(logits, 1.0, 2, 1.0)  # top 2: the second largest logit is tied three ways, all kept
    assert (p[0, :4] > 0).all() and (p[0, 4:] == 0).all()


def test_the_nucleus_is_the_smallest_likeliest_set_reaching_top_p():
    logits = torch.randn(4, 500, dtype=torch.float64) * 2
    for top_p in (0.05, 0.5, 0.9, 0.999):
        p = target_probs_reference(logits, 1.0, 0, top_p)
        full = logits.softmax(-1)
        for row in range(4):
            kept = p[row] > 0
            # the likeliest tokens, reaching top_p, and not without their least likely member
            assert full[row][kept].min() >= torch.cat([full[row][~kept], torch.zeros(1, dtype=full.dtype)]).max()
            assert full[row][kept].sum() >= top_p - 1e-9
            assert full[row][kept].sum() - full[row][kept].min() < top_p

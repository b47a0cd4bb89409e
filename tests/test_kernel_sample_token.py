"""Plain sampling's draw (kernels/sample_token.py): the kernel against its torch reference, token for token on the
same uniforms, and the reference against the distribution it must draw from, `target_probs`.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py): fp32 and fp16 logits; bf16 on CUDA.
"""

import pytest
import torch

from kernels.sample_token import PROPOSALS, sample_token_reference, sample_token_triton
from kernels.speculative_sampling import sample_from
from kernels.target_probs import target_probs_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (temperature, top_k, top_p): the usual nucleus, top k alone, both, neither, a nucleus that proposals often miss
SETTINGS = [(0.7, 0, 0.9), (1.0, 50, 1.0), (0.5, 20, 0.8), (1.3, 0, 1.0), (0.8, 1, 0.9), (1.0, 0, 0.05)]


def uniforms(shape, seed=0):
    return torch.rand((*shape, PROPOSALS + 1), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1000), (40, 3000), (3, 2, 777)])
@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_matches_reference(shape, dtype, temperature, top_k, top_p):
    logits = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    u = uniforms(shape[:-1])
    got = sample_token_triton(logits, temperature, top_k, top_p, u)
    assert got.shape == shape[:-1] and got.dtype == torch.long
    assert torch.equal(got, sample_token_reference(logits, temperature, top_k, top_p, u))


def test_a_strided_row_and_minus_infinity():
    logits = torch.randn(8, 2 * 40_000, device=DEVICE)[:, :40_000] * 4  # [8, 40000], row stride 80000
    logits[:, ::3] = float("-inf")  # e.g. a vocabulary mask
    u = uniforms((8,))
    got = sample_token_triton(logits, 0.7, 0, 0.95, u)
    assert (got % 3 != 0).all()
    assert torch.equal(got, sample_token_reference(logits, 0.7, 0, 0.95, u))


@pytest.mark.parametrize("impl", [sample_token_reference, sample_token_triton])
def test_a_proposal_outside_the_nucleus_is_refused(impl):
    # softmax: 0.644 for token 0, 0.237 for token 1, 0.087 and 0.032 for tokens 2 and 3. The nucleus of 0.8 is
    # tokens 0 and 1 (0.644 above token 1 is under 0.8; 0.881 above token 2 is not).
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]], device=DEVICE)
    high = [0.99] * PROPOSALS  # a draw near the top of the CDF proposes token 3, outside the nucleus
    u = torch.tensor([[0.99, 0.7, *high[2:], 0.0]], device=DEVICE)  # proposal 1 (u = 0.7) is token 1, inside
    assert impl(logits, 1.0, 0, 0.8, u).item() == 1
    u = torch.tensor([[*high, 0.9]], device=DEVICE)  # every proposal is token 3: the last uniform draws from the
    assert impl(logits, 1.0, 0, 0.8, u).item() == 1  # nucleus, where 0.9 of (0.731, 0.269) is token 1
    assert impl(logits, 1.0, 0, 1.0, u).item() == 3  # no nucleus: the first proposal stands


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 0.9), (1.0, 0, 0.3), (1.0, 3, 0.7), (0.9, 4, 1.0)])
def test_the_reference_draws_from_target_probs(temperature, top_k, top_p):
    # Rejection sampling must give exactly target_probs' distribution, wherever the proposals land: here the
    # proposals often miss at top-p 0.3 (the fallback draws then), and top k cuts what they come from.
    logits = torch.tensor([1.5, 1.2, 1.0, 0.9, 0.5, 0.0, -0.5, -1.0])
    n = 200_000
    u = torch.rand(n, PROPOSALS + 1, generator=torch.Generator().manual_seed(1))
    tokens = sample_token_reference(logits.expand(n, -1), temperature, top_k, top_p, u)
    freq = torch.bincount(tokens, minlength=8).double() / n
    want = target_probs_reference(logits, temperature, top_k, top_p).double()
    assert torch.equal(freq > 0, want > 0)
    assert (freq - want).abs().max() < 4 * (0.25 / n) ** 0.5  # four standard deviations at worst


@pytest.mark.parametrize("impl", [sample_token_reference, sample_token_triton])
def test_the_fallback_is_what_a_nucleus_draw_gives(impl):
    # With top_p tiny every proposal past the likeliest token misses; the rows whose proposals all miss draw with
    # the last uniform from the nucleus, as sample_from over target_probs would.
    logits = torch.randn(64, 500, device=DEVICE) * 0.3  # flat: proposals rarely hit the likeliest token
    u = uniforms((64,))
    got = impl(logits, 1.0, 0, 1e-6, u)
    assert torch.equal(got, sample_from(target_probs_reference(logits, 1.0, 0, 1e-6), u[:, PROPOSALS]))
    assert torch.equal(got, logits.argmax(-1))

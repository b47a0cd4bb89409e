"""Plain sampling (kernels/sample_token.py): what `target_probs` cuts (temperature, top k, the nucleus with its
ties); the draw's kernel and its CPU path against its torch reference, token for token on the same uniforms; and
the reference against the distribution it must draw from.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py): fp32 and fp16 logits; bf16 on CUDA.
"""

import re

import pytest
import torch

import kernels
import kernels.sample_token as draw
from kernels.sample_token import (PROPOSALS, sample_from, sample_token, sample_token_cpu, sample_token_reference,
                                  sample_token_triton, target_probs)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (temperature, top_k, top_p): the usual nucleus, top k alone, both, neither, a nucleus that proposals often miss
SETTINGS = [(0.7, 0, 0.9), (1.0, 50, 1.0), (0.5, 20, 0.8), (1.3, 0, 1.0), (0.8, 1, 0.9), (1.0, 0, 0.05)]


def uniforms(shape, seed=0):
    return torch.rand((*shape, PROPOSALS + 1), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def random_logits(*shape, seed=0):
    """Logits of spread 3, the same on every run and device (made on the CPU)."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)


NUDGES = [sign * 10.0**-e for e in (7, 6, 5) for sign in (-1, 1)]


def assert_same_draws(got, logits, temperature, top_k, top_p, u):
    """got must be the reference's draws token for token, except where rounding decides: the kernel sums a row in
    another order than the reference's float32 cumsum (off by up to about 1e-6 of the total over thousands of
    tokens), so a uniform that close to the boundary between two tokens can pick either. A row that differs must
    be what the reference draws with its uniforms moved by one of NUDGES (up to 1e-5), or, without a nucleus
    (the first proposal is the token, and a token's place in the CDF is its id's order), lie between those draws.
    At most 1 row in 50 may differ (at least 2): on random rows of 3,000 tokens about 1 in 1,000 does."""
    want = sample_token_reference(logits, temperature, top_k, top_p, u).reshape(-1)
    V = logits.shape[-1]
    got_rows, rows, u_rows = got.reshape(-1), logits.reshape(-1, V), u.reshape(-1, PROPOSALS + 1)
    differ = (got_rows != want).nonzero()[:, 0].tolist()
    assert len(differ) <= max(2, len(want) // 50), (len(differ), len(want))
    for r in differ:
        near = [sample_token_reference(rows[r], temperature, top_k, top_p, (u_rows[r] + d).clamp(0, 1 - 2**-24)).item()
                for d in NUDGES]
        token = got_rows[r].item()
        assert token in near or (top_p >= 1.0 and min(near) <= token <= max(near)), (r, token, want[r].item(), near)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1000), (40, 3000), (3, 2, 777)])
@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_matches_reference(shape, dtype, temperature, top_k, top_p):
    logits = random_logits(*shape).to(dtype)
    u = uniforms(shape[:-1])
    got = sample_token_triton(logits, temperature, top_k, top_p, u)
    assert got.shape == shape[:-1] and got.dtype == torch.long
    assert_same_draws(got, logits, temperature, top_k, top_p, u)


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_matches_reference_block_by_block(temperature, top_k, top_p):
    # Blocks of 64 tokens: every pass walks 16 of them, the draw stops in whichever its uniform lands, and the
    # row's last block is partly past V. A masked run of blocks (-inf) has no weight for the walk to stop in, and
    # where a row starts with one, the max-and-total pass starts with blocks of no finite logit.
    logits = random_logits(4, 1000, seed=1)
    logits[1, 128:512] = float("-inf")
    logits[2, :200] = float("-inf")
    u = uniforms((4,), seed=3)
    got = sample_token_triton(logits, temperature, top_k, top_p, u, block=64)
    assert_same_draws(got, logits, temperature, top_k, top_p, u)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.9), (50, 0.9)])
def test_a_draw_at_the_very_top_takes_the_last_token_with_weight(top_k, top_p):
    # u just over 1 stands in for a draw that rounding puts past the total (the total and the walk's running sum
    # can round apart): the walk passes every block, and the row's last blocks have no weight (-inf), so it must
    # step back to the last block that has some, as sample_from's clamp does. (At top-p 0.9 the proposal, the
    # row's last token, usually misses, and the fallback draws the same way.)
    logits = random_logits(4, 1000, seed=2)
    logits[:, 600:] = float("-inf")
    u = torch.full((4, PROPOSALS + 1), 1.001, device=DEVICE)
    got = sample_token_triton(logits, 0.7, top_k, top_p, u, block=64)
    assert ((0 <= got) & (got < 600)).all()
    assert torch.equal(got, sample_token_reference(logits, 0.7, top_k, top_p, u))


def test_a_strided_row_and_minus_infinity():
    logits = (random_logits(8, 2 * 40_000, seed=3) * 4 / 3)[:, :40_000]  # [8, 40000], row stride 80000
    assert logits.stride(0) == 2 * 40_000  # a view: scaling after slicing would copy the rows together
    logits[:, ::3] = float("-inf")  # e.g. a vocabulary mask
    u = uniforms((8,))
    got = sample_token_triton(logits, 0.7, 0, 0.95, u)
    assert (got % 3 != 0).all()
    assert_same_draws(got, logits, 0.7, 0, 0.95, u)


@pytest.mark.parametrize("impl", [sample_token_reference, sample_token_triton, sample_token_cpu])
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


@pytest.mark.parametrize("shape", [(1, 1000), (40, 3000), (3, 2, 777)])
@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS + [(1.0, 0, 0.3)])
def test_the_cpu_path_draws_the_references_tokens(shape, temperature, top_k, top_p):
    # Token for token on the same uniforms (no rounding apart: the same torch operations on the same rows). At top-p
    # 0.3 and 0.05 some rows' proposals all miss and some don't, so the nucleus is found for a few rows only.
    logits = random_logits(*shape, seed=4).cpu()
    u = uniforms(shape[:-1], seed=5).cpu()
    want = sample_token_reference(logits, temperature, top_k, top_p, u)
    assert torch.equal(sample_token_cpu(logits, temperature, top_k, top_p, u), want)
    assert torch.equal(sample_token(logits, temperature, top_k, top_p, u), want)


def test_the_cpu_path_finds_the_nucleus_only_where_every_proposal_missed(monkeypatch):
    # Row 0 rises gently over 1,000 tokens (at top-p 0.05 the nucleus is its top 50 or so, which uniforms of 0.5
    # miss); row 1 puts 0.99 on token 7 (a proposal of it is kept at once). So the nucleus is computed for row 0
    # alone, and without row 0 the proposals stop after the first.
    kernels.set_backend("torch")
    logits = torch.zeros(2, 1000)
    logits[0] = torch.arange(1000) * 1e-3
    logits[1, 7] = 12.0
    u = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.25], [0.5, 0.1, 0.9, 0.3, 0.0]])
    want = sample_token_reference(logits, 1.0, 0, 0.05, u)
    assert want[0] >= 900 and want[1] == 7
    cuts, draws = [], []
    monkeypatch.setattr(draw, "target_probs", lambda z, *a: cuts.append((z.shape[0], *a)) or target_probs(z, *a))
    monkeypatch.setattr(draw, "sample_from", lambda p, v: draws.append(v.shape) or sample_from(p, v))
    assert torch.equal(sample_token(logits, 1.0, 0, 0.05, u), want)
    assert cuts == [(2, 1.0, 0), (1, 1.0, 0, 0.05)]  # q for both rows, then the nucleus of row 0 alone
    cuts.clear(), draws.clear()
    assert sample_token(logits[1:], 1.0, 0, 0.05, u[1:]).tolist() == [7]
    assert cuts == [(1, 1.0, 0)] and len(draws) == 1


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 0.9), (1.0, 0, 0.3), (1.0, 3, 0.7), (0.9, 4, 1.0)])
def test_the_reference_draws_from_target_probs(temperature, top_k, top_p):
    # Rejection sampling must give exactly target_probs' distribution, wherever the proposals land: here the
    # proposals often miss at top-p 0.3 (the fallback draws then), and top k cuts what they come from.
    logits = torch.tensor([1.5, 1.2, 1.0, 0.9, 0.5, 0.0, -0.5, -1.0])
    n = 200_000
    u = torch.rand(n, PROPOSALS + 1, generator=torch.Generator().manual_seed(1))
    tokens = sample_token_reference(logits.expand(n, -1), temperature, top_k, top_p, u)
    freq = torch.bincount(tokens, minlength=8).double() / n
    want = target_probs(logits, temperature, top_k, top_p).double()
    assert torch.equal(freq > 0, want > 0)
    assert (freq - want).abs().max() < 4 * (0.25 / n) ** 0.5  # four standard deviations at worst


@pytest.mark.parametrize("impl", [sample_token_reference, sample_token_triton, sample_token_cpu])
def test_the_fallback_is_what_a_nucleus_draw_gives(impl):
    # With top_p tiny every proposal past the likeliest token misses; the rows whose proposals all miss draw with
    # the last uniform from the nucleus, as sample_from over target_probs would.
    logits = torch.randn(64, 500, device=DEVICE) * 0.3  # flat: proposals rarely hit the likeliest token
    u = uniforms((64,))
    got = impl(logits, 1.0, 0, 1e-6, u)
    assert torch.equal(got, sample_from(target_probs(logits, 1.0, 0, 1e-6), u[:, PROPOSALS]))
    assert torch.equal(got, logits.argmax(-1))


def test_a_tie_at_the_nucleus_edge_is_kept_whole():
    # softmax: 0.421 for token 0, 0.155 each for the three tied, 0.057 each for the last two. The mass above the
    # tie (0.421) is under 0.6, so all three stay, though two of them would already reach 0.6.
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    full = logits.softmax(-1)
    p = target_probs(logits, 1.0, 0, 0.6)
    assert (p[0, :4] > 0).all() and (p[0, 4:] == 0).all()
    torch.testing.assert_close(p[0, :4], full[0, :4] / full[0, :4].sum())
    p = target_probs(logits, 1.0, 0, 0.4)  # token 0 alone reaches 0.4: the whole tie goes
    assert p[0, 0] == 1 and (p[0, 1:] == 0).all()
    p = target_probs(logits, 1.0, 2, 1.0)  # top 2: the second largest logit is tied three ways, all kept
    assert (p[0, :4] > 0).all() and (p[0, 4:] == 0).all()


def test_the_nucleus_is_the_smallest_likeliest_set_reaching_top_p():
    logits = torch.randn(4, 500, dtype=torch.float64) * 2
    for top_p in (0.05, 0.5, 0.9, 0.999):
        p = target_probs(logits, 1.0, 0, top_p)
        full = logits.softmax(-1)
        for row in range(4):
            kept = p[row] > 0
            # the likeliest tokens, reaching top_p, and not without their least likely member
            assert full[row][kept].min() >= torch.cat([full[row][~kept], torch.zeros(1, dtype=full.dtype)]).max()
            assert full[row][kept].sum() >= top_p - 1e-9
            assert full[row][kept].sum() - full[row][kept].min() < top_p


def test_the_kernel_keeps_a_tie_at_the_edge_whole():
    # As above: at top-p 0.6 tokens 0-3 form the nucleus. The draws land on all four, never on 4 or 5, and the
    # fallback (top-p 0.01: proposals of tokens 1-5 all miss) takes token 0 only.
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0, 0.0], device=DEVICE).expand(64, -1)
    for top_p, support in ((0.6, {0, 1, 2, 3}), (0.01, {0})):
        u = uniforms((64,), seed=2)
        got = sample_token_triton(logits, 1.0, 0, top_p, u)
        assert set(got.tolist()) == support
        assert torch.equal(got, sample_token_reference(logits, 1.0, 0, top_p, u))


@pytest.mark.parametrize("u_shape", [(3, 2), (2, PROPOSALS + 1), (3,)])
def test_uniforms_of_the_wrong_shape_are_refused_alike_on_every_path(u_shape):
    # The kernel read [3, 5] uniforms from a [2, 5] tensor (past its end) and the CPU path drew from whatever the
    # shape gave it; now both refuse, in one sentence.
    logits, u = random_logits(3, 50), torch.rand(u_shape, device=DEVICE)
    n = PROPOSALS + 1
    message = (f"sample_token needs {n} uniforms for each row of logits (3, 50), shaped (3, {n}) on {logits.device}, "
               f"not {u_shape} on {u.device}.")
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)  # (tests/conftest.py restores it)
        with pytest.raises(kernels.KernelInputError, match=re.escape(message)):
            sample_token(logits, 0.7, 5, 0.9, u)
    with pytest.raises(kernels.KernelInputError, match=re.escape(message)):
        sample_token_triton(logits, 0.7, 5, 0.9, u)

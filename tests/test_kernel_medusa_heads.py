"""The fused Medusa-heads top-k kernels against the torch reference (kernels/medusa_heads.py).

Without a GPU the kernels run in Triton's CPU interpreter (fp32 and fp16; bf16 only on CUDA, as it
is broken in the interpreter). The ids are checked through the reference logits: the logits at the
returned ids must be the reference's top-k values, and the ids themselves must match wherever the
reference's ranking has no near-ties (`assert_topk_matches`). Buffers are poisoned before each run.
With the heads' temperatures the kernels also return log softmax(logits / T) at those ids, from each
row's log-partition gathered in the same vocab pass: checked against the reference's full logits.
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, i.e. when triton and kernels/
    # are imported: this must be set before those imports.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import medusa_heads  # noqa: E402
from kernels.errors import KernelInputError  # noqa: E402
from kernels.testing import assert_topk_matches, check_medusa, medusa_inputs, poisoned_empty  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, L, N, D, V, shared, topk", [
    (3, 1, 1, 40, 257, False, 10),   # decode: one row, per-head vocab weights
    (2, 1, 2, 100, 300, True, 4),    # shared lm_head: all K*N rows in one program
    (2, 2, 1, 96, 130, False, 16),   # two ResBlocks; the last vocab slice has 2 real columns of 128
])
def test_matches_reference(K, L, N, D, V, shared, topk, dtype):
    check_medusa(K, L, N, D, V, shared, topk, dtype, DEVICE)


def test_no_resblocks():
    # L = 0: the vocab projection reads the hidden state directly (head stride 0).
    check_medusa(3, 0, 2, 40, 257, True, 5, torch.float32, DEVICE)


def test_more_rows_than_one_tile():
    # K*N = 18 shared rows share one 32-row vocab program; per head, N = 17 rows span two 16-row ResBlock tiles;
    # 70 shared rows span two 64-row vocab programs.
    check_medusa(3, 1, 6, 40, 200, True, 3, torch.float32, DEVICE)
    check_medusa(2, 1, 17, 40, 200, False, 3, torch.float32, DEVICE)
    check_medusa(1, 1, 70, 40, 200, True, 3, torch.float32, DEVICE, torch.tensor([0.8], device=DEVICE))


def test_widened_vocab_slices(monkeypatch):
    # Big vocabularies widen the slices to cap the slices per row; force that at a tiny size.
    monkeypatch.setattr(medusa_heads, "MAX_SLICES", 2)  # 257 ids: two 256-wide slices, not three of 128
    check_medusa(2, 1, 1, 40, 257, False, 4, torch.float32, DEVICE)


@pytest.mark.parametrize("topk", [3, 8])
def test_top_logits_in_one_slice(topk):
    # The top-k program reads only the k slices with the largest maxima: here every top logit sits in slice 2
    # (ids 260..269), so one slice holds them all and the other picked slices hold none.
    hidden, res_w, res_b, vocab = medusa_inputs(1, 0, 1, 40, 1000, True, torch.float32, DEVICE)
    vocab[260:270] = hidden[0] / hidden[0].norm() ** 2 * torch.arange(5.0, 55.0, 5.0, device=DEVICE)[:, None]
    ids = medusa_heads.medusa_topk_triton(hidden, res_w, res_b, vocab, topk)
    logits = medusa_heads.medusa_heads_reference(hidden, res_w, res_b, vocab)
    assert_topk_matches(ids, logits, topk)
    assert set(ids.flatten().tolist()) <= set(range(260, 270))  # logits 5 .. 50 there, of order 1 elsewhere


@pytest.mark.parametrize("shared", [True, False])
def test_vocab_padding_never_wins(shared):
    # The vocab weight is a view into a bigger buffer whose rows after the last head's V hold huge
    # weights: a slice that read past V would propose ids >= V with the largest logits.
    hidden, res_w, res_b, vocab = medusa_inputs(2, 1, 1, 40, 300, shared, torch.float32, DEVICE)
    rows = vocab.reshape(-1, 40)  # [(K *) V, D]
    buffer = torch.cat([rows, torch.full((128, 40), 100.0, device=DEVICE)])
    view = buffer[: rows.shape[0]].view(vocab.shape)
    ids = medusa_heads.medusa_topk_triton(hidden, res_w, res_b, view, 8)
    assert_topk_matches(ids, medusa_heads.medusa_heads_reference(hidden, res_w, res_b, view), 8)


def test_ties_return_tied_values():
    # A vocab weight of 8 distinct rows, repeated across all three 128-wide slices, gives exact ties
    # within and across slices: any tied id is right, but the values must be the top-k values.
    hidden, res_w, res_b, vocab = medusa_inputs(2, 1, 1, 40, 300, True, torch.float32, DEVICE)
    vocab = vocab[torch.arange(300) % 8]
    ids = medusa_heads.medusa_topk_triton(hidden, res_w, res_b, vocab, 12)
    assert_topk_matches(ids, medusa_heads.medusa_heads_reference(hidden, res_w, res_b, vocab), 12)
    assert all(len(set(row.tolist())) == 12 for row in ids.reshape(-1, 12))  # no id twice


def test_bad_inputs_name_the_fix():
    hidden, res_w, res_b, vocab = medusa_inputs(2, 1, 1, 40, 64, False, torch.float32, DEVICE)
    with pytest.raises(KernelInputError, match="top-k between 1 and 16"):
        medusa_heads.medusa_topk_triton(hidden, res_w, res_b, vocab, 17)
    with pytest.raises(KernelInputError, match="share one dtype"):
        medusa_heads.medusa_topk_triton(hidden.half(), res_w, res_b, vocab, 4)
    with pytest.raises(KernelInputError, match=r"must be \[K=2, V, 40\]"):
        medusa_heads.medusa_topk_triton(hidden, res_w, res_b, vocab[:, :, :39], 4)
    with pytest.raises(KernelInputError, match="stacked weights"):
        medusa_heads.medusa_topk_triton(hidden, res_w[:, :, :39], res_b, vocab, 4)


@pytest.mark.parametrize("case", ["1-D hidden", "top-k 17", "top-k past V", "temperatures of another shape"])
def test_every_path_refuses_alike(case):
    # The torch path took a 1-D hidden state and a top-k of 17, which the kernel refuses (17: its real limit).
    hidden, res_w, res_b, vocab = medusa_inputs(2, 1, 1, 40, 64, False, torch.float32, DEVICE)
    topk, temperatures = 4, None
    if case == "1-D hidden":
        hidden = hidden[0]
    elif case == "top-k 17":
        topk = 17
    elif case == "top-k past V":
        vocab, topk = vocab[:, :10], 11
    else:
        temperatures = torch.ones((), device=DEVICE)
    messages = set()
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)  # (tests/conftest.py restores it)
        with pytest.raises(KernelInputError) as refused:
            medusa_heads.medusa_topk(hidden, res_w, res_b, vocab, topk, temperatures)
        messages.add(str(refused.value))
    assert len(messages) == 1, messages


# --- calibrated log-probabilities: the log-partition of the tempered logits, in the same vocab pass ------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K, L, N, D, V, shared, topk", [
    (3, 1, 1, 40, 300, True, 10),    # decode: one row, three 128-wide slices, the last with 44 real columns
    (3, 1, 1, 40, 257, False, 10),   # per-head vocab weights
    (2, 2, 3, 96, 130, False, 16),   # two ResBlocks, three rows per head
    (3, 0, 6, 40, 200, True, 3),     # no ResBlocks; 18 shared rows span two tiles
])
def test_log_probabilities_match_reference(K, L, N, D, V, shared, topk, dtype):
    temperatures = torch.tensor([0.7, 1.9, 1.3][:K], device=DEVICE)
    check_medusa(K, L, N, D, V, shared, topk, dtype, DEVICE, temperatures)


def test_log_probabilities_over_widened_slices(monkeypatch):
    # Widened slices (fewer, wider programs) combine fewer log-partition shares, and so do 1-slice vocabularies.
    monkeypatch.setattr(medusa_heads, "MAX_SLICES", 2)
    check_medusa(2, 1, 1, 40, 257, False, 4, torch.float32, DEVICE, torch.tensor([0.5, 2.0], device=DEVICE))
    check_medusa(2, 1, 1, 40, 100, True, 4, torch.float32, DEVICE, torch.tensor([1.0, 3.0], device=DEVICE))


def test_reference_log_probabilities_are_the_tempered_log_softmax():
    inputs = medusa_inputs(3, 1, 2, 40, 300, True, torch.float32, DEVICE)
    temperatures = torch.tensor([0.7, 1.9, 1.3], device=DEVICE)
    ids, logprobs = medusa_heads.medusa_topk_reference(*inputs, 5, temperatures)
    logits = medusa_heads.medusa_heads_reference(*inputs)
    want = torch.log_softmax(logits / temperatures[:, None, None], dim=-1).topk(5, dim=-1)
    assert torch.equal(ids, want.indices) and torch.equal(logprobs, want.values)
    assert torch.equal(ids, medusa_heads.medusa_topk_reference(*inputs, 5))  # a temperature reorders nothing


@pytest.mark.parametrize("shared", [True, False])
def test_heads_topk_logprobs_on_the_kernels_equal_the_tempered_log_softmax(shared):
    # MedusaHeads.topk_logprobs through the Triton kernels (no [K, N, V] logits) against its old definition,
    # log_softmax(logits / T).topk of the heads' whole logits.
    import kernels
    from nanomedusa.heads import HeadsConfig, MedusaHeads

    config = HeadsConfig(3, 1, 40, 300, shared, medusa_temperatures=[0.8, 1.7, 1.2])
    heads = MedusaHeads(config).to(DEVICE).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape) * 40**-0.5)
    lm_head = torch.randn(300, 40, device=DEVICE) * 40**-0.5
    hidden = torch.randn(2, 40, device=DEVICE)
    kernels.set_backend("triton")  # (the conftest fixture restores the backend)
    with poisoned_empty():
        ids, logprobs = heads.topk_logprobs(hidden, 6, lm_head)
    with torch.no_grad():
        logits = heads(hidden, lm_head)
    want = torch.log_softmax(logits / torch.tensor(config.medusa_temperatures, device=DEVICE)[:, None, None], -1)
    assert_topk_matches(ids, logits, 6)
    torch.testing.assert_close(logprobs, want.gather(-1, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprobs, want.topk(6, dim=-1).values, rtol=1e-5, atol=1e-5)

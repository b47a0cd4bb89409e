"""The fused Medusa-heads top-k kernels against the torch reference (kernels/medusa_heads.py).

Without a GPU the kernels run in Triton's CPU interpreter (fp32 and fp16; bf16 only on CUDA, as it
is broken in the interpreter). The ids are checked through the reference logits: the logits at the
returned ids must be the reference's top-k values, and the ids themselves must match wherever the
reference's ranking has no near-ties (`assert_topk_matches`). Buffers are poisoned before each run.
"""

import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, i.e. when triton and kernels/
    # are imported: this must be set before those imports.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels import medusa_heads  # noqa: E402
from kernels.errors import KernelInputError  # noqa: E402
from kernels.testing import assert_topk_matches, check_medusa, medusa_inputs  # noqa: E402

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
    # K*N = 18 shared rows span two 16-row tiles; per head, N = 17 rows span two as well.
    check_medusa(3, 1, 6, 40, 200, True, 3, torch.float32, DEVICE)
    check_medusa(2, 1, 17, 40, 200, False, 3, torch.float32, DEVICE)


def test_widened_vocab_slices(monkeypatch):
    # Big vocabularies widen the slices to cap the candidates per row; force that at a tiny size.
    monkeypatch.setattr(medusa_heads, "MAX_CANDIDATES", 8)
    check_medusa(2, 1, 1, 40, 257, False, 4, torch.float32, DEVICE)


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

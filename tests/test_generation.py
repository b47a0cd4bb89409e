"""Plain decoding: batched generation equals one-by-one, sampling settings behave."""

import pytest
import torch

from nanomedusa.generation import generate, generate_batch
from nanomedusa.loading import load_model
from nanomedusa.sampling import Sampling, target_probs
from tests.helpers import make_hf_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    make_hf_checkpoint(path, num_key_value_heads=2)
    return load_model(path, device="cpu", dtype="float32")[0]


def test_batch_of_unequal_prompts_equals_one_by_one(model):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (3, 11, 1, 7)]
    singles = [generate(model, p, max_new_tokens=16).tokens for p in prompts]
    # A token row 1 first emits mid-way becomes eos: that row stops there, rows that never emit it go on.
    stop = next(i for i in range(1, 16) if singles[1][i] not in singles[1][:i])
    eos = singles[1][stop]
    expected = [generate(model, p, max_new_tokens=16, eos_ids=[eos]).tokens for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens=16, eos_ids=[eos]) == expected
    assert expected[1][-1] == eos and len(expected[1]) == stop + 1
    assert max(len(row) for row in expected) == 16


def test_top_k_and_top_p_cut_the_distribution():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = target_probs(logits, Sampling(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)  # [0.64, 0.23, 0.09, 0.03, 0.01]
    p = target_probs(logits, Sampling(temperature=1.0, top_p=0.8))  # 0.64 < 0.8 <= 0.64 + 0.23: two tokens
    assert (p[2:] == 0).all() and torch.allclose(p[:2], full[:2] / full[:2].sum())
    p = target_probs(logits, Sampling(temperature=0.5))
    assert torch.allclose(p, (logits / 0.5).softmax(-1))


def test_seeded_sampling_is_reproducible_and_greedy_is_the_argmax(model):
    prompt = [5, 6, 7]
    runs = [generate(model, prompt, 12, Sampling(temperature=1.0), generator=torch.Generator().manual_seed(3)).tokens
            for _ in range(2)]
    assert runs[0] == runs[1]
    greedy = generate(model, prompt, 5).tokens
    with torch.no_grad():
        model.drop_cache()
        first = model(torch.tensor([prompt]))[0, -1].argmax().item()
    assert greedy[0] == first

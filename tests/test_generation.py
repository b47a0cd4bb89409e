"""Plain decoding: batched generation equals one-by-one, padded and graphed prefills change nothing,
sampling settings behave."""

import copy
import time

import pytest
import torch

import kernels
from nanomedusa.decoder import PREFILL_BUCKET, Decoder
from nanomedusa.generation import generate, generate_batch
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.loading import load_model
from nanomedusa.pending_read import PendingRead
from nanomedusa.sampling import Sampling, target_probs
from tests.helpers import make_hf_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    make_hf_checkpoint(path, num_key_value_heads=2)
    return load_model(path, device="cpu", dtype="float32")[0]


@pytest.mark.parametrize("exact", [False, True])
def test_batch_of_unequal_prompts_equals_one_by_one(model, exact):
    if exact:  # the row-invariant Triton kernels (the interpreter on a CPU), RMSNorms folded into the linear layers
        kernels.set_backend("triton")
        kernels.set_row_invariant(True)  # (tests/conftest.py restores both)
        if torch.cuda.is_available():  # compiled kernels need CUDA tensors: a copy of the module's model there
            model = copy.deepcopy(model).cuda()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (3, 11, 1, 7)]
    singles = [generate(Decoder(model), p, max_new_tokens=16).tokens for p in prompts]
    # A token row 1 first emits mid-way becomes eos: that row stops there, rows that never emit it go on.
    stop = next(i for i in range(1, 16) if singles[1][i] not in singles[1][:i])
    eos = singles[1][stop]
    expected = [generate(Decoder(model), p, max_new_tokens=16, eos_ids=[eos]).tokens for p in prompts]
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
    runs = [generate(Decoder(model), prompt, 12, Sampling(temperature=1.0), generator=torch.Generator().manual_seed(3)).tokens
            for _ in range(2)]
    assert runs[0] == runs[1]
    greedy = generate(Decoder(model), prompt, 5).tokens
    with torch.no_grad():
        model.kv_cache = None
        first = model(torch.tensor([prompt]))[0, -1].argmax().item()
    assert greedy[0] == first


def test_tokens_padded_after_the_prompt_change_nothing(model):
    # What the GPU's padded prefill relies on: junk after the prompt leaves the prompt's hidden states
    # alone (causal attention), and the cache slots it fills are overwritten before decoding reads them.
    prompt = [5, 17, 42, 8, 9, 23, 61]
    expected = generate(Decoder(model), prompt, max_new_tokens=10).tokens
    with torch.inference_mode():
        model.setup_cache(64)
        padded = torch.tensor([prompt + [88, 3, 71, 14, 55, 2]])  # [1, 13]: 6 junk tokens after the prompt
        hidden = model.forward_hidden(padded, prefix_len=0)[0, len(prompt) - 1:len(prompt)]  # [1, D]
        tokens = [int(model.logits(hidden).argmax())]
        for pos in range(len(prompt), len(prompt) + 9):
            tokens.append(int(model(torch.tensor([[tokens[-1]]]), prefix_len=pos)[0, -1].argmax()))
    assert tokens == expected


def test_a_cache_that_fits_is_reused(model):
    # Reallocating the cache would drop the prefill graphs captured on it (GPU), so a run that needs
    # fewer slots keeps the longer cache; one that needs more, or another batch size, gets a new one.
    model.setup_cache(96)
    cache = model.kv_cache
    model.setup_cache(40)
    assert model.kv_cache is cache and model.max_seq_len == 96
    model.setup_cache(128)
    assert model.kv_cache is not cache and model.max_seq_len == 128
    model.setup_cache(64, batch_size=2)
    assert model.kv_cache.batch_size == 2 and model.max_seq_len == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the prefill graphs need a GPU")
def test_graphed_prefill_equals_eager_and_is_reused(tmp_path):
    make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    gpu_model = load_model(tmp_path, device="cuda", dtype="float32")[0]
    graphed, eager = Decoder(gpu_model), Decoder(gpu_model, cuda_graphs=False)
    with torch.inference_mode():
        gpu_model.setup_cache(4 * PREFILL_BUCKET)
        for prompt in ([5, 17, 42], list(range(3, 3 + PREFILL_BUCKET + 5)), [9, 8, 7, 6, 5]):
            torch.testing.assert_close(graphed.prefill(prompt), eager.prefill(prompt), rtol=1e-4, atol=1e-4)
        # 3 prompts, 2 padded lengths; a graph's key also holds the kernel settings it was captured with
        settings = (kernels.get_backend(), kernels.row_invariant(), kernels.dependent_launch_enabled())
        assert sorted(graphed.graphs) == [(("prefill", n), *settings) for n in (PREFILL_BUCKET, 2 * PREFILL_BUCKET)]
        # and they work in one memory pool (less than the sum of what each needs): the last prompt's graph was
        # replayed after the longer one's was captured in that pool, and gave its own result
        assert len({step.graph.pool() for step in graphed.graphs.values()}) == 1
    for prompt in ([5, 17, 42], list(range(3, 90))):
        assert generate(graphed, prompt, 20).tokens == generate(eager, prompt, 20).tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the prefill graphs need a GPU")
def test_a_prefill_kept_while_the_cache_grows(tmp_path):
    # A larger run replaces the cache, so the graphs captured on the old one go, and with them their pool: the next
    # prefill's capture takes a new one. (Capturing into the old pool while a tensor it returned lives on made
    # torch's allocator stop on an internal assert.)
    make_hf_checkpoint(tmp_path, max_position_embeddings=1024)
    model = load_model(tmp_path, device="cuda", dtype="float32")[0]
    graphed, eager = Decoder(model), Decoder(model, cuda_graphs=False)
    long_prompt = list(range(3, 90)) * 4  # 348 tokens: a cache of 512 slots, where the first run made 256
    graphed.size_cache(3, 20)
    with torch.inference_mode():
        kept = graphed.prefill([5, 17, 42])
    assert generate(graphed, long_prompt, 20).tokens == generate(eager, long_prompt, 20).tokens
    assert model.max_seq_len == 512 and kept.shape == (1, model.config.dim)


def test_a_prefill_s_time_holds_no_decoding_step(model, monkeypatch):
    # A CPU runs the step queued before a token is read there and then: the prefill's clock held it. A clock that
    # advances one second per forward pass (prefill, decoding or tree step) and never otherwise says what it holds.
    from nanomedusa.heads import MedusaHeads
    from nanomedusa.tree import TreeBuffers

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])  # (the loops' and pending_read's, for this test)

    def ticking(fn):
        def call(*args, **kwargs):
            clock[0] += 1.0
            return fn(*args, **kwargs)
        return call

    prefill, graphed = Decoder.prefill, Decoder.graphed
    monkeypatch.setattr(Decoder, "prefill", lambda self, *a, **k: ticking(prefill)(self, *a, **k))
    monkeypatch.setattr(Decoder, "graphed", lambda self, *a, **k: ticking(graphed(self, *a, **k)))
    decoder = Decoder(model)
    plain = generate(decoder, [1, 2, 3], 4)
    assert plain.prefill_seconds == 1.0 and plain.seconds == 4.0  # the prefill, then 3 steps
    heads = MedusaHeads.from_base(model, num_heads=2)
    tree = TreeBuffers.from_choices([[0], [0, 0]], vocab_size=model.config.vocab_size)
    medusa = generate_medusa(decoder, heads, tree, [1, 2, 3], 4)
    assert medusa.prefill_seconds == 2.0  # the prefill and the first step's proposal (start_tree), not a tree step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_a_pending_read_holds_the_values_it_was_queued_behind(device):
    # The decoding loops queue the next step before reading the last one's tokens: that step overwrites the
    # tensor read (a graph's static output), so the read must hold the values as they were when it was queued.
    values = torch.tensor([7, 8, 9], device=device)
    read = PendingRead(values)
    queued = time.perf_counter()
    values.fill_(0)  # queued after the read, as the next step's replay is
    assert read.tolist() == [7, 8, 9]
    # when the values reached the host, where a prefill's time ends: on a CPU, before the step queued after the read
    # (which a CPU runs as it is queued: the prefill's time held a whole decoding step), on a GPU at the read
    assert (read.ready_at <= queued) == (device == "cpu") and read.ready_at <= time.perf_counter()

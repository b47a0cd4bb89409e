"""Our Transformer against transformers' reference implementation on tiny random checkpoints."""


import pytest
import torch

from nanomedusa.loading import load_model
from tests.helpers import make_hf_checkpoint

VARIANTS = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=2),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "head_dim": dict(head_dim=32, num_key_value_heads=2),
    "sharded": dict(shard_size="20KB"),
    "qwen2_bias": dict(arch="qwen2", num_key_value_heads=2),
    "llama_bias": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=2),  # o_proj and the MLP's too
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    # a seed per variant, the same in every run (hash() of a str changes from one Python process to the next)
    ref = make_hf_checkpoint(path, seed=sorted(VARIANTS).index(request.param), **VARIANTS[request.param])
    ours, _ = load_model(path, device="cpu", dtype="float32")
    return request.param, path, ref, ours


@pytest.fixture(autouse=True)
def no_cache_attached(checkpoint):
    """Each test gets the module's shared model with no KV cache attached, whichever test ran before it: a Decoder
    leaves its cache on the model (a chat's next turn reuses it), and every forward of a model with a cache uses it."""
    checkpoint[3].kv_cache = None


def test_logits_match_transformers(checkpoint):
    name, path, ref, ours = checkpoint
    if name == "sharded":
        assert (path / "model.safetensors.index.json").exists()
    tokens = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert rel_err(got, expected) <= 1e-4


def test_cached_decode_equals_full_forward(checkpoint):
    _, _, _, ours = checkpoint
    tokens = torch.randint(0, 97, (1, 19))
    with torch.no_grad():
        full = ours(tokens)
        ours.setup_cache(32)
        pieces = [ours(tokens[:, :7], prefix_len=0)]  # prefill 7, then one token at a time
        for t in range(7, 19):
            pieces.append(ours(tokens[:, t:t + 1], prefix_len=t))
    assert rel_err(torch.cat(pieces, dim=1), full) <= 1e-5


def test_greedy_generation_matches_transformers(checkpoint):
    from nanomedusa.decoder import Decoder
    from nanomedusa.generation import generate

    _, _, ref, ours = checkpoint
    prompt = torch.randint(3, 97, (9,)).tolist()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    result = generate(Decoder(ours), prompt, max_new_tokens=24, eos_ids=[])
    assert result.tokens == expected


def test_saved_weights_are_the_hugging_face_checkpoint_again(checkpoint, tmp_path):
    # Our fused projections (wqkv, w13) split back into q/k/v_proj and gate/up_proj on saving: the saved
    # tensors are exactly the ones loaded, under their Hugging Face names.
    import shutil

    from safetensors.torch import load_file

    from nanomedusa.loading import save_hf_weights

    name, path, ref, ours = checkpoint
    save_hf_weights(ours, tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    original = {k: v for k, v in ref.state_dict().items() if not (ours.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    reloaded = load_model(tmp_path, device="cpu", dtype="float32")[0]
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), ours.state_dict().values()))

"""Tiny random Hugging Face checkpoints for tests, written with `transformers` (a test-only dependency)."""

from __future__ import annotations

import torch

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
)


def make_hf_checkpoint(path, seed=0, shard_size=None, arch="llama", **overrides):
    """Save a random tiny Llama (or Qwen2) with save_pretrained and return the HF model (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    if arch == "qwen2":
        config = transformers.Qwen2Config(**kwargs)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**kwargs)
        model = transformers.LlamaForCausalLM(config)
    # Random init leaves norms at 1 and some weights tiny; perturb everything so bugs show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    save_kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    model.save_pretrained(path, **save_kwargs)
    return model

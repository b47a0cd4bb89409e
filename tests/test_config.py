"""config.json read as transformers reads it: the defaults of a field left out, and sliding windows."""

import pytest

from nanomedusa.config import ModelConfig


BASE = dict(vocab_size=32, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)


@pytest.mark.parametrize("arch, fields, context", [
    ("MistralForCausalLM", {}, 4096),  # (MistralConfig's window when config.json names none)
    ("MistralForCausalLM", {"sliding_window": None}, 4096 * 32),
    ("MistralForCausalLM", {"sliding_window": 64, "max_position_embeddings": 1024}, 64),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, 8),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4}, 32768),
    ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 8, "max_window_layers": 1}, 32768),
    ("Qwen2ForCausalLM", {"sliding_window": 8, "layer_types": ["full_attention"] * 3 + ["sliding_attention"]}, 8),
    ("LlamaForCausalLM", {"sliding_window": 8}, 2048),
])
def test_a_sliding_window_caps_the_context_as_transformers_reads_the_config(arch, fields, context):
    # Qwen2's sliding window was ignored: its logits left transformers' from the window on (0.36 at position 8).
    # Past the window, sliding attention differs from ours, so contexts longer than it are refused instead.
    config = ModelConfig.from_hf({**BASE, "architectures": [arch], **fields})
    assert config.max_position_embeddings == context


def test_fields_left_out_take_transformers_defaults():
    # rms_norm_eps was 1e-5 where LlamaConfig, MistralConfig and Qwen2Config all say 1e-6
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert ModelConfig.from_hf({**BASE, "architectures": [arch], "sliding_window": None}).rms_norm_eps == 1e-6
    assert ModelConfig.from_hf({**BASE, "architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5}).rms_norm_eps == 1e-5

"""A fast start: a prepared checkpoint is stored in the dtype it will run in (bfloat16 on a GPU)."""

import torch
from safetensors import safe_open

from tests.test_gguf import must_not_run, use_as_default_gguf, write_tiny_gguf
from weights import default_model, gguf_to_hf


def stored_dtypes(ckpt) -> set[str]:
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def test_default_model_in_bfloat16_is_cast_from_the_float32_one(tmp_path, monkeypatch):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    use_as_default_gguf(gguf_path, monkeypatch)
    full = default_model.ensure_default_model(cache_root=tmp_path, progress=False)
    monkeypatch.setattr(default_model, "convert_gguf", must_not_run)  # no second conversion: a cast
    half = default_model.ensure_default_model(cache_root=tmp_path, progress=False, dtype=torch.bfloat16)
    assert half == tmp_path / "SmolLM2-135M-Instruct-bfloat16"
    assert stored_dtypes(full) == {"F32"} and stored_dtypes(half) == {"BF16"}
    f32, bf16 = (safe_open(str(ckpt / "model.safetensors"), "pt") for ckpt in (full, half))
    with f32, bf16:
        for name in f32.keys():
            torch.testing.assert_close(bf16.get_tensor(name), f32.get_tensor(name).to(torch.bfloat16), rtol=0, atol=0)
    assert sorted(p.name for p in half.iterdir()) == sorted(p.name for p in full.iterdir())
    assert '"torch_dtype": "bfloat16"' in (half / "config.json").read_text()


def test_default_model_in_bfloat16_without_a_float32_one_converts_straight_to_it(tmp_path, monkeypatch):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    use_as_default_gguf(gguf_path, monkeypatch)
    half = default_model.ensure_default_model(cache_root=tmp_path / "cache", progress=False, dtype=torch.bfloat16)
    assert stored_dtypes(half) == {"BF16"} and not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()


def test_converted_gguf_is_cached_per_dtype(tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    full = gguf_to_hf.convert_cached(gguf_path, cache_root=tmp_path / "cache", progress=False)
    half = gguf_to_hf.convert_cached(gguf_path, cache_root=tmp_path / "cache", progress=False, dtype=torch.bfloat16)
    assert half.name == full.name + "-bfloat16"
    assert stored_dtypes(full) == {"F32"} and stored_dtypes(half) == {"BF16"}

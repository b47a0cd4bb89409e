"""Bad input gets one clear sentence naming the fix, never a traceback from deep inside torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanomedusa.errors import NanoMedusaError
from nanomedusa.generation import generate
from nanomedusa.loading import load_model
from tests.helpers import make_hf_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def ckpt(tmp_path):
    make_hf_checkpoint(tmp_path)
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(NanoMedusaError, match="checkpoint directory .*nope does not exist; pass an existing directory"):
        load_model(tmp_path / "nope", device="cpu")


def test_missing_config(tmp_path):
    with pytest.raises(NanoMedusaError, match="no config.json at"):
        load_model(tmp_path, device="cpu")


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(NanoMedusaError, match="model.safetensors is missing; the checkpoint in .* is incomplete"):
        load_model(ckpt, device="cpu")


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(NanoMedusaError, match="is not a readable safetensors file"):
        load_model(ckpt, device="cpu")


def test_weights_that_do_not_fit_the_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanoMedusaError, match=r"tensor model.layers.0.mlp.\w+_proj.weight has shape \(\d+, \d+\) but config.json implies"):
        load_model(ckpt, device="cpu")


def test_missing_tensor(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(NanoMedusaError, match="lacks 1 tensors \\(first: model.norm.weight\\)"):
        load_model(ckpt, device="cpu")


def test_unsupported_architecture(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanoMedusaError, match="architecture 'GPT2LMHeadModel' is not supported; nanomedusa runs LlamaForCausalLM"):
        load_model(ckpt, device="cpu")


def test_unknown_dtype_and_device(ckpt):
    with pytest.raises(NanoMedusaError, match="unknown dtype 'float8'; use one of auto"):
        load_model(ckpt, device="cpu", dtype="float8")
    with pytest.raises(NanoMedusaError, match="unknown device 'tpu0'"):
        load_model(ckpt, device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(NanoMedusaError, match="this machine has no CUDA GPU; use --device cpu"):
            load_model(ckpt, device="cuda")


def test_prompt_longer_than_the_context(ckpt):
    model, _ = load_model(ckpt, device="cpu")  # max_position_embeddings = 256
    with pytest.raises(NanoMedusaError, match=r"prompt \(250 tokens\) \+ --max-new-tokens 10 = 260 exceeds the model's context of 256"):
        generate(model, list(range(3, 253)), max_new_tokens=10)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "generate.py", "--model", str(tmp_path / "missing"), "--prompt", "hi",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint directory {tmp_path / 'missing'} does not exist; "
                                                 f"pass an existing directory, a .gguf file or a hub id."]


def test_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(NanoMedusaError, match="could not download 'nobody/no-such-model' from the Hugging Face hub "
                                              "and it is not in the local cache"):
        load_model("nobody/no-such-model", device="cpu")

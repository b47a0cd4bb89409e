"""Turning logits into the next token: greedy, or sampling with temperature, top-k and top-p.

`target_probs` is the one definition of the distribution we sample from; plain sampling and
Medusa's speculative sampling both use it, which is what makes the latter lossless. Tokens are drawn
on the device by inverse CDF on a uniform (`sample_from`, from the speculative-sampling kernel, whose bonus
draw is the same), with no host sync, so that sampling steps replay inside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.speculative_sampling import sample_from


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def target_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] after temperature, top-k and top-p (sampling only)."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        drop[..., 0].fill_(False)  # whatever top_p and rounding, the likeliest token stays (fill_: no host copy)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [..., V] -> token ids [...], greedy or drawn from `target_probs` with `generator`."""
    if sampling.greedy:
        return logits.argmax(-1)
    u = torch.rand(logits.shape[:-1], generator=generator, device=logits.device)
    return sample_from(target_probs(logits, sampling), u)

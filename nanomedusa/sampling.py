"""Turning logits into the next token: greedy, or sampling with temperature, top-k and top-p.

`target_probs` is the one definition of the distribution we sample from, and `next_token` draws from it
(`kernels/sample_token.py`: the distribution in torch; the draw a Triton kernel on a GPU, the same tokens in torch
on a CPU, keeping proposals from the softmax when they lie in the nucleus: rejection sampling). Plain sampling and
Medusa's lossless sampling, which draws at every node of its tree, both draw this way, which is what makes the
latter lossless. Every draw uses uniforms drawn beforehand, and on a GPU needs no host sync, so that sampling steps
replay inside CUDA graphs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from kernels import sample_token as draw

from .errors import NanoMedusaError


# The smallest temperature above 0 (greedy): logits / temperature must stay finite in float32, and below this a
# draw is greedy's anyway (vLLM draws greedily below 1e-5 too).
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut

    def __post_init__(self):
        # (The command lines check their flags first, naming them: cli.check_sampling. This is for a library caller.)
        t, k, p = self.temperature, self.top_k, self.top_p
        typed = (all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (t, p))
                 and isinstance(k, numbers.Integral) and not isinstance(k, bool))
        if not (typed and math.isfinite(t) and (t == 0 or t >= MIN_TEMPERATURE) and k >= 0 and 0 < p <= 1):
            raise NanoMedusaError(f"{self} needs temperature 0 (greedy) or at least {MIN_TEMPERATURE}, a whole number "
                                  f"top_k >= 0 (0: off) and top_p in (0, 1] (1: off).")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def target_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] float32 after temperature, top-k and top-p (sampling only;
    `kernels/sample_token.py` defines the cuts): the law decoding draws from, which the tests check its draws
    against (decoding itself draws through `next_token`)."""
    return draw.target_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [..., V] -> token ids [...], greedy or drawn from `target_probs`' distribution with `generator`."""
    if sampling.greedy:
        return logits.argmax(-1)
    u = torch.rand((*logits.shape[:-1], draw.PROPOSALS + 1), generator=generator, device=logits.device)
    return draw.sample_token(logits, sampling.temperature, sampling.top_k, sampling.top_p, u)

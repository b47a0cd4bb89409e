"""Targets, losses and accuracy counts for the base LM and the Medusa heads.

Rows of every per-predictor tensor here: row 0 is the base lm_head (token t+1), row k+1 is Medusa
head k (token t+k+2). The training objective is

    loss = w_lm * L_lm + w_medusa * sum_k decay^k * L_k

with each L the mean cross-entropy over the *global* batch's answer tokens. Dividing summed
cross-entropies by global token counts (rather than averaging per micro-batch) makes the gradient
the same however a global batch is split into micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE


def shifted_targets(labels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """labels [B, T] -> targets [1 + K, B, T]: row j holds labels[t + j + 1] (IGNORE past the end)."""
    B, T = labels.shape
    targets = labels.new_full((num_heads + 1, B, T), IGNORE)
    for j in range(min(num_heads + 1, T - 1)):
        targets[j, :, : T - j - 1] = labels[:, j + 1:]
    return targets


def row_weights(num_heads: int, head_decay: float, lm_weight: float, medusa_weight: float) -> torch.Tensor:
    """[1 + K] loss weight of each row."""
    return torch.tensor([lm_weight] + [medusa_weight * head_decay ** k for k in range(num_heads)])


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, N, V] float32, targets [R, N] (IGNORE = none)
    -> summed cross-entropy [R] (differentiable), stats [R, 4] (ce, count, top-1 hits, top-5 hits)."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    ce = ce.view_as(targets).sum(-1)  # [R]
    with torch.no_grad():
        valid = targets != IGNORE
        # The target's rank: how many logits beat it (one pass over the vocabulary, cheaper than topk).
        target_logit = logits.gather(-1, targets.clamp(min=0)[..., None])  # [R, N, 1]
        rank = (logits > target_logit).sum(-1)  # [R, N]
        stats = torch.stack([ce.detach(), valid.sum(-1), (valid & (rank < 1)).sum(-1), (valid & (rank < 5)).sum(-1)],
                            dim=-1)
    return ce, stats.float()


def weighted_loss(ce: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_r weights[r] * ce[r] / counts[r]; ce [R] summed over a micro-batch, counts [R] over the global batch."""
    return (weights.to(ce) * ce / counts.to(ce).clamp(min=1)).sum()


def summarize(stats: torch.Tensor, weights: torch.Tensor | None = None) -> dict:
    """stats [1 + K, 4] summed over some batches -> per-predictor mean loss and accuracies (plain floats)."""
    ce, count, top1, top5 = stats.double().cpu().clamp(min=0).unbind(-1)
    denom = count.clamp(min=1)
    rows = [{"loss": (ce / denom)[r].item(), "top1": (top1 / denom)[r].item(), "top5": (top5 / denom)[r].item(),
             "tokens": int(count[r])} for r in range(stats.shape[0])]
    out = {"lm": rows[0], "heads": rows[1:]}
    if weights is not None:
        out["loss"] = float((weights.double() * ce / denom).sum())
    return out

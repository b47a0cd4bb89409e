"""The module that training runs: backbone + Medusa heads in one forward.

Everything that touches parameters happens inside `MedusaLM.forward`, which is what DDP and FSDP
need (FSDP only gathers a sharded weight, e.g. the lm_head that shared heads read, during the forward
of the module that owns it). To save memory the vocabulary projections run only where a loss is
taken: heads at positions with at least one head target, the lm_head at positions with an LM target.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..heads import MedusaHeads, path_ids
from ..model import Transformer


class MedusaLM(nn.Module):
    def __init__(self, model: Transformer, heads: MedusaHeads, train_backbone: bool):
        super().__init__()
        self.model, self.heads, self.train_backbone = model, heads, train_backbone

    def forward(self, tokens, head_mask, lm_mask=None, hidden=None):
        """tokens [B, T]; head_mask, lm_mask [B, T] bool; hidden [B, T, dim] if precomputed (frozen backbone).
        -> head logits [K, N, V] at the N head_mask positions, lm logits [M, V] at lm_mask (or None)."""
        if hidden is None:
            with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
                hidden = self.model.forward_hidden(tokens)  # [B, T, dim]
        path = None
        # Heads that read their path get the tokens t+1 .. t+K at each position t. Where head k has a target (token
        # t+k+2), the k+1 tokens it reads are the answer's own: the zero padding past the end is never under a loss.
        if self.heads.config.reads_path:
            with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
                path_tokens = path_ids(tokens, self.heads.config.num_heads)[head_mask]
                path = self.model.tok_embeddings(path_tokens)  # [N, K, dim]
        head_logits = self.heads(hidden[head_mask], self.model.lm_head.weight, path)  # [K, N, V]
        lm_logits = None if lm_mask is None else self.model.logits(hidden[lm_mask])  # [M, V]
        return head_logits, lm_logits

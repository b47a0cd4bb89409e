"""The static KV cache: one buffer, preallocated, that every layer writes its keys and values into.

    cache = KVCache(config, max_seq_len=512, batch_size=1, device="cuda", dtype=torch.bfloat16)
    cache.layer(i)               # [2, B, Hkv, S, Dh]: what attention layer i writes and reads
    cache.compact(prefix, path)  # after a Medusa step: the accepted nodes' K/V to slots prefix, prefix+1, ...

One tensor [n_layers, 2, B, Hkv, S, Dh] rather than one per layer, so that compaction moves every
layer's entries in one kernel launch. Slot s of every layer holds the token at sequence index s: the
prompt fills slots 0..P-1, each decoding step the slots after it. A Medusa step writes its T tree nodes
at slots prefix..prefix+T-1 (a tree node's slot is not its RoPE position, see model.py); `compact`
then moves the accepted ones down into sequence order and the rest are overwritten later.
"""

from __future__ import annotations

import torch

from kernels.kv_compaction import compact_kv

from .config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, max_seq_len: int, batch_size: int, device, dtype):
        shape = (config.n_layers, 2, batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        self.buffer = torch.zeros(shape, device=device, dtype=dtype)  # [L, 2, B, Hkv, S, Dh]

    @property
    def max_seq_len(self) -> int:
        return self.buffer.shape[4]

    @property
    def batch_size(self) -> int:
        return self.buffer.shape[2]

    def layer(self, i: int) -> torch.Tensor:
        return self.buffer[i]  # [2, B, Hkv, S, Dh], a view

    def compact(self, prefix: torch.Tensor, path: torch.Tensor) -> None:
        """Move the K/V of tree nodes `path` [A] (written at slots prefix + node; root first, then ascending, then
        0s, a short path's padding) to slots prefix .. prefix + A - 1. `prefix` is a 0-d device tensor: no host sync."""
        compact_kv(self.buffer, prefix, path)

"""A Llama-family transformer (Llama, Mistral, Qwen2) with a static, preallocated KV cache.

One forward serves training, prefill, plain decoding and Medusa tree verification:

    hidden = model.forward_hidden(tokens, prefix_len, positions, tree_mask)   # [B, T, dim]
    logits = model.logits(hidden)                                            # [B, T, vocab]

* Without a cache (training) it is ordinary causal self-attention over `tokens`.
* With a cache (`setup_cache`, kv_cache.py), the T new tokens' keys/values are written at cache slots
  prefix_len .. prefix_len+T-1, and each new token attends to every slot < prefix_len plus the new
  tokens that `tree_mask` [T, T] allows (None: causal, for prefill and decode; ancestors for a Medusa tree).
  RoPE uses `positions` [T], or [B, T] per row (a tree node sits at prefix_len + its depth, not at its slot).

The hidden state returned is after the final RMSNorm: the vector the lm_head (and the Medusa heads) read. Hot ops
(`rmsnorm`, `rope_and_cache`, `tree_attention`, `silu_mul`, `linear`) come from `kernels/`, which picks Triton on
CUDA. The linear layers are torch's products (`kernels.linear.torch_linear`: cuBLAS's on a GPU) unless
`kernels.set_row_invariant(True)` (`--exact`, the default on sm_90 / sm_100 GPUs: cli.py's `exact_by_default`) is
on; then they, and tree attention, run kernels whose every row comes out as a one-row call's would, so that a Medusa
tree step computes each accepted token bit for bit as plain decoding does. Those linear layers also take over
neighbouring kernels' work, each saving a launch a layer: a narrow model's blocks fold their RMSNorms into them
(`TransformerBlock.forward_fused`, two kernels fewer); a q/k/v projection whose tiles hold whole heads (a 7B's)
rotates and writes the KV cache itself (`Attention.forward`, one fewer); and a wide gate/up projection applies
SwiGLU itself (`FeedForward`, one fewer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.linear import (NormedStream, RopeAndCache, fuses_rope_and_cache, fuses_swiglu, linear,
                            linear_into_residual, linear_of_normed, linear_rope_and_cache, linear_swiglu,
                            runs_row_invariant_kernel)
from kernels.rmsnorm import rmsnorm
from kernels.rope_cache import apply_rope, rope_and_cache
from kernels.swiglu import silu_mul
from kernels.tree_attention import tree_attention

from .config import ModelConfig, rope_inv_freq
from .errors import NanoMedusaError
from .kv_cache import KVCache


# The RMSNorms fold into the linear layers (TransformerBlock.forward_fused) up to this hidden size. On an H200 (graphed
# steps, prefix 1024, bench/RESULTS.md) it made a SmolLM2-135M-shaped model's (dim 576) decode step 3-5% and its
# 64-node tree step 5% faster, where launches are most of a step, but a 7B's and a Llama-3 8B's (dim 4096) 1-2%
# slower: their epilogues' extra reads and writes cost more than the kernels they save. Untested in between.
FOLD_NORMS_MAX_DIM = 1024


class Linear(nn.Linear):
    """nn.Linear through `kernels.linear`: torch's product, or with row invariance on its Triton kernel
    (kernels/linear.py).

    With the RMSNorms folded in (`TransformerBlock.forward_fused`) it also takes a NormedStream as input (the
    norm's 1 / rms applied in its kernel), and `add_to`: the residual stream [..., out_features] its output is
    added to; it then returns the new stream, or with `then_norm` that RMSNorm's NormedStream of it, the next
    layer's input. Where the tiles allow, the q/k/v projection takes `rope` (it rotates q and k and writes the KV
    cache itself) and the gate/up projection `swiglu` (it returns silu(gate) * up)."""

    def forward(self, x, add_to=None, then_norm=None, rope=None, swiglu=False):
        if rope is not None:  # the fused q/k/v projection, rotating and caching in its epilogue
            return linear_rope_and_cache(x, self.weight, self.bias, rope)
        if swiglu:  # the fused gate/up projection, applying SwiGLU in its epilogue
            return linear_swiglu(x, self.weight, self.bias)
        if isinstance(x, NormedStream):
            return linear_of_normed(x, self.weight, self.bias)
        if add_to is not None:
            return linear_into_residual(x, self.weight, self.bias, add_to, *(
                (then_norm.weight, then_norm.eps) if then_norm is not None else ()))
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        return rmsnorm(x, self.weight, self.eps, residual)


def fused_row_blocks(config: ModelConfig) -> dict[str, list[int]]:
    """The row blocks of each block's fused projections, in order: wqkv = q, k, v and w13 = gate, up."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return {"attention.wqkv": [q, kv, kv], "feed_forward.w13": [config.intermediate_size] * 2}


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # q, k and v come from one fused projection (rows: q, then k, then v): one matrix product per
        # layer instead of three, which is what a batch-1 decode step pays for. loading.py fills the
        # row blocks from Hugging Face's q_proj, k_proj and v_proj.
        self.qkv_sizes = fused_row_blocks(config)["attention.wqkv"]
        self.wqkv = Linear(config.dim, sum(self.qkv_sizes), bias=config.attention_bias)
        self.wo = Linear(self.n_heads * self.head_dim, config.dim, bias=config.output_bias)

    def forward(self, x, cos, sin, kv_cache=None, prefix_len=None, tree_mask=None, key_valid=None, add_to=None,
                then_norm=None):
        """x [B, T, dim] (or a NormedStream); cos, sin [T, Dh] or [B, T, Dh] float32 RoPE tables for the tokens'
        positions; kv_cache: this layer's [2, B, Hkv, S, Dh] (KVCache.layer), or None for training; add_to,
        then_norm: what the output projection adds its output to and normalises for (`Linear`)."""
        if kv_cache is None:  # training: causal attention over the T tokens, with autograd
            q, k, v = self._heads(self.wqkv(x))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
            y = y.transpose(1, 2)  # [B, T, Hq, Dh]
        else:  # rotate q and k, write k and v into cache slots prefix_len .. prefix_len+T-1, attend
            # (a training run's LoRA wrapper around wqkv computes its own product: never fused)
            if isinstance(self.wqkv, Linear) and fuses_rope_and_cache(x, self.wqkv.weight, self.wqkv.bias,
                                                                      self.head_dim):
                # in the projection's own kernel: no (q, k, v) tensor and no RoPE kernel
                q = self.wqkv(x, rope=RopeAndCache(cos, sin, kv_cache, prefix_len, self.n_heads))  # [B, Hq, T, Dh]
            else:  # one kernel after the projection
                q = rope_and_cache(*self._heads(self.wqkv(x)), cos, sin, kv_cache, prefix_len)  # [B, Hq, T, Dh]
            y = tree_attention(q, kv_cache[0], kv_cache[1], prefix_len, tree_mask, key_valid)
        y = y.flatten(2)  # [B, T, Hq, Dh] -> [B, T, Hq * Dh]: a view for the kernel's output
        return self.wo(y) if add_to is None else self.wo(y, add_to, then_norm)  # (a training LoRA layer takes y only)

    def _heads(self, qkv):
        """The fused projection's output [B, T, (Hq + 2 Hkv) Dh] -> its views q [B, T, Hq, Dh], k, v [B, T, Hkv, Dh]."""
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        B, T, _ = qkv.shape
        return (q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim),
                v.view(B, T, self.n_kv_heads, self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(gate x) * up x), with gate and up fused into one projection `w13` (rows: gate, then up)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)  # gate_proj; up_proj
        self.w2 = Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)  # down_proj

    def forward(self, x, add_to=None, then_norm=None):
        # (a training run's LoRA wrapper around w13 computes its own product: never fused)
        if isinstance(self.w13, Linear) and fuses_swiglu(x, self.w13.weight, self.w13.bias):
            y = self.w13(x, swiglu=True)  # silu(gate) * up [B, T, I] in the projection's own kernel
        else:
            y = silu_mul(self.w13(x))  # [B, T, 2 I] -> silu(gate) * up [B, T, I]
        return self.w2(y) if add_to is None else self.w2(y, add_to, then_norm)  # [B, T, dim]; see `Linear`


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, residual, cos, sin, kv_cache, prefix_len, tree_mask, key_valid):
        # Pre-norm residual stream, with each residual add fused into the following RMSNorm:
        # `x` is the last sublayer's output, `residual` the stream before it (None at layer 0).
        if residual is None:
            h, residual = self.attention_norm(x), x
        else:
            h, residual = self.attention_norm(x, residual)
        x = self.attention(h, cos, sin, kv_cache, prefix_len, tree_mask, key_valid)
        h, residual = self.ffn_norm(x, residual)
        return self.feed_forward(h), residual

    def forward_fused(self, x, cos, sin, kv_cache, prefix_len, tree_mask, key_valid, next_norm):
        """`forward` with its RMSNorms folded into the linear layers around them (kernels/linear.py, row-invariant
        Triton kernels only): the output projections add their outputs to the residual stream and make the next
        norm's stream (NormedStream: g * h and h's sums of squares), whose 1 / rms the next linear layer applies.
        x: the previous block's NormedStream, or at layer 0 the embeddings; next_norm: the next block's
        attention_norm (None for the last block, which returns the residual stream itself, for the final norm)."""
        if isinstance(x, NormedStream):
            normed, residual = x, x.residual
        else:  # layer 0: the embeddings, whose norm still runs on its own
            normed, residual = self.attention_norm(x), x
        stream = self.attention(normed, cos, sin, kv_cache, prefix_len, tree_mask, key_valid, residual, self.ffn_norm)
        return self.feed_forward(stream, stream.residual, next_norm)  # a NormedStream, or the stream [B, T, dim]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Left uninitialised (`_weight`): every caller loads or sets the weights. Its random init would be the
        # one op (normal_) whose first call on the meta device, where loading builds the model, imports
        # torch._dynamo: seconds of start-up.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim,
                                           _weight=torch.empty(config.vocab_size, config.dim))
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # None for training (plain causal attention); set with setup_cache for decoding. Reassigning it
        # (None included) is all it takes to switch.
        self.kv_cache: KVCache | None = None
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)  # [positions, Dh]
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    @property
    def device(self):
        return self.tok_embeddings.weight.device

    @property
    def dtype(self):
        return self.tok_embeddings.weight.dtype

    @property
    def max_seq_len(self) -> int:
        return 0 if self.kv_cache is None else self.kv_cache.max_seq_len

    def setup_cache(self, max_seq_len: int, batch_size: int = 1) -> None:
        """Preallocate the KV cache for `max_seq_len` slots (reused, not reallocated, if it fits: CUDA graphs
        captured on it read it at its address, see decoder.py) and the RoPE tables for as many positions."""
        if max_seq_len > self.config.max_position_embeddings:
            raise NanoMedusaError(
                f"a cache of {max_seq_len} tokens exceeds the model's context of "
                f"{self.config.max_position_embeddings}; shorten the prompt or lower --max-new-tokens."
            )
        cache = self.kv_cache
        fits = (cache is not None and cache.batch_size == batch_size and cache.max_seq_len >= max_seq_len
                and cache.buffer.device == self.device and cache.buffer.dtype == self.dtype)
        if not fits:
            self.kv_cache = KVCache(self.config, max_seq_len, batch_size, self.device, self.dtype)
        self._ensure_rope(max_seq_len)

    def _ensure_rope(self, length: int) -> None:
        if self.rope_cos.shape[0] >= length and self.rope_cos.device == self.device:
            return
        inv_freq = rope_inv_freq(self.config).to(self.device)  # [Dh/2]
        angles = torch.outer(torch.arange(length, device=self.device, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # [length, Dh]
        self.rope_cos, self.rope_sin = angles.cos(), angles.sin()

    def forward_hidden(self, tokens, prefix_len=0, positions=None, tree_mask=None, key_valid=None):
        """tokens [B, T] -> final-normed hidden states [B, T, dim] (see module docstring).

        positions: [T], or [B, T] when rows differ; key_valid: optional [B, S] bool, False for cache
        slots a row must not see (the left padding of a batch of unequal prompts)."""
        T = tokens.shape[1]
        if positions is None:
            positions = prefix_len + torch.arange(T, device=tokens.device)  # [T]
        if self.kv_cache is None:
            self._ensure_rope(T)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # float32 [T, Dh] or [B, T, Dh]
        x, residual = self.tok_embeddings(tokens), None  # [B, T, dim]
        if self._folds_norms(x):  # row-invariant kernels: no RMSNorm kernels but the first and the last
            for i, block in enumerate(self.layers):
                kv = None if self.kv_cache is None else self.kv_cache.layer(i)
                next_norm = self.layers[i + 1].attention_norm if i + 1 < len(self.layers) else None
                x = block.forward_fused(x, cos, sin, kv, prefix_len, tree_mask, key_valid, next_norm)
            return self.norm(x)
        for i, block in enumerate(self.layers):
            kv = None if self.kv_cache is None else self.kv_cache.layer(i)
            x, residual = block(x, residual, cos, sin, kv, prefix_len, tree_mask, key_valid)
        return self.norm(x, residual)[0]

    def _folds_norms(self, x) -> bool:
        """Whether the blocks run `forward_fused`: a model narrow enough (FOLD_NORMS_MAX_DIM) whose linear layers
        are ours (a training run's LoRA wrappers compute their own products) and row-invariant Triton kernels, with
        no gradient wanted. The same for every inference call of a model: prefill, decode and tree steps fold alike.
        (Training never folds; forward_fused, called directly, would also bypass the blocks' FSDP hooks.)"""
        return (self.config.dim <= FOLD_NORMS_MAX_DIM and isinstance(self.layers[0].attention.wqkv, Linear)
                and runs_row_invariant_kernel(x, self.layers.parameters()))

    def logits(self, hidden):
        """hidden [B, T, dim] -> float32 logits [B, T, vocab]."""
        return self.lm_head(hidden).float()

    def forward(self, tokens, prefix_len=0, positions=None, tree_mask=None, key_valid=None):
        return self.logits(self.forward_hidden(tokens, prefix_len, positions, tree_mask, key_valid))

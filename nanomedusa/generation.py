"""Plain autoregressive decoding: prefill the prompt, then one token per forward pass.

    result = generate(Decoder(model), prompt_ids, max_new_tokens=256, sampling=Sampling(), eos_ids=[2],
                      on_tokens=print_new_text)

`on_tokens` is called with each step's new token ids (streaming). The Medusa loop
(`medusa_generation.py`) returns the same `GenerationResult`, so the two are reported and compared alike.
`generate_batch` decodes many prompts at once, for self-distillation (training/distill.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cuda_graphs import GraphedStep
from .decoder import Decoder, check_eos_ids, check_fits, check_prompt
from .errors import NanoMedusaError
from .pending_read import PendingRead
from .sampling import Sampling, next_token


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0  # wall time, prefill included
    prefill_seconds: float = 0.0  # until the first token reached the host
    steps: int = 0  # forward passes after the prefill whose tokens were kept (the prefill's token is step 0's)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """The decoding steps alone: the tokens after the prefill's, over the time after the prefill."""
        decode_seconds = self.seconds - self.prefill_seconds
        return (len(self.tokens) - 1) / decode_seconds if decode_seconds > 0 and self.tokens else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens gained per decoding forward pass after the prefill (1.0 for plain decoding)."""
        return (len(self.tokens) - 1) / self.steps if self.steps else 1.0


@torch.inference_mode()
def generate(decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_ids: list[int] = (), on_tokens: Callable[[list[int]], None] | None = None,
             generator: torch.Generator | None = None, cached_len: int = 0) -> GenerationResult:
    """Decode up to max_new_tokens after prompt_ids. `cached_len` > 0 continues from a KV cache that already
    holds prompt_ids[:cached_len] (a chat's earlier turns): only the rest is prefilled."""
    model, device = decoder.model, decoder.device
    check_prompt(model, prompt_ids)
    check_eos_ids(eos_ids)
    decoder.size_cache(len(prompt_ids), max_new_tokens, cached_len=cached_len)
    pos = torch.tensor(len(prompt_ids), device=device)  # 0-d: the next free cache slot, kept on the device
    rng = decoder.random_generator(sampling, generator)

    def decode(tok, prefix):  # [1, 1] -> the next token []: drawn on the device, so the step needs no host sync
        return next_token(model(tok, prefix_len=prefix)[0, -1], sampling, rng)

    decode_step = decoder.graphed(("decode", sampling), decode, torch.zeros(1, 1, dtype=torch.long, device=device),
                                  pos, generator=rng)
    result = GenerationResult()
    decoder.sync()
    start = time.perf_counter()
    # Only the last position's logits are needed: the lm_head over every prompt position costs P x V.
    logits = model.logits(decoder.prefill(prompt_ids, start=cached_len))[0]  # [V]
    token = next_token(logits, sampling, rng)  # [] on the device
    # Token i is read one step behind (pending_read.py): step i, which feeds it back, is queued first (when a token
    # after it is wanted), so the device decodes token i + 1 while the host reads and streams token i. Only a step
    # queued for a token that turns out to be eos is wasted (it writes that token's own cache slot).
    while len(result.tokens) < max_new_tokens:  # 0 tokens asked for: none emitted
        read = PendingRead(token)
        if len(result.tokens) + 1 < max_new_tokens:  # a token after this one is wanted, unless this one is eos
            token = decode_step(token.view(1, 1), pos)
            pos += 1
        tok = read.tolist()
        result.tokens.append(tok)
        if len(result.tokens) == 1:
            result.prefill_seconds = read.ready_at - start
        if on_tokens:
            on_tokens([tok])
        if tok in eos_ids:
            break
    result.steps = max(len(result.tokens) - 1, 0)  # the decode steps whose tokens were kept
    decoder.sync()  # a step queued before an eos was read, counted: the next run would wait for it
    result.seconds = time.perf_counter() - start
    return result


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                   eos_ids: list[int] = (), generator: torch.Generator | None = None,
                   cuda_graphs: bool = True) -> list[list[int]]:
    """Plain decoding of several prompts at once (for self-distillation, where throughput matters).

    Prompts are left-padded to one length; `key_valid` hides the padding from attention and each row's
    positions start at 0 at its first real token, so every row computes what it would alone (up to
    floating-point reordering). Rows that hit eos stop growing; the batch ends when all have.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise NanoMedusaError(f"generate_batch takes a non-empty list of prompts (lists of token ids), not "
                              f"{prompts!r}.")
    for prompt in prompts:
        check_prompt(model, prompt)
    check_eos_ids(eos_ids)
    # Each prompt fitted on its own, not only the longest: an empty one would decode from padding.
    slots = max(check_fits(model, len(p), max_new_tokens) for p in prompts)
    device, B = model.device, len(prompts)
    longest = max(len(p) for p in prompts)
    model.setup_cache(slots, batch_size=B)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)  # [B]
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)  # [B, P]
    key_valid = torch.arange(model.max_seq_len, device=device)[None, :] >= pad[:, None]  # [B, S] (S >= slots)
    positions = (torch.arange(longest, device=device)[None, :] - pad[:, None]).clamp(min=0)  # [B, P]
    # Only the last position's logits are needed (left padding puts every row's last token there); the
    # lm_head over all B x P positions would be tens of GB of float32 at batch 128, 1000 tokens, 49k vocab.
    hidden = model.forward_hidden(tokens, prefix_len=0, positions=positions, key_valid=key_valid)  # [B, P, dim]
    logits = model.logits(hidden[:, -1:])[:, -1]  # [B, V]
    pos = torch.tensor(longest, device=device)

    def step(tok, prefix):  # [B, 1] -> [B, V]
        return model(tok, prefix_len=prefix, positions=(prefix - pad)[:, None], key_valid=key_valid)[:, -1]

    decode_step = GraphedStep(step, torch.zeros(B, 1, dtype=torch.long, device=device), pos, enabled=cuda_graphs)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    for _ in range(max_new_tokens):
        token = next_token(logits, sampling, generator)  # [B]
        out = torch.cat([out, token[:, None]], dim=1)
        finished |= torch.isin(token, eos)
        if finished.all():
            break
        logits = decode_step(token[:, None], pos)
        pos += 1
    results = []
    for row in out.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:cut])
    return results

"""Plain autoregressive decoding at batch 1: prefill the prompt, then one token per forward pass.

    result = generate(model, prompt_ids, max_new_tokens=256, sampling=Sampling(), eos_ids=[2],
                      on_tokens=print_new_text)

`on_tokens` is called with each step's new token ids (streaming). The Medusa loop
(`medusa_generation.py`) returns the same `GenerationResult`, so the two are reported and compared alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cuda_graphs import GraphedStep
from .errors import NanoMedusaError
from .sampling import Sampling, next_token


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0  # wall time, prefill included
    prefill_seconds: float = 0.0
    steps: int = 0  # forward passes after the prefill (the prefill's token counts as step 0's)

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


def check_fits(model, prompt_len: int, max_new_tokens: int, extra: int = 0) -> int:
    """Cache slots needed for a run; a clear error if they exceed the model's context."""
    if prompt_len == 0:
        raise NanoMedusaError("the prompt is empty; pass some text with --prompt.")
    context = model.config.max_position_embeddings
    needed = prompt_len + max_new_tokens + extra
    if needed > context:
        what = f"prompt ({prompt_len} tokens) + --max-new-tokens {max_new_tokens}"
        what += f" + tree ({extra} nodes)" if extra else ""
        raise NanoMedusaError(f"{what} = {needed} exceeds the model's context of {context} tokens; "
                              f"shorten the prompt or lower --max-new-tokens.")
    return needed


# On a GPU (with CUDA graphs) prompts are padded to a multiple of PREFILL_BUCKET tokens and prefilled by
# replaying a graph kept per padded length, and the KV cache is sized in steps of CACHE_BUCKET slots so
# that requests of similar length share one cache and the graphs captured on it.
PREFILL_BUCKET = 64
CACHE_BUCKET = 256


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _graphed(model, cuda_graphs: bool) -> bool:
    """Whether runs replay CUDA graphs: then prefills pad to PREFILL_BUCKET (and the cache is sized for them)."""
    return cuda_graphs and model.device.type == "cuda"


def prepare_cache(model, prompt_len: int, max_new_tokens: int, extra: int = 0, cuda_graphs: bool = True,
                  cached_len: int = 0) -> None:
    """Allocate (or reuse) the KV cache for one run (`check_fits` slots, `extra` for a Medusa tree).

    With `cached_len` > 0 the cache already holds the prompt's first cached_len tokens (a conversation
    continued, see chat.py): it is kept as it is, and must be large enough."""
    needed = check_fits(model, prompt_len, max_new_tokens, extra)
    if cached_len:
        if not 0 < cached_len < prompt_len:
            raise NanoMedusaError(f"cached_len {cached_len} must leave 1 to {prompt_len - 1} of the "
                                  f"{prompt_len} prompt tokens to prefill.")
        if model.max_seq_len < needed:  # reallocating would lose the cached tokens
            raise NanoMedusaError(f"the KV cache has {model.max_seq_len} slots but continuing needs {needed}; "
                                  f"size it for the whole conversation with model.setup_cache first.")
        return
    if _graphed(model, cuda_graphs):  # room for the padded prompt, in CACHE_BUCKET steps
        needed = max(needed, _round_up(prompt_len, PREFILL_BUCKET))
        needed = min(_round_up(needed, CACHE_BUCKET), model.config.max_position_embeddings)
    model.setup_cache(needed)


def graphed(model, key, fn: Callable, *example_inputs: torch.Tensor, cuda_graphs: bool = True,
            generator: torch.Generator | None = None) -> GraphedStep:
    """`fn` as a CUDA graph kept on the model under `key` (`model.graphs`), captured the first time the key
    comes up, so that later runs on the same cache (a chat's turns, a benchmark's prompts) replay it
    instead of capturing again. `key` must name everything `fn` depends on besides the model and its cache,
    and `generator` what it draws random numbers from (`run_generator`).
    Off a GPU, or with `cuda_graphs` False, `fn` is simply called."""
    if not _graphed(model, cuda_graphs):
        return GraphedStep(fn, *example_inputs, enabled=False)
    if key not in model.graphs:
        model.graphs[key] = GraphedStep(fn, *example_inputs, generator=generator)
    return model.graphs[key]


_generators: dict[torch.device, torch.Generator] = {}


def run_generator(device: torch.device, sampling: Sampling, generator: torch.Generator | None):
    """What a sampling run draws from: one generator per device, the one the sampling steps' CUDA graphs
    are registered with (a graph replays its draws from that generator's state), seeded for this run from
    `generator` (torch's default generator when None), so that a seeded run is reproducible, graphed or
    not. None for greedy decoding, which draws nothing."""
    if sampling.greedy:
        return None
    seed = torch.randint(2**62, (), generator=generator, device=generator.device if generator is not None else "cpu")
    if device not in _generators:
        _generators[device] = torch.Generator(device)
    return _generators[device].manual_seed(int(seed))


def prefill(model, prompt_ids: list[int], cuda_graphs: bool = True, start: int = 0) -> torch.Tensor:
    """Run prompt_ids[start:] through the model at positions start.., filling cache slots start .. P-1
    (slots before `start` already hold the prompt's first tokens); returns the last position's final
    hidden state [1, dim].

    Eager, a prefill is a few hundred kernel launches from Python: 28 ms for a 71-token prompt of the
    135M default model on an H100, against 1 ms replayed as a CUDA graph. So on a GPU the prompt is
    padded to a multiple of PREFILL_BUCKET and prefilled by a graph kept on the model per padded length
    (captured the first time a length comes up). The padding sits after the prompt, where causal
    attention keeps it out of the prompt's hidden states, and the cache slots it writes lie past the
    prompt, overwritten by decoding before anything reads them. `start` is an input of the graph, so a
    continued conversation's new tokens replay the same graphs as a fresh prompt of their length.
    """
    device, new = model.device, prompt_ids[start:]
    padded = _round_up(len(new), PREFILL_BUCKET)
    if not _graphed(model, cuda_graphs) or start + padded > model.max_seq_len:
        return model.forward_hidden(torch.tensor([new], device=device), prefix_len=start)[0, -1:]

    def run(tokens, prefix, last):  # tokens [1, padded], prefix and last 0-d -> hidden [1, dim]
        return model.forward_hidden(tokens, prefix_len=prefix)[0].index_select(0, last.view(1))

    # Capturing runs the step on these inputs first: `start` keeps those runs' writes on slots this prefill fills.
    prefix = torch.tensor(start, device=device)
    step = graphed(model, ("prefill", padded), run, torch.zeros(1, padded, dtype=torch.long, device=device),
                   prefix, torch.tensor(0, device=device))
    tokens = torch.tensor([new + [0] * (padded - len(new))], device=device)  # [1, padded]
    return step(tokens, prefix, torch.tensor(len(new) - 1, device=device))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_ids: list[int] = (), on_tokens: Callable[[list[int]], None] | None = None,
             generator: torch.Generator | None = None, cuda_graphs: bool = True,
             cached_len: int = 0) -> GenerationResult:
    """Decode up to max_new_tokens after prompt_ids. `cached_len` > 0 continues from a KV cache that already
    holds prompt_ids[:cached_len] (a chat's earlier turns): only the rest is prefilled."""
    device = model.device
    prepare_cache(model, len(prompt_ids), max_new_tokens, cuda_graphs=cuda_graphs, cached_len=cached_len)
    pos = torch.tensor(len(prompt_ids), device=device)  # 0-d: the next free cache slot, kept on the device
    rng = run_generator(device, sampling, generator)

    def decode(tok, prefix):  # [1, 1] -> the next token []: drawn on the device, so the step needs no host sync
        return next_token(model(tok, prefix_len=prefix)[0, -1], sampling, rng)

    decode_step = graphed(model, ("decode", sampling), decode, torch.zeros(1, 1, dtype=torch.long, device=device),
                          pos, cuda_graphs=cuda_graphs, generator=rng)
    result = GenerationResult()
    _sync(device)
    start = time.perf_counter()
    # Only the last position's logits are needed: the lm_head over every prompt position costs P x V.
    logits = model.lm_head(prefill(model, prompt_ids, cuda_graphs, start=cached_len))[0]  # [V]
    token = next_token(logits, sampling, rng)
    result.prefill_seconds = time.perf_counter() - start
    while max_new_tokens > 0:  # 0 tokens asked for: none emitted
        tok = token.item()
        result.tokens.append(tok)
        if on_tokens:
            on_tokens([tok])
        if len(result.tokens) >= max_new_tokens or tok in eos_ids:
            break
        token = decode_step(token.view(1, 1), pos)
        pos += 1
        result.steps += 1
    _sync(device)
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
    device, B = model.device, len(prompts)
    longest = max(len(p) for p in prompts)
    slots = check_fits(model, longest, max_new_tokens)
    model.setup_cache(slots, batch_size=B)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)  # [B]
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)  # [B, P]
    key_valid = torch.arange(model.max_seq_len, device=device)[None, :] >= pad[:, None]  # [B, S] (S >= slots)
    positions = (torch.arange(longest, device=device)[None, :] - pad[:, None]).clamp(min=0)  # [B, P]
    # Only the last position's logits are needed (left padding puts every row's last token there); the
    # lm_head over all B x P positions would be tens of GB of float32 at batch 128, 1000 tokens, 49k vocab.
    hidden = model.forward_hidden(tokens, prefix_len=0, positions=positions, key_valid=key_valid)  # [B, P, dim]
    logits = model.lm_head(hidden[:, -1:])[:, -1]  # [B, V]
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

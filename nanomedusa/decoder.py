"""What decoding keeps between runs of one model at batch 1: the cache's sizing, the prefill, and the
CUDA graphs captured on the cache.

    decoder = Decoder(model)                     # graphs on a GPU; Decoder(model, cuda_graphs=False): eager calls
    result = generate(decoder, prompt_ids, 256)  # generation.py; medusa_generation.py takes it too

Every graph of a generate.py run is captured here (only distillation's `generate_batch` makes its own), in
`Decoder.graphed`, the first time its key comes up, and replayed by later runs that share the cache: a chat's
turns (chat.py), a benchmark's prompts. A graph reads and writes the KV cache and the RoPE tables at the addresses
they had at capture, so when the model's cache is replaced (a longer run, a batch) the decoder drops its graphs and
captures again.

Why graphs at all, see cuda_graphs.py. Prefills are graphed too: eager, a prefill is a few hundred
kernel launches from Python, far slower than its replay; so on a GPU a prompt is padded to a multiple
of PREFILL_BUCKET tokens and prefilled by a graph kept per padded length. The padding sits after the
prompt, where causal attention keeps it out of the prompt's hidden states, and the cache slots it
writes lie past the prompt, overwritten by decoding before anything reads them. The cache is sized
in steps of CACHE_BUCKET slots, so that runs of similar length share one cache and its graphs.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Callable

import torch

import kernels

from .cuda_graphs import GraphedStep
from .errors import NanoMedusaError
from .sampling import Sampling

PREFILL_BUCKET = 64
CACHE_BUCKET = 256


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_prompt(model, prompt_ids) -> None:
    """A run's prompt is a list of token ids of the model's vocabulary: an id outside it would index past the
    embedding (an IndexError on a CPU, a device-side assert on a GPU)."""
    if not isinstance(prompt_ids, (list, tuple)):
        raise NanoMedusaError(f"the prompt must be a list of token ids, not a {type(prompt_ids).__name__}; pass "
                              f"tokenizer.encode(text) (or a tensor's .tolist()).")
    vocab = model.config.vocab_size
    bad = next((i for i in prompt_ids if not isinstance(i, numbers.Integral) or not 0 <= i < vocab), None)
    if bad is not None:
        raise NanoMedusaError(f"the prompt holds {bad!r}, not a token id of the model's vocabulary (0 to {vocab - 1}); "
                              f"encode the prompt with this model's tokenizer.")


def check_eos_ids(eos_ids) -> None:
    """The ids a run stops at: a collection of token ids (a list, tuple or set), possibly empty. (Not a generator:
    the runs test `token in eos_ids`, which would consume it.)"""
    if not isinstance(eos_ids, Collection) or isinstance(eos_ids, (str, bytes)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in eos_ids):
        raise NanoMedusaError(f"eos_ids must be a list of token ids, not {eos_ids!r}; pass e.g. "
                              f"tokenizer.eos_ids, or [id] for one id.")


def check_fits(model, prompt_len: int, max_new_tokens: int, extra: int = 0) -> int:
    """Cache slots needed for a run; a clear error if they exceed the model's context."""
    if prompt_len == 0:
        raise NanoMedusaError("the prompt is empty; pass some text with --prompt.")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise NanoMedusaError(f"max_new_tokens must be a whole number of at least 0, not {max_new_tokens!r}; pass 0 "
                              f"or more.")
    context = model.config.max_position_embeddings
    needed = prompt_len + max_new_tokens + extra
    if needed > context:
        what = f"prompt ({prompt_len} tokens) + --max-new-tokens {max_new_tokens}"
        what += f" + tree ({extra} nodes)" if extra else ""
        fix = "shorten the prompt" + (", lower --max-new-tokens or use a smaller tree" if extra else
                                      " or lower --max-new-tokens")
        raise NanoMedusaError(f"{what} = {needed} exceeds the model's context of {context} tokens; {fix}.")
    return needed


def sync(device: torch.device) -> None:
    """Wait for the device, before reading a host clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decoder:
    """A model's decoding state kept between runs (see the module docstring): cache sizing, prefill, graphs."""

    def __init__(self, model, cuda_graphs: bool = True):
        self.model = model
        self.uses_graphs = cuda_graphs and model.device.type == "cuda"
        self.graphs: dict = {}  # key -> GraphedStep, see `graphed`
        self._graphs_read: tuple = (None, None)  # the cache and RoPE table the graphs were captured on
        # name -> the memory pool the graphs captured under that name share (cuda_graphs.py), retired with them
        self._pools: dict[str, tuple] = {}
        self._rng: torch.Generator | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def sync(self) -> None:
        sync(self.device)

    def size_cache(self, prompt_len: int, max_new_tokens: int, extra: int = 0, cached_len: int = 0) -> None:
        """Size (or reuse) the cache for one run: `check_fits` slots, `extra` of them for a Medusa tree.

        With `cached_len` > 0 the cache already holds the prompt's first cached_len tokens (a conversation
        continued, see chat.py): it is kept as it is, and must be large enough."""
        needed = check_fits(self.model, prompt_len, max_new_tokens, extra)
        if cached_len:
            if not 0 < cached_len < prompt_len:
                raise NanoMedusaError(f"cached_len {cached_len} must leave 1 to {prompt_len - 1} of the "
                                      f"{prompt_len} prompt tokens to prefill.")
            if self.model.max_seq_len < needed:  # reallocating would lose the cached tokens
                raise NanoMedusaError(f"the KV cache has {self.model.max_seq_len} slots but continuing needs "
                                      f"{needed}; size it for the whole conversation with model.setup_cache first.")
            return
        if self.uses_graphs:  # room for the padded prompt, in CACHE_BUCKET steps so similar runs share a cache
            needed = round_up(max(needed, round_up(prompt_len, PREFILL_BUCKET)), CACHE_BUCKET)
        self.model.setup_cache(min(needed, self.model.config.max_position_embeddings))

    def graphed(self, key, fn: Callable, *example_inputs: torch.Tensor, generator: torch.Generator | None = None,
                pool: str | None = None):
        """`fn` as a CUDA graph kept under `key`, captured the first time the key comes up (eager off a GPU).

        `key` must name everything `fn` depends on besides the model, its cache and the kernel settings (added
        here: a graph replays the kernels it was captured with), `generator` what it draws random numbers
        from (`random_generator`): the graph replays its draws from it, and `pool` names the memory pool it
        shares with the other graphs of that name (`GraphedStep`; None: a pool of its own)."""
        if not self.uses_graphs:
            return GraphedStep(fn, *example_inputs, enabled=False)
        key = (key, kernels.get_backend(), kernels.row_invariant(), kernels.dependent_launch_enabled())
        read = (self.model.kv_cache, self.model.rope_cos)
        if any(a is not b for a, b in zip(read, self._graphs_read)):
            self.graphs.clear()  # captured on a cache or RoPE table that has since been replaced
            # and their pools with them: a pool whose graphs are gone must not take new ones while a tensor it
            # returned lives on (torch's allocator stops on an internal assert)
            self._pools.clear()
            self._graphs_read = read
        if key not in self.graphs:
            if pool is not None and pool not in self._pools:
                self._pools[pool] = torch.cuda.graph_pool_handle()
            self.graphs[key] = GraphedStep(fn, *example_inputs, generator=generator, pool=self._pools.get(pool))
        return self.graphs[key]

    def random_generator(self, sampling: Sampling, seed_from: torch.Generator | None) -> torch.Generator | None:
        """What a sampling run draws from: the decoder's one generator, which its sampling graphs are
        registered with, seeded for this run from `seed_from` (torch's default generator when None), so
        that a seeded run is reproducible, graphed or not. None for greedy decoding, which draws nothing."""
        if sampling.greedy:
            return None
        device = seed_from.device if seed_from is not None else "cpu"
        seed = torch.randint(2**62, (), generator=seed_from, device=device)
        if self._rng is None:
            self._rng = torch.Generator(self.device)
        return self._rng.manual_seed(int(seed))

    def prefill(self, prompt_ids: list[int], start: int = 0) -> torch.Tensor:
        """Run prompt_ids[start:] through the model at positions start.., filling cache slots start .. P-1
        (slots before `start` already hold the prompt's first tokens); returns the last position's final
        hidden state [1, dim], which the next prefill overwrites (on a GPU: copy it to keep it). `start` is an
        input of the graph, so a continued conversation's new tokens replay the same graphs as a fresh prompt of
        their length."""
        model, new = self.model, prompt_ids[start:]
        padded = round_up(len(new), PREFILL_BUCKET)
        if not self.uses_graphs or start + padded > model.max_seq_len:
            return model.forward_hidden(torch.tensor([new], device=self.device), prefix_len=start)[0, -1:]

        def run(tokens, prefix, last):  # tokens [1, padded], prefix and last 0-d -> hidden [1, dim]
            return model.forward_hidden(tokens, prefix_len=prefix)[0].index_select(0, last.view(1))

        # Capturing runs the step on these inputs first: `start` keeps those runs' writes on slots this prefill fills.
        prefix = torch.tensor(start, device=self.device)
        # One pool for every prefill length (a chat or a benchmark meets many, a graph each, and a 7B's prefill
        # works in some 150 MB per 1,000 tokens): the hidden state returned is read, by the step or the logits
        # after it, before another prefill replays.
        step = self.graphed(("prefill", padded), run, torch.zeros(1, padded, dtype=torch.long, device=self.device),
                            prefix, torch.tensor(0, device=self.device), pool="prefill")
        tokens = torch.tensor([new + [0] * (padded - len(new))], device=self.device)  # [1, padded]
        return step(tokens, prefix, torch.tensor(len(new) - 1, device=self.device))

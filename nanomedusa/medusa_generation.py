"""Medusa decoding at batch 1: guess a tree of future tokens, verify it in one forward, keep the best run.

A step starts with `tree_tokens` [T]: the root (the base model's next token, not yet in the cache) and
the heads' guesses after it, laid out on the tree. It reads as four verbs, each a function below:

  1. verify:   one forward over the T nodes: node j is written to cache slot prefix+j, sits at RoPE
               position prefix + depth(j), and attends to the prefix and its own ancestors (tree attention)
  2. accept:   the path accepted furthest, the likeliest among equals (kernels.acceptance): greedy and
               typical test each guess under its parent's logits; lossless sampling draws a token from every
               node's logits and accepts a guess that is its parent's draw, exact for temperature > 0;
               and the bonus token, the last accepted node's argmax or draw: the next root
  3. keep:     move the accepted nodes' K/V to slots prefix, prefix+1, ... (KVCache.compact)
  4. propose:  the heads read the last accepted node's hidden state (no extra forward) and guess the
               next step's tree: tree_tokens = bonus + their top-k, picked by the tree (tree.py); a
               dynamic tree (dynamic_tree.py) also chooses which nodes, from the heads' confidence, and
               the next step first lays them out (mask, depths, retrieve rows) before verifying them;
               heads that read their path guess depth by depth, each node's children from its own
               tokens (path_tree.py)

With greedy acceptance every emitted token is the base model's argmax given the tokens before it,
so the output is exactly plain greedy decoding's, only with fewer forward passes. Typical acceptance,
as in the Medusa paper (the reference's `fast=True`), also takes the root and the bonus token as the
argmax and accepts guesses the tempered distribution finds typical enough; only lossless sampling
(`accept="sample"`) draws tokens at random.

`medusa_step` chains the four with fixed shapes and no host sync, so on a GPU the whole step replays
as one CUDA graph (captured by the Decoder), and the host reads the step's tokens back one step behind
(pending_read.py), while the next step already runs.
Lossless sampling draws its random numbers inside the step too, from the generator the graph is
registered with (`Decoder.random_generator`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from kernels.acceptance import accept_candidates

from .decoder import Decoder, check_eos_ids, check_prompt
from .dynamic_tree import DynamicTree
from .errors import NanoMedusaError
from .generation import GenerationResult
from .heads import MedusaHeads
from .path_tree import propose_path_tree
from .pending_read import PendingRead
from .sampling import Sampling, next_token
from .tree import TreeBuffers

ACCEPT_MODES = ("greedy", "typical", "sample")


@dataclass(frozen=True)
class Acceptance:
    """How a step's candidates are judged (see the module docstring)."""

    mode: str = "greedy"  # one of ACCEPT_MODES
    sampling: Sampling = Sampling()  # sample: the distribution drawn from; typical: its temperature
    posterior_threshold: float = 0.09  # typical: epsilon
    posterior_alpha: float = 0.3  # typical: alpha

    @property
    def draws(self) -> Sampling:
        """How the root and bonus tokens are chosen: drawn by lossless sampling, else the argmax (typical too)."""
        return self.sampling if self.mode == "sample" else Sampling()


class MedusaStep(NamedTuple):
    tokens: torch.Tensor  # [depth_max + 1] the accepted path's tokens, root first (only accept_len + 1 count)
    accept_len: torch.Tensor  # [] guesses accepted past the root
    prefix: torch.Tensor  # [] the first free cache slot after this step's tokens
    bonus: torch.Tensor  # [] the token after the accepted ones: the next step's root
    next_tree: tuple[torch.Tensor, ...]  # the next step's proposal (see `propose`)


def propose(heads: MedusaHeads, tree: TreeBuffers | DynamicTree, lm_head_weight, root,
            hidden, embed=None) -> tuple[torch.Tensor, ...]:
    """root [] (a token not yet in the cache), hidden [1, D] of the token before it -> the next step's proposal:
    (tree tokens [T],), or for a dynamic tree (tree tokens [N], the superset nodes it chose [N]). Heads that
    read their path guess depth by depth (path_tree.py) and need `embed`, the base model's token embedding."""
    if heads.config.reads_path:
        return propose_path_tree(heads, tree, lm_head_weight, root, hidden, embed)
    if isinstance(tree, DynamicTree):
        ids, logprobs = heads.topk_logprobs(hidden, tree.topk, lm_head_weight)  # [K, 1, k] each
        return tree.choose(root, ids[:, 0], logprobs[:, 0])
    guesses = heads.topk(hidden, tree.topk, lm_head_weight)[:, 0]  # [K, 1, k] -> [K, k]
    return (tree.candidate_tokens(root, guesses),)


def verify(model, tree: TreeBuffers, tree_tokens, prefix) -> tuple[torch.Tensor, torch.Tensor]:
    """tree_tokens [T] at cache slots prefix.. -> hidden [T, D], logits [T, V]."""
    hidden = model.forward_hidden(tree_tokens[None], prefix_len=prefix, positions=prefix + tree.depths,
                                  tree_mask=tree.attn_mask)[0]
    return hidden, model.logits(hidden)


def accept(logits, tree_tokens, tree: TreeBuffers, rule: Acceptance, rng: torch.Generator | None):
    """logits [T, V], tree_tokens [T] -> the accepted retrieve row's node ids [depth_max + 1] (root first, the -1
    padding read as the root), its last accepted node [1], accept_len [] and the bonus token []."""
    if rule.mode == "sample":  # a guess is accepted when it is what its parent drew; the bonus is a draw too
        drawn = next_token(logits, rule.sampling, rng)  # [T] the token each node's target distribution drew
        best, accept_len = accept_candidates(logits, tree_tokens, tree.retrieve_indices, "sample", drawn=drawn)
    else:  # greedy, or typical (at a temperature > 0: check_acceptance); the bonus is the argmax
        best, accept_len = accept_candidates(logits, tree_tokens, tree.retrieve_indices, rule.mode,
                                             rule.sampling.temperature, rule.posterior_threshold, rule.posterior_alpha)
    path, last = tree.accepted_path(best, accept_len)
    bonus = drawn.index_select(0, last)[0] if rule.mode == "sample" else logits.index_select(0, last)[0].argmax(-1)
    return path, last, accept_len, bonus


def keep(model, tree_tokens, prefix, path) -> torch.Tensor:
    """Move the accepted path's K/V into place -> the path's tokens [depth_max + 1].

    All depth_max+1 nodes of the path move, not only the accept_len+1 accepted ones, so the shapes stay
    fixed: the others (and the -1 padding, read as the root) land past the new prefix, on free slots."""
    model.kv_cache.compact(prefix, path)
    return tree_tokens[path]


def medusa_step(model, heads: MedusaHeads, tree: TreeBuffers | DynamicTree, rule: Acceptance, rng, prefix,
                tree_tokens, *chosen) -> MedusaStep:
    """One whole step on the device: verify, accept, keep, propose. (tree_tokens, *chosen) is the last
    step's proposal; a dynamic tree's step first lays out the tree it chose."""
    step_tree = tree.layout(*chosen) if isinstance(tree, DynamicTree) else tree
    hidden, logits = verify(model, step_tree, tree_tokens, prefix)
    path, last, accept_len, bonus = accept(logits, tree_tokens, step_tree, rule, rng)
    tokens = keep(model, tree_tokens, prefix, path)
    next_tree = propose(heads, tree, model.lm_head.weight, bonus, hidden.index_select(0, last), model.tok_embeddings)
    return MedusaStep(tokens, accept_len, prefix + accept_len + 1, bonus, next_tree)


def start_tree(model, heads: MedusaHeads, tree: TreeBuffers | DynamicTree, draws: Sampling, rng,
               hidden) -> tuple[torch.Tensor, ...]:
    """hidden [1, D] at the prompt's last position -> (root [], *the first step's proposal): the base model's
    next token and the heads' first tree. A function of its own so that it replays as one graph too (a proposal
    is some 6 to 19 kernel launches, which from Python cost more than they run)."""
    root = next_token(model.logits(hidden)[0], draws, rng)
    return (root, *propose(heads, tree, model.lm_head.weight, root, hidden, model.tok_embeddings))


def placeholder_proposal(tree: TreeBuffers | DynamicTree, device) -> tuple[torch.Tensor, ...]:
    """A proposal of the right shapes to capture the step's graph on: token 0 everywhere, and for a dynamic
    tree its first N superset nodes (node order puts parents first, so they form a tree)."""
    tokens = torch.zeros(tree.num_nodes, dtype=torch.long, device=device)
    return (tokens, torch.arange(tree.num_nodes, device=device)) if isinstance(tree, DynamicTree) else (tokens,)


def check_acceptance(rule: Acceptance) -> None:
    """The acceptance rule and the sampling settings must agree (generate.py checks its flags with this too)."""
    if rule.mode not in ACCEPT_MODES:
        raise NanoMedusaError(f"unknown acceptance {rule.mode!r}; use one of {', '.join(ACCEPT_MODES)}.")
    if rule.mode == "sample" and rule.sampling.greedy:
        raise NanoMedusaError("--accept sample needs --temperature > 0; use --accept greedy for greedy decoding.")
    if rule.mode == "typical" and rule.sampling.greedy:  # (it would silently be greedy acceptance)
        raise NanoMedusaError("--accept typical accepts by the probabilities of the tempered distribution, so at "
                              "--temperature 0 it is --accept greedy; pass --temperature > 0 (e.g. 0.7), or --accept "
                              "greedy.")
    if rule.mode == "greedy" and not rule.sampling.greedy:  # (it would silently decode greedily)
        raise NanoMedusaError("--accept greedy keeps the model's argmax, so --temperature would do nothing; use "
                              "--accept sample (lossless) or --accept typical to sample, or --temperature 0.")


def check_medusa(model, heads: MedusaHeads, tree: TreeBuffers | DynamicTree, rule: Acceptance) -> None:
    if not isinstance(tree, (TreeBuffers, DynamicTree)):
        raise NanoMedusaError(f"the tree must be a TreeBuffers or a DynamicTree, not a {type(tree).__name__}; build "
                              f"one with TreeBuffers.from_choices(paths) or DynamicTree.for_heads(heads.config).")
    c, m = heads.config, model.config
    if (c.hidden_size, c.vocab_size) != (m.dim, m.vocab_size):
        raise NanoMedusaError(f"the heads read {c.hidden_size}-wide hidden states and guess among {c.vocab_size} "
                              f"tokens, but the model's are {m.dim} and {m.vocab_size}; use heads made for this model.")
    weight = next(heads.parameters(), None)  # (heads sharing the lm_head without ResBlocks hold none)
    if weight is not None and (weight.dtype, weight.device) != (model.dtype, model.device):
        raise NanoMedusaError(f"the heads are {weight.dtype} on {weight.device} but the model is {model.dtype} on "
                              f"{model.device}; move them with heads.to(device=model.device, dtype=model.dtype).")
    check_acceptance(rule)
    if tree.topk > m.vocab_size:  # (only tiny vocabularies: the heads cannot rank more tokens than there are)
        raise NanoMedusaError(f"the tree takes each head's top {tree.topk} guesses but the vocabulary has only "
                              f"{m.vocab_size} tokens; use a tree whose ranks stay below {m.vocab_size}.")
    if heads.config.num_heads < tree.depth_max:
        raise NanoMedusaError(f"the tree is {tree.depth_max} deep but there are only {heads.config.num_heads} "
                              f"Medusa heads; pick a tree at most {heads.config.num_heads} deep.")


@torch.inference_mode()
def generate_medusa(decoder: Decoder, heads: MedusaHeads, tree: TreeBuffers | DynamicTree, prompt_ids: list[int],
                    max_new_tokens: int, sampling: Sampling = Sampling(), accept: str = "greedy",
                    eos_ids: list[int] = (), posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                    on_tokens: Callable[[list[int]], None] | None = None,
                    generator: torch.Generator | None = None, cached_len: int = 0) -> GenerationResult:
    """Medusa-decode up to max_new_tokens after prompt_ids, verifying a static tree or a dynamic one each step.
    `cached_len` > 0 continues from a KV cache that already holds prompt_ids[:cached_len] (a chat's earlier
    turns; slots past them may hold an earlier step's tree, which the prefill overwrites): only the rest is
    prefilled."""
    rule = Acceptance(accept, sampling, posterior_threshold, posterior_alpha)
    model, device = decoder.model, decoder.device
    check_medusa(model, heads, tree, rule)
    check_prompt(model, prompt_ids)
    check_eos_ids(eos_ids)
    tree = tree.to(device)
    decoder.size_cache(len(prompt_ids), max_new_tokens, extra=tree.num_nodes, cached_len=cached_len)
    rng = decoder.random_generator(rule.draws, generator)
    prefix = torch.tensor(len(prompt_ids), device=device)  # 0-d: first free cache slot, kept on the device
    # The key names all that the step closes over besides the model and its cache.
    copies = heads.copies_serial(model.lm_head.weight)  # the heads' weights as the graphs read them
    key = ("medusa", rule, id(heads), copies, tree.key)
    step = decoder.graphed(key, functools.partial(medusa_step, model, heads, tree, rule, rng), prefix,
                           *placeholder_proposal(tree, device), generator=rng)
    start_tree_step = decoder.graphed(("medusa-start", rule.draws, id(heads), copies, tree.key),
                                      functools.partial(start_tree, model, heads, tree, rule.draws, rng),
                                      torch.zeros(1, model.config.dim, dtype=model.dtype, device=device), generator=rng)
    result = GenerationResult()

    def emit(tokens: list[int]) -> bool:
        """Append tokens up to eos / max_new_tokens; True when generation is over."""
        for i, tok in enumerate(tokens):
            result.tokens.append(tok)
            if tok in eos_ids or len(result.tokens) >= max_new_tokens:
                tokens = tokens[: i + 1]
                if on_tokens:
                    on_tokens(tokens)
                return True
        if on_tokens:
            on_tokens(tokens)
        return False

    decoder.sync()
    start = time.perf_counter()
    hidden = decoder.prefill(prompt_ids, start=cached_len)  # [1, D] at the prompt's last position
    # the root [], the tree tokens [T] (, for a dynamic tree the superset nodes chosen [T])
    root, *proposal = start_tree_step(hidden)
    read = PendingRead(root.view(1))  # queued before the first step: the root reaches the host without waiting for it
    # Each step's tokens are read one step behind (pending_read.py) while the run surely goes on past them (a step
    # gives 1 to depth_max + 1 tokens): the next step, whose inputs are all on the device, is queued first, so the
    # device verifies while the host reads and streams. Near the end the host reads first and queues a step only if
    # one is wanted, so that only eos can leave a queued step unused.
    out = step(prefix, *proposal) if max_new_tokens > 1 else None
    first = read.tolist()
    result.prefill_seconds = read.ready_at - start
    done = max_new_tokens <= 0 or emit(first)  # 0 tokens asked for: none emitted
    while not done:
        # the step's tokens to read: the path's, the bonus token and accept_len n
        read = PendingRead(torch.cat([out.tokens, out.bonus.view(1), out.accept_len.view(1)]))
        ahead = len(result.tokens) + tree.depth_max + 1 < max_new_tokens
        if ahead:
            out = step(out.prefix, *out.next_tree)
        *tokens, bonus, n = read.tolist()
        result.steps += 1
        done = emit(tokens[1: n + 1] + [bonus])  # tokens[0] is this step's root, emitted already (last bonus)
        if not done and not ahead:
            out = step(out.prefix, *out.next_tree)
    decoder.sync()  # a step queued before an eos was read, counted: the next run would wait for it
    result.seconds = time.perf_counter() - start
    return result

"""Medusa decoding at batch 1: guess a tree of future tokens, verify it in one forward, keep the best run.

One step, starting with `root` (the base model's next token, not yet in the cache) and each head's
top-k guesses from the last hidden state:

  1. candidates:  tree_tokens [T] = root + heads' top-k picked by the tree      (tree.candidate_tokens)
  2. verify:      one forward over the T nodes: node j is written to cache slot prefix+j, sits at
                  RoPE position prefix + depth(j), and attends to the prefix and its own ancestors
  3. accept:      greedy / typical: the path accepted furthest, the likeliest among equals (kernels.acceptance)
                  sample: rejection sampling down the tree, exact for temperature > 0 (kernels.speculative_sampling)
  4. keep:        emit the accepted tokens and a bonus token drawn from the last accepted node's
                  logits (the next root); move the accepted nodes' K/V to prefix, prefix+1, ...
                  (kernels.kv_compaction)
  5. next guess:  the heads read the last accepted node's hidden state (no extra forward)

With greedy acceptance every emitted token is the base model's argmax given the tokens before it,
so the output is exactly plain greedy decoding's, only with fewer forward passes. Typical acceptance,
as in the Medusa paper (the reference's `fast=True`), also takes the root and the bonus token as the
argmax and accepts guesses the tempered distribution finds typical enough; only lossless sampling
(`--accept sample`) draws tokens at random.

Steps 2-5 run on the device with fixed shapes (`verify_accept_keep`): on a GPU the whole step, forward,
acceptance, compaction and the next guesses, replays as one CUDA graph, and the host reads the step's
tokens back with one sync. Lossless sampling draws its random numbers inside the step too, from the
generator the graph is registered with (`generation.run_generator`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from kernels.acceptance import accept_candidates
from kernels.kv_compaction import compact_kv
from kernels.speculative_sampling import speculative_accept

from .errors import NanoMedusaError
from .generation import GenerationResult, _sync, graphed, prefill, prepare_cache, run_generator
from .heads import MedusaHeads
from .sampling import Sampling, next_token, target_probs
from .tree import TreeBuffers

ACCEPT_MODES = ("greedy", "typical", "sample")


@torch.inference_mode()
def generate_medusa(model, heads: MedusaHeads, tree: TreeBuffers, prompt_ids: list[int], max_new_tokens: int,
                    sampling: Sampling = Sampling(), accept: str = "greedy", eos_ids: list[int] = (),
                    posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                    on_tokens: Callable[[list[int]], None] | None = None,
                    generator: torch.Generator | None = None, cuda_graphs: bool = True,
                    cached_len: int = 0) -> GenerationResult:
    """Medusa-decode up to max_new_tokens after prompt_ids. `cached_len` > 0 continues from a KV cache that
    already holds prompt_ids[:cached_len] (a chat's earlier turns; slots past them may hold an earlier
    step's tree, which the prefill overwrites): only the rest is prefilled."""
    if accept not in ACCEPT_MODES:
        raise NanoMedusaError(f"unknown acceptance {accept!r}; use one of {', '.join(ACCEPT_MODES)}.")
    if accept == "sample" and sampling.greedy:
        raise NanoMedusaError("--accept sample needs --temperature > 0; use --accept greedy for greedy decoding.")
    if heads.config.num_heads < tree.depth_max:
        raise NanoMedusaError(f"the tree is {tree.depth_max} deep but there are only {heads.config.num_heads} "
                              f"Medusa heads; pick a tree at most {heads.config.num_heads} deep.")
    device = model.device
    tree = tree.to(device)
    prepare_cache(model, len(prompt_ids), max_new_tokens, extra=tree.num_nodes, cuda_graphs=cuda_graphs,
                  cached_len=cached_len)
    lm_w = model.output.weight
    prefix = torch.tensor(len(prompt_ids), device=device)  # 0-d: first free cache slot, kept on the device
    mode = "greedy" if accept == "greedy" or sampling.greedy else "typical"
    # How the root and bonus tokens are chosen: drawn by lossless sampling, else the argmax (typical too).
    draw = sampling if accept == "sample" else Sampling()
    rng = run_generator(device, draw, generator)

    def propose(root, hidden):  # root [] token, hidden [1, D] of the node it follows -> next tree tokens [T]
        return tree.candidate_tokens(root, heads.topk(hidden, tree.topk, lm_w)[:, 0])

    def verify(tree_tokens, prefix):  # [T] -> hidden [T, D], logits [T, V]
        hidden = model.forward_hidden(tree_tokens[None], prefix_len=prefix, positions=prefix + tree.depths,
                                      tree_mask=tree.attn_mask)[0]
        return hidden, model.lm_head(hidden)

    def accepted_path(best, accept_len):  # -> retrieve row `best`: nodes [depth_max+1] root..leaf, last accepted [1]
        path = tree.retrieve_indices.index_select(0, best.view(1))[0].clamp(min=0)
        return path, path.gather(0, accept_len.view(1))

    def accept_tree(logits, tree_tokens):  # [T, V], [T] -> best retrieve row [], accept_len [], bonus token []
        if accept == "sample":  # the uniforms are drawn on the device, so the walk needs no host sync either
            uniforms = torch.rand(tree.depth_max + 1, tree.child_index.shape[1] + 1, generator=rng, device=device)
            return speculative_accept(target_probs(logits, sampling), tree_tokens, tree.child_index,
                                      tree.retrieve_indices, uniforms)
        best, accept_len = accept_candidates(logits, tree_tokens, tree.retrieve_indices, mode,
                                             max(sampling.temperature, 1e-5), posterior_threshold, posterior_alpha)
        return best, accept_len, logits.index_select(0, accepted_path(best, accept_len)[1])[0].argmax(-1)

    def verify_accept_keep(tree_tokens, prefix):
        """Steps 2-5, all on the device with fixed shapes and no host sync, so that on a GPU the whole step
        replays as one CUDA graph."""
        hidden, logits = verify(tree_tokens, prefix)
        best, accept_len, bonus = accept_tree(logits, tree_tokens)
        path, last = accepted_path(best, accept_len)
        # All depth_max+1 rows of the path move, not only the accept_len+1 accepted ones, so the shapes stay
        # fixed: the others (and the -1 padding, read as the root) land past the new prefix, on free slots.
        compact_kv(model.kv_cache, prefix, path)
        return {"tokens": tree_tokens[path], "accept_len": accept_len, "prefix": prefix + accept_len + 1,
                "bonus": bonus, "next_tree": propose(bonus, hidden.index_select(0, last))}

    example = (torch.zeros(tree.num_nodes, dtype=torch.long, device=device), prefix)
    # The graphs are kept on the model for later runs: the key names what the steps close over.
    key = ("medusa", accept, sampling, posterior_threshold, posterior_alpha, id(heads), tuple(map(tuple, tree.paths)))
    verify_accept_keep = graphed(model, key, verify_accept_keep, *example, cuda_graphs=cuda_graphs, generator=rng)
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

    _sync(device)
    start = time.perf_counter()
    hidden = prefill(model, prompt_ids, cuda_graphs, start=cached_len)  # [1, D] at the prompt's last position
    root = next_token(model.lm_head(hidden)[0], draw, rng)
    tree_tokens = propose(root, hidden)  # [T]
    result.prefill_seconds = time.perf_counter() - start
    done = max_new_tokens <= 0 or emit([root.item()])  # 0 tokens asked for: none emitted
    while not done:
        step = verify_accept_keep(tree_tokens, prefix)
        prefix, bonus, tree_tokens = step["prefix"], step["bonus"], step["next_tree"]
        *tokens, bonus_id, n = torch.cat([step["tokens"], bonus.view(1), step["accept_len"].view(1)]).tolist()
        accepted = tokens[1: n + 1] + [bonus_id]  # (that .tolist() is the step's one host sync)
        result.steps += 1
        done = emit(accepted)
    _sync(device)
    result.seconds = time.perf_counter() - start
    return result

"""Medusa decoding at batch 1: guess a tree of future tokens, verify it in one forward, keep the best run.

One step, starting with `root` (the base model's next token, not yet in the cache) and each head's
top-k guesses from the last hidden state:

  1. candidates:  tree_tokens [T] = root + heads' top-k picked by the tree      (tree.candidate_tokens)
  2. verify:      one forward over the T nodes: node j is written to cache slot prefix+j, sits at
                  RoPE position prefix + depth(j), and attends to the prefix and its own ancestors
  3. accept:      greedy / typical: the path accepted furthest (kernels.acceptance)
                  sample: rejection sampling down the tree, exact for temperature > 0
  4. keep:        emit the accepted tokens and a bonus token drawn from the last accepted node's
                  logits (the next root); move the accepted nodes' K/V to prefix, prefix+1, ...
                  (kernels.kv_compaction)
  5. next guess:  the heads read the last accepted node's hidden state (no extra forward)

With greedy acceptance every emitted token is the base model's argmax given the tokens before it,
so the output is exactly plain greedy decoding's, only with fewer forward passes.

For greedy and typical acceptance, steps 2-5 run on the device with fixed shapes (`verify_accept_keep`):
on a GPU the whole step, forward, acceptance, compaction and the next guesses, replays as one CUDA
graph, and the host reads the step's tokens back with one sync. Lossless sampling (`--accept sample`)
walks the tree on the host, so there only the forward is graphed.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from kernels.acceptance import accept_candidates
from kernels.kv_compaction import compact_kv

from .cuda_graphs import GraphedStep
from .errors import NanoMedusaError
from .generation import GenerationResult, _sync, prefill, prepare_cache
from .heads import MedusaHeads
from .sampling import Sampling, next_token, target_probs
from .tree import TreeBuffers

ACCEPT_MODES = ("greedy", "typical", "sample")


def speculative_accept(tree_logits, tree_tokens, tree: TreeBuffers, sampling: Sampling, generator=None):
    """Rejection sampling down the tree; -> (accepted node indices [A] with the root first, bonus token).

    At a node with target distribution p, its children (distinct tokens, best guess first) are tried in
    turn: child x is taken with probability p(x); if refused, x is removed from p and p renormalised.
    This is sampling from p one candidate at a time, so whatever token comes out (a child, or a draw
    from what is left of p) is distributed exactly as p: the output matches plain sampling.
    """
    children = tree.child_index.tolist()  # [T][C], -1 padded
    tokens = tree_tokens.tolist()
    path = [0]
    while True:
        p = target_probs(tree_logits[path[-1]], sampling)  # [V]
        taken = None
        for child in (c for c in children[path[-1]] if c >= 0):
            x = tokens[child]
            if torch.rand((), generator=generator, device=p.device) < p[x]:
                taken = child
                break
            p[x] = 0.0
            p = p / p.sum()
        if taken is None:
            return path, torch.multinomial(p, 1, generator=generator)[0]
        path.append(taken)


@torch.inference_mode()
def generate_medusa(model, heads: MedusaHeads, tree: TreeBuffers, prompt_ids: list[int], max_new_tokens: int,
                    sampling: Sampling = Sampling(), accept: str = "greedy", eos_ids: list[int] = (),
                    posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                    on_tokens: Callable[[list[int]], None] | None = None,
                    generator: torch.Generator | None = None, cuda_graphs: bool = True) -> GenerationResult:
    if accept not in ACCEPT_MODES:
        raise NanoMedusaError(f"unknown acceptance {accept!r}; use one of {', '.join(ACCEPT_MODES)}.")
    if accept == "sample" and sampling.greedy:
        raise NanoMedusaError("--accept sample needs --temperature > 0; use --accept greedy for greedy decoding.")
    if heads.config.num_heads < tree.depth_max:
        raise NanoMedusaError(f"the tree is {tree.depth_max} deep but there are only {heads.config.num_heads} "
                              f"Medusa heads; pick a tree at most {heads.config.num_heads} deep.")
    device = model.device
    tree = tree.to(device)
    prepare_cache(model, len(prompt_ids), max_new_tokens, extra=tree.num_nodes, cuda_graphs=cuda_graphs)
    lm_w = model.output.weight
    prefix = torch.tensor(len(prompt_ids), device=device)  # 0-d: first free cache slot, kept on the device
    mode = "greedy" if accept == "greedy" or sampling.greedy else "typical"

    def propose(root, hidden):  # root [] token, hidden [1, D] of the node it follows -> next tree tokens [T]
        return tree.candidate_tokens(root, heads.topk(hidden, tree.topk, lm_w)[:, 0])

    def verify(tree_tokens, prefix):  # [T] -> hidden [T, D], logits [T, V]
        hidden = model.forward_hidden(tree_tokens[None], prefix_len=prefix, positions=prefix + tree.depths,
                                      tree_mask=tree.attn_mask)[0]
        return hidden, model.lm_head(hidden)

    def verify_accept_keep(tree_tokens, prefix):
        """Steps 2-5 for greedy / typical acceptance, all on the device with fixed shapes and no host sync,
        so that on a GPU the whole step replays as one CUDA graph."""
        hidden, logits = verify(tree_tokens, prefix)
        best, accept_len = accept_candidates(logits, tree_tokens, tree.retrieve_indices, mode,
                                             max(sampling.temperature, 1e-5), posterior_threshold, posterior_alpha)
        path = tree.retrieve_indices.index_select(0, best.view(1))[0].clamp(min=0)  # [depth_max+1] root..leaf
        last = path.gather(0, accept_len.view(1))  # [1] the last accepted node
        # All depth_max+1 rows of the path move, not only the accept_len+1 accepted ones, so the shapes stay
        # fixed: the others (and the -1 padding, read as the root) land past the new prefix, on free slots.
        compact_kv(model.kv_cache, prefix, path)
        out = {"tokens": tree_tokens[path], "accept_len": accept_len, "prefix": prefix + accept_len + 1,
               "hidden": hidden.index_select(0, last), "logits": logits.index_select(0, last)[0]}
        if sampling.greedy:  # the bonus token and the next guesses need no randomness: stay on the device
            out["bonus"] = out["logits"].argmax(-1)
            out["next_tree"] = propose(out["bonus"], out["hidden"])
        return out

    example = (torch.zeros(tree.num_nodes, dtype=torch.long, device=device), prefix)
    if accept == "sample":  # rejection sampling walks the tree on the host: only the forward is graphed
        verify = GraphedStep(verify, *example, enabled=cuda_graphs)
    else:
        verify_accept_keep = GraphedStep(verify_accept_keep, *example, enabled=cuda_graphs)
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
    hidden = prefill(model, prompt_ids, cuda_graphs)  # [1, D] at the prompt's last position
    root = next_token(model.lm_head(hidden)[0], sampling, generator)
    tree_tokens = propose(root, hidden)  # [T]
    result.prefill_seconds = time.perf_counter() - start
    done = emit([root.item()])
    while not done:
        if accept == "sample":
            hidden, logits = verify(tree_tokens, prefix)  # [T, D], [T, V]
            path, bonus = speculative_accept(logits, tree_tokens, tree, sampling, generator)
            path = torch.tensor(path, device=device)
            compact_kv(model.kv_cache, prefix, path)
            prefix = prefix + path.numel()
            accepted = tree_tokens[path[1:]].tolist() + [bonus.item()]
            tree_tokens = propose(bonus, hidden[path[-1:]])
        else:
            step = verify_accept_keep(tree_tokens, prefix)
            prefix = step["prefix"]
            if sampling.greedy:
                bonus, tree_tokens = step["bonus"], step["next_tree"]
            else:
                bonus = next_token(step["logits"], sampling, generator)
                tree_tokens = propose(bonus, step["hidden"])
            *tokens, bonus_id, n = torch.cat([step["tokens"], bonus.view(1), step["accept_len"].view(1)]).tolist()
            accepted = tokens[1: n + 1] + [bonus_id]  # (that .tolist() is the step's one host sync)
        result.steps += 1
        done = emit(accepted)
    _sync(device)
    result.seconds = time.perf_counter() - start
    return result

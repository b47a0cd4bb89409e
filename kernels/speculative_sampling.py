"""Lossless speculative sampling down a Medusa tree: how far the tree is accepted, and the bonus token.

At a node with target distribution p (`sampling.target_probs` of its logits) the children are tried in
order (`child_index`, best guess first): child x is accepted with probability p(x), and if refused, x is
removed from p and p renormalised before the next child is tried. An accepted child becomes the current
node, one depth further. When every child of the current node is refused (a leaf has none), the bonus
token is drawn from what is left of p. This is sampling from p one candidate at a time, so every token
that comes out, accepted or bonus, is distributed exactly as p: the output is plain sampling's.

Fixed shapes and no host sync, so that on a GPU the walk replays inside the step's CUDA graph: the
random numbers are uniforms [depth_max + 1, C + 1] drawn before the walk. Row d serves the node at
depth d: uniforms[d, c] tests its child c (accepted when u * mass left < p(x)), and uniforms[d, C] draws
the bonus if the walk stops there (inverse CDF: the first token whose cumulative mass exceeds u * mass
left). Siblings carry distinct tokens (a head's top-k), and each row of probs sums to 1.

Returns three 0-d long tensors in `accept_candidates`' convention, so that compaction and the next
guesses are shared with greedy acceptance: the first row of retrieve_indices that runs through the
accepted nodes, how many nodes after the root were accepted, and the bonus token.

The Triton version is one program: the walk reads one probability per child tried, then one pass over
the last node's probabilities, in BLOCK_V slices, draws the bonus.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels

BLOCK_V = 4096  # probabilities per slice of the bonus draw


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [..., V] (need not sum to 1), u [...] uniforms in [0, 1) -> token ids [...]: the first token
    whose cumulative mass exceeds u * total, so token i comes out with probability probs[i] / total.
    The bonus draw below uses it, and so does plain sampling: the two draw alike."""
    cdf = probs.cumsum(-1)  # [..., V]
    below = (cdf <= u[..., None] * cdf[..., -1:]).sum(-1)  # [...] tokens wholly below the draw
    # Rounding can put the draw at the very top: then the last token with any mass, never one without.
    ids = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, ids, -1).amax(-1)  # [...]
    return torch.minimum(below, last)


def speculative_accept_reference(probs, tree_tokens, child_index, retrieve_indices, uniforms):
    """probs [T, V]; tree_tokens [T]; child_index [T, C] (-1 padded); retrieve_indices [P, depth_max + 1];
    uniforms [depth_max + 1, C + 1] in [0, 1) -> (best [], accept_len [], bonus [])."""
    C = child_index.shape[1]
    node = torch.zeros((), dtype=torch.long, device=probs.device)  # the current node
    accept_len = torch.zeros_like(node)
    walking = torch.ones((), dtype=torch.bool, device=probs.device)
    left = probs[0]  # [V] what is left of p where the walk stopped
    refused = torch.zeros_like(node)  # the last token refused (the bonus, should rounding leave no mass)
    for depth in range(uniforms.shape[0]):  # the walk stops by depth_max: nodes there are leaves
        p = probs.index_select(0, node.view(1))[0]  # [V]
        taken = torch.full_like(node, -1)
        for c in range(C):
            child = child_index[node, c]
            token = tree_tokens[child.clamp(min=0)]
            trying = walking & (taken < 0) & (child >= 0)
            hit = trying & (uniforms[depth, c] * p.sum() < p[token])  # u < p(x) / mass left
            taken = torch.where(hit, child, taken)
            miss = trying & ~hit
            p = torch.where(miss, p.index_fill(0, token.view(1), 0.0), p)  # remove x (renormalised by the sums)
            refused = torch.where(miss, token, refused)
        left = torch.where(walking & (taken < 0), p, left)
        walking = walking & (taken >= 0)
        node = torch.where(walking, taken, node)
        accept_len = accept_len + walking
    drawn = sample_from(left, uniforms[accept_len, C])
    bonus = torch.where((left > 0).any(), drawn, refused)
    best = (retrieve_indices.index_select(1, accept_len.view(1))[:, 0] == node).int().argmax()  # first such row
    return best, accept_len, bonus


def speculative_accept(probs, tree_tokens, child_index, retrieve_indices, uniforms):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(probs):
        return speculative_accept_triton(probs, tree_tokens, child_index, retrieve_indices, uniforms)
    return speculative_accept_reference(probs, tree_tokens, child_index, retrieve_indices, uniforms)


@triton.jit
def _walk_kernel(probs_ptr, tokens_ptr, children_ptr, retrieve_ptr, uniforms_ptr, best_ptr, accept_len_ptr,
                 bonus_ptr, stride_t, P, V: tl.constexpr, C: tl.constexpr, DEPTH: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """The whole walk in one program.

    probs [T, V] float32 (row stride stride_t), tokens [T], children [T, C] and retrieve [P, DEPTH + 1]
    (contiguous, -1 padded), uniforms [DEPTH + 1, C + 1] float32; best / accept_len / bonus [] int64.
    The walk is unrolled (DEPTH + 1 levels of C children, a few hundred scalar loads at most); node
    ids and tokens are int32 throughout.
    """
    wait_for_previous_kernels(PDL)
    # 1. The walk. A level the walk has already left is still computed (fixed shapes), and changes nothing.
    node = tl.full([], 0, tl.int32)  # the current node: the root
    accept_len = tl.full([], 0, tl.int32)
    walking = node == 0
    left = 1.0  # the mass left where the walk stopped
    refused = tl.full([], 0, tl.int32)  # the last token refused
    for depth in tl.static_range(DEPTH + 1):
        row = probs_ptr + node.to(tl.int64) * stride_t
        taken = tl.full([], -1, tl.int32)
        removed = 0.0  # the mass of this node's refused children
        for c in tl.static_range(C):
            child = tl.load(children_ptr + node * C + c).to(tl.int32)
            token = tl.load(tokens_ptr + tl.maximum(child, 0)).to(tl.int32)
            p_token = tl.load(row + token).to(tl.float32)
            u = tl.load(uniforms_ptr + depth * (C + 1) + c)
            trying = walking & (taken < 0) & (child >= 0)
            hit = trying & (u * (1.0 - removed) < p_token)  # u < p(x) / mass left
            miss = trying & (u * (1.0 - removed) >= p_token)
            taken = tl.where(hit, child, taken)
            removed = tl.where(miss, removed + p_token, removed)
            refused = tl.where(miss, token, refused)
        left = tl.where(walking & (taken < 0), 1.0 - removed, left)
        walking = walking & (taken >= 0)
        node = tl.where(walking, taken, node)
        accept_len += walking.to(tl.int32)

    # 2. The bonus: the first token whose cumulative mass exceeds u * left, over p without the stop node's
    #    children (all refused). `last`, the last token with any mass, catches a target that rounding put
    #    past the final cumulative sum.
    row = probs_ptr + node.to(tl.int64) * stride_t
    target = tl.load(uniforms_ptr + accept_len * (C + 1) + C) * left
    below = 0  # tokens whose cumulative mass is at most the target
    cumulative = 0.0
    last = -1
    for start in range(0, V, BLOCK_V):
        idx = start + tl.arange(0, BLOCK_V)
        p = tl.load(row + idx, mask=idx < V, other=0.0).to(tl.float32)  # [BLOCK_V]
        for c in tl.static_range(C):
            child = tl.load(children_ptr + node * C + c).to(tl.int32)
            token = tl.load(tokens_ptr + tl.maximum(child, 0)).to(tl.int32)
            p = tl.where((idx == token) & (child >= 0), 0.0, p)
        cdf = cumulative + tl.cumsum(p, axis=0)
        below += tl.sum((cdf <= target).to(tl.int32), axis=0)
        cumulative = tl.max(cdf, axis=0)
        last = tl.maximum(last, tl.max(tl.where(p > 0, idx, -1), axis=0))
    tl.store(bonus_ptr, tl.where(last >= 0, tl.minimum(below, last), refused).to(tl.int64))
    tl.store(accept_len_ptr, accept_len.to(tl.int64))

    # 3. The first retrieve row through the accepted nodes: the one with the last of them at column accept_len.
    path = tl.arange(0, BLOCK_P)[:, None]  # [BLOCK_P, 1]
    col = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    ids = tl.load(retrieve_ptr + path * (DEPTH + 1) + col, mask=(path < P) & (col <= DEPTH), other=-1)
    through = tl.max(((ids == node) & (col == accept_len)).to(tl.int32), axis=1)  # [BLOCK_P]
    tl.store(best_ptr, tl.argmax(through, axis=0).to(tl.int64))  # first maximum, like torch.argmax


def speculative_accept_triton(probs, tree_tokens, child_index, retrieve_indices, uniforms):
    """Same contract as `speculative_accept_reference`, in one kernel launch and no host sync."""
    T, V = probs.shape
    C = child_index.shape[1]
    P, Dp = retrieve_indices.shape
    dev = probs.device
    probs = probs if probs.stride(-1) == 1 else probs.contiguous()
    best, accept_len, bonus = (torch.empty((), dtype=torch.long, device=dev) for _ in range(3))
    _walk_kernel[(1,)](
        probs, tree_tokens.contiguous(), child_index.contiguous(), retrieve_indices.contiguous(),
        uniforms.float().contiguous(), best, accept_len, bonus, probs.stride(0), P,
        V=V, C=C, DEPTH=Dp - 1, BLOCK_V=min(BLOCK_V, triton.next_power_of_2(V)),
        BLOCK_P=triton.next_power_of_2(P), BLOCK_D=triton.next_power_of_2(Dp), num_warps=8,
        **launch_options(probs),
    )
    return best, accept_len, bonus

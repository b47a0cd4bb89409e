r"""A dynamic tree's step (nanomedusa/dynamic_tree.py): choose N of a superset's M nodes, then lay them out.

`tree_choice`: the heads' top-k ids and calibrated log-probabilities [K, k] -> the N superset nodes with the
best scores, in node order, and their tokens. Node i's path is ranks[i] (its guess's rank at each depth, -1
past its depth); its score is its guesses' log-probabilities (each clamped to <= 0) summed from the root down,
a left fold, so a child's score is its parent's plus its own and never above it. Nodes rank by (score
descending, node ascending): node order puts parents first, so every chosen node's parent is chosen too.

`tree_layout`: the chosen nodes [N] -> the buffers verifying them needs (tree.py's TreeBuffers fields):
the superset's tables read at the chosen nodes, with superset node ids turned into positions among them.

In Triton each is one launch of one program, where the torch references take about twenty small ops
each (each a kernel in the step's CUDA graph, costing more in the gaps between kernels than in work).
The choice: each superset node's score (the fold over the depths), then a sort of M keys (score
descending, node ascending, packed into one int64: the bits of a float >= 0 order as the float) gives
the N-th best key; the nodes at or below it are the chosen ones, and a prefix sum gives each its slot.
The layout: a lane per chosen node; where a superset node sits among the chosen (ascending) ones is a
binary search, and the retrieve rows' order (the leaves by path, then the rest) is a sort of N keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError

# ------------------------------------------------------------------------------------------- choice


def tree_choice_reference(root, head_ids, head_logprobs, ranks, num_nodes: int):
    """root [] (the root's token), head_ids [K, k] and head_logprobs [K, k] (each head's top-k tokens and their
    log-probabilities, best first), ranks [M, depth] (superset node i's path, -1 padded; K >= depth) ->
    (tokens [N], nodes [N]): the N = num_nodes best superset nodes in node order and their tokens."""
    M, depth = ranks.shape
    has = ranks >= 0  # [M, depth]
    at = ranks.clamp(min=0).T  # [depth, M]
    logprobs = head_logprobs[:depth].gather(1, at).clamp(max=0)  # [depth, M]: each node's guess at each depth
    guesses = head_ids[:depth].gather(1, at)
    score = torch.zeros(M, dtype=head_logprobs.dtype, device=ranks.device)
    token = root.to(head_ids.dtype).expand(M)
    for d in range(depth):  # root first: a child's score is computed as its parent's plus its own
        score = score + torch.where(has[:, d], logprobs[d], 0)
        token = torch.where(has[:, d], guesses[d], token)
    # stable: equal scores keep node order, so a parent ranks before its children
    best = torch.sort(score, descending=True, stable=True).indices[:num_nodes]
    nodes = best.sort().values  # [N] node order: parents before children, the root first
    return token[nodes], nodes


@triton.jit
def _choice_kernel(root_ptr, ids_ptr, logprobs_ptr, ranks_ptr, tokens_ptr, nodes_ptr, M, N,
                   stride_ik, stride_ir, stride_lk, stride_lr, DEPTH: tl.constexpr, BLOCK_M: tl.constexpr,
                   PDL: tl.constexpr):
    """One program: score the M superset nodes, keep the N best, write them (and their tokens) in node order.
    ids/logprobs [K, k] with strides (stride_*k, stride_*r); ranks [M, DEPTH] contiguous; tokens, nodes [N]."""
    wait_for_previous_kernels(PDL)
    node = tl.arange(0, BLOCK_M)
    real = node < M
    score = tl.zeros([BLOCK_M], dtype=tl.float32)
    token = tl.zeros([BLOCK_M], dtype=tl.int64) + tl.load(root_ptr).to(tl.int64)
    for d in tl.static_range(DEPTH):  # the reference's left fold (a missing guess adds 0: the same value)
        rank = tl.load(ranks_ptr + node * DEPTH + d, mask=real, other=-1)
        has = rank >= 0
        logprob = tl.load(logprobs_ptr + d * stride_lk + rank * stride_lr, mask=has, other=0.0).to(tl.float32)
        score = score + tl.minimum(logprob, 0.0)
        token = tl.where(has, tl.load(ids_ptr + d * stride_ik + rank * stride_ir, mask=has, other=0), token)
    # Key: -score (0 - score: +0.0 for either zero), whose float bits order as it does, then the node: the
    # smallest keys are the best nodes, ties to the smaller node. Padding lanes get keys above them all.
    bits = (0.0 - score).to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(real, bits * BLOCK_M + node, 2**62)
    nth = tl.max(tl.where(node < N, tl.sort(key), -1), axis=0)  # the N-th smallest key
    chosen = key <= nth  # exactly N nodes: the keys are distinct
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1  # the chosen nodes' places, in node order
    tl.store(nodes_ptr + slot, node.to(tl.int64), mask=chosen)
    tl.store(tokens_ptr + slot, token, mask=chosen)


def tree_choice_triton(root, head_ids, head_logprobs, ranks, num_nodes: int):
    """Same contract as `tree_choice_reference` (scores in float32): one launch."""
    M, depth = ranks.shape
    if head_ids.shape != head_logprobs.shape or head_ids.shape[0] < depth or not 1 <= num_nodes <= M:
        raise KernelInputError(f"a choice of 1 to {M} nodes, {depth} deep, needs ids and log-probabilities of "
                               f"the same [K >= {depth}, k] shape; got {num_nodes} nodes, ids "
                               f"{tuple(head_ids.shape)} and log-probabilities {tuple(head_logprobs.shape)}.")
    tokens = torch.empty(num_nodes, dtype=head_ids.dtype, device=head_ids.device)
    nodes = torch.empty(num_nodes, dtype=torch.long, device=head_ids.device)
    block_m = triton.next_power_of_2(M)
    ranks = ranks.contiguous() if depth else head_ids  # (a budget of 1: no column to read, nor memory to point at)
    _choice_kernel[(1,)](root, head_ids, head_logprobs, ranks, tokens, nodes, M, num_nodes,
                         *head_ids.stride(), *head_logprobs.stride(), DEPTH=depth, BLOCK_M=block_m,
                         num_warps=4 if block_m <= 1024 else 8, **launch_options(tokens))
    return tokens, nodes


def tree_choice(root, head_ids, head_logprobs, ranks, num_nodes: int):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(head_logprobs):
        return tree_choice_triton(root, head_ids, head_logprobs, ranks, num_nodes)
    return tree_choice_reference(root, head_ids, head_logprobs, ranks, num_nodes)


# ------------------------------------------------------------------------------------------- layout


def tree_layout_reference(nodes, parents, depths, tree_indices, children, lineage, path_order):
    """nodes [N] (chosen superset nodes, ascending, ancestor-closed) and the superset's tables: parents [M],
    depths [M], tree_indices [M], children [M, C] (-1 padded), lineage [M, W] (root..node, -1 padded) and
    path_order [M] (each node's rank in lexicographic path order) -> the chosen tree's
    (attn_mask [N, N] bool, depths [N], parents [N], tree_indices [N], retrieve [N, W]), superset ids turned into
    positions in `nodes` (-1 where not chosen). Retrieve rows: the leaves' (chosen nodes with no chosen child)
    lineages in path order, then -1 rows."""
    M, N = parents.shape[0], nodes.shape[0]
    # superset node -> its position in this tree, -1 if not chosen; the extra last entry maps the -1
    # padding of the superset's tables (read as index -1) to -1 too.
    position = torch.full((M + 1,), -1, dtype=torch.long, device=nodes.device)
    position[nodes] = torch.arange(N, device=nodes.device)
    is_leaf = (position[children.index_select(0, nodes)] < 0).all(dim=1)  # [N] (a root alone is a leaf too)
    rows = torch.where(is_leaf, path_order[nodes], M).sort(stable=True).indices  # leaves first, by path
    retrieve = torch.where(is_leaf[rows, None], position[lineage.index_select(0, nodes[rows])], -1)
    depth = depths.index_select(0, nodes)
    # node q is node p's ancestor (or p) iff p's lineage at q's depth is q
    attn_mask = lineage.index_select(0, nodes)[:, depth] == nodes[None, :]
    return (attn_mask, depth, position[parents.index_select(0, nodes)], tree_indices.index_select(0, nodes),
            retrieve)


@triton.jit
def _position(nodes_ptr, N, node, LOG_N: tl.constexpr):
    """Where each superset node of `node` (any shape; -1 padding allowed) sits among the N chosen ones
    (ascending at nodes_ptr), -1 if it is not chosen: a binary search for how many chosen nodes are smaller."""
    count = tl.zeros(node.shape, dtype=tl.int32)
    for b in tl.static_range(LOG_N + 1):  # probes of 2^LOG_N, ..., 2, 1 sum to at least N
        probe = count + (1 << (LOG_N - b))
        inside = probe <= N
        smaller = tl.load(nodes_ptr + probe - 1, mask=inside, other=0) < node
        count = tl.where(inside & smaller, probe, count)
    found = tl.load(nodes_ptr + count, mask=count < N, other=-1) == node
    return tl.where(found, count, -1).to(tl.int64)  # (padding: no chosen node is -1)


@triton.jit
def _layout_kernel(nodes_ptr, parents_ptr, depths_ptr, tree_indices_ptr, children_ptr, lineage_ptr, path_order_ptr,
                   mask_out, depths_out, parents_out, tree_indices_out, retrieve_out, M, N,
                   C: tl.constexpr, W: tl.constexpr, LOG_N: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_Q: tl.constexpr, PDL: tl.constexpr):
    """One program, lane p for the tree's node p (superset node nodes[p]). The superset's tables are
    contiguous: children [M, C], lineage [M, W], the others [M]; the outputs contiguous too."""
    wait_for_previous_kernels(PDL)
    p = tl.arange(0, BLOCK_N)
    row = p < N
    node = tl.load(nodes_ptr + p, mask=row, other=0)
    depth = tl.load(depths_ptr + node, mask=row, other=0)
    tl.store(depths_out + p, depth, mask=row)
    tl.store(tree_indices_out + p, tl.load(tree_indices_ptr + node, mask=row, other=0), mask=row)
    tl.store(parents_out + p, _position(nodes_ptr, N, tl.load(parents_ptr + node, mask=row, other=0), LOG_N),
             mask=row)

    c = tl.arange(0, BLOCK_C)[None, :]
    in_c = row[:, None] & (c < C)
    kids = _position(nodes_ptr, N, tl.load(children_ptr + node[:, None] * C + c, mask=in_c, other=-1), LOG_N)
    is_leaf = tl.max(kids, axis=1) < 0  # [BLOCK_N] no child chosen

    # Attention: node q is node p's ancestor (or p) iff p's lineage at q's depth is q; BLOCK_Q columns a time.
    for q0 in range(0, N, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        in_q = q < N
        node_q = tl.load(nodes_ptr + q, mask=in_q, other=0)
        depth_q = tl.load(depths_ptr + node_q, mask=in_q, other=0)
        tile = row[:, None] & in_q[None, :]
        ancestor = tl.load(lineage_ptr + node[:, None] * W + depth_q[None, :], mask=tile, other=-1)
        tl.store(mask_out + p[:, None] * N + q[None, :], ancestor == node_q[None, :], mask=tile)

    # Retrieve rows: the leaves by path order, then the other nodes (-1 rows). Row r takes the node whose key
    # is r-th smallest; a key packs (order, p), so the sorted keys say which node each row takes.
    order = tl.where(is_leaf, tl.load(path_order_ptr + node, mask=row, other=0), M + p)
    key = tl.where(row, order, 2 * M + BLOCK_N).to(tl.int64) * BLOCK_N + p
    ranked = tl.sort(key)  # [BLOCK_N]: row r's key
    source = (ranked % BLOCK_N).to(tl.int32)  # the tree node row r lays out
    leaf_row = ranked // BLOCK_N < M
    w = tl.arange(0, BLOCK_W)[None, :]
    in_w = row[:, None] & (w < W)
    source_node = tl.load(nodes_ptr + source, mask=row, other=0)
    line = tl.load(lineage_ptr + source_node[:, None] * W + w, mask=in_w & leaf_row[:, None], other=-1)
    tl.store(retrieve_out + p[:, None] * W + w, _position(nodes_ptr, N, line, LOG_N), mask=in_w)


def tree_layout_triton(nodes, parents, depths, tree_indices, children, lineage, path_order):
    """Same contract as `tree_layout_reference`: one launch."""
    N, (M, C), W = nodes.shape[0], children.shape, lineage.shape[1]
    if not 1 <= N <= M or lineage.shape[0] != M or not parents.shape == depths.shape == path_order.shape == (M,):
        raise KernelInputError(f"a layout of 1 to M nodes needs the superset's [M] parents, depths and path order, "
                               f"[M, C] children and [M, W] lineage; got {N} nodes, children "
                               f"{tuple(children.shape)} and lineage {tuple(lineage.shape)}.")
    dev = nodes.device
    attn_mask = torch.empty(N, N, dtype=torch.bool, device=dev)
    out_depths, out_parents, out_tree_indices = torch.empty(3, N, dtype=torch.long, device=dev)
    retrieve = torch.empty(N, W, dtype=torch.long, device=dev)
    block_n = triton.next_power_of_2(N)
    _layout_kernel[(1,)](
        nodes.contiguous(), parents.contiguous(), depths.contiguous(), tree_indices.contiguous(),
        children.contiguous(), lineage.contiguous(), path_order.contiguous(),
        attn_mask, out_depths, out_parents, out_tree_indices, retrieve, M, N,
        C=C, W=W, LOG_N=block_n.bit_length() - 1, BLOCK_N=block_n, BLOCK_C=triton.next_power_of_2(C),
        BLOCK_W=triton.next_power_of_2(W), BLOCK_Q=min(block_n, 32), num_warps=4, **launch_options(attn_mask),
    )
    return attn_mask, out_depths, out_parents, out_tree_indices, retrieve


def tree_layout(nodes, parents, depths, tree_indices, children, lineage, path_order):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(nodes):
        return tree_layout_triton(nodes, parents, depths, tree_indices, children, lineage, path_order)
    return tree_layout_reference(nodes, parents, depths, tree_indices, children, lineage, path_order)

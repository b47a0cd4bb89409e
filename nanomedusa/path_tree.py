r"""Trees from heads that read their path: each node's children are guessed from the node's own tokens.

Medusa's heads (heads.py) read h_t alone, so every node of depth d and rank r holds the same token, head
d-1's rank-r guess (tree.py's token pool). Heads that read their path (`HeadsConfig.reads_path`) guess the
token at depth d from h_t and the tokens above it, so a tree is proposed depth by depth, each depth one call
of its head over the nodes that have children there:

    depth 1: head 0 reads [root]                          -> its top-k: the root's children
    depth 2: head 1 reads [root, a] for each depth-1 node a -> a's children
    depth 3: head 2 reads [root, a, c] ...

`PathPlan` fixes, per depth, which nodes are parents, their lineage (to gather their paths' tokens), and
for each child its parent's row and its rank, once per tree; so a proposal is a fixed sequence of kernels
of fixed shapes, graphed with the rest of the step: per depth, the parents' inputs (kernels/path_heads.py),
the head's fused top-k kernel on them (kernels/medusa_heads.py), and the guesses put in place.
`propose_path_tree` runs it for a static tree (the tree's tokens) or a dynamic tree's superset
(dynamic_tree.py): there every node also gets its guess's calibrated log-probability given its parent, a
path's score is their sum, and the N best nodes are kept (`choose_by_path_scores`, ancestor-closed for the
reasons dynamic_tree.py gives).

Example: tree [[0], [1], [0, 0], [0, 1], [1, 0]] (nodes 1..5 in that order), guessing "The cat sat":

    depth 1: parents [0], lineage [[0]]               head 0 on [root]: top-2 (cat, dog)    -> node 1 cat, node 2 dog
    depth 2: parents [1, 2], lineage [[0, 1], [0, 2]]  head 1 on [root, cat]: (sat, is)
                                                     head 1 on [root, dog]: (barked, ...)  -> node 3 sat, node 4 is,
                                                                                              node 5 barked
    (children: nodes [3, 4, 5], parent rows [0, 0, 1], ranks [0, 1, 0])

Medusa's heads would put "sat" on node 5 too (depth 2, rank 0): "dog sat", where this tree verifies
"dog barked".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kernels.dynamic_tree import tree_choice
from kernels.path_heads import path_input, place_guesses

from .dynamic_tree import DynamicTree
from .errors import NanoMedusaError
from .heads import MedusaHeads
from .tree import TreeBuffers, lineages


@dataclass(frozen=True)
class Level:
    """One depth d of a plan: what head d-1 reads and where its guesses go."""

    parent_lineage: torch.Tensor  # [P, d] node ids root..parent of each node with children at depth d
    children: torch.Tensor  # [C] the nodes at depth d
    parent_row: torch.Tensor  # [C] each child's parent, as a row of parent_lineage
    rank: torch.Tensor  # [C] each child's rank among its parent's guesses
    topk: int  # guesses needed per parent: 1 + the largest rank


@dataclass(frozen=True)
class PathPlan:
    num_nodes: int  # M: the tree's nodes, root included
    levels: tuple[Level, ...]  # depth 1, 2, ..
    node_paths: torch.Tensor  # [M, depth_max] each node's path below the root as node ids, -1 padded (for choosing)

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], depth_max: int, device=None) -> PathPlan:
        """paths in node order, paths[0] == [] the root (TreeBuffers.paths); nodes deeper than depth_max get no
        guess (a dynamic tree never chooses them, see DynamicTree.from_choices)."""

        def long(values):
            return torch.tensor(values, dtype=torch.long, device=device)

        lineage = lineages(paths)
        levels = []
        for depth in range(1, depth_max + 1):
            children = [node for node, path in enumerate(paths) if len(path) == depth]
            if not children:
                break
            parents = sorted({lineage[node][-2] for node in children})
            row = {parent: i for i, parent in enumerate(parents)}
            levels.append(Level(
                parent_lineage=long([lineage[parent] for parent in parents]),  # each parent's is `depth` long
                children=long(children),
                parent_row=long([row[lineage[node][-2]] for node in children]),
                rank=long([paths[node][-1] for node in children]),
                topk=1 + max(paths[node][-1] for node in children),
            ))
        below_root = [line[1: depth_max + 1] for line in lineage]
        node_paths = long([line + [-1] * (depth_max - len(line)) for line in below_root]).view(len(paths), depth_max)
        return cls(len(paths), tuple(levels), node_paths)


# (tree key, device) -> PathPlan, made the first time a tree proposes. Kept for good: a captured step's CUDA graph
# reads the plan's tensors at the addresses they had when it was captured.
_PLANS: dict = {}


def plan_for(tree: TreeBuffers | DynamicTree, device) -> PathPlan:
    """The plan of a static tree, or of a dynamic tree's superset (cut to the depth its budget reaches)."""
    key = (tree.key, str(device))
    if key not in _PLANS:
        paths = tree.superset.paths if isinstance(tree, DynamicTree) else tree.paths
        _PLANS[key] = PathPlan.from_paths(paths, tree.depth_max, device)
    return _PLANS[key]


def guess_along_paths(heads: MedusaHeads, plan: PathPlan, lm_head_weight, root, hidden, embed,
                      logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """root [] (the step's next token), hidden [1, D] (the state before it), embed (the base model's token
    embedding) -> every node's token [M] (the root's at node 0) and, with logprobs, each node's guess's
    calibrated log-probability given its parent [M] float32 (0 at the root)."""
    tokens = root.reshape(1).to(torch.long).expand(plan.num_nodes).clone()  # [M]
    node_logprobs = torch.zeros(plan.num_nodes, dtype=torch.float32, device=tokens.device) if logprobs else None
    for k, level in enumerate(plan.levels):  # head k guesses depth k + 1, from the tokens set at depth k
        # what head k reads at each parent: h + P_k [e(root); ..; e(parent)]  [P, D]
        x = path_input(hidden, tokens, level.parent_lineage, embed.weight, heads.medusa_path[k].weight)
        guessed = heads.head_topk(k, x, level.topk, lm_head_weight, logprobs)  # ids [P, topk] (, logprobs)
        ids, id_logprobs = guessed if logprobs else (guessed, None)
        place_guesses(tokens, node_logprobs, ids, id_logprobs, level.children, level.parent_row, level.rank)
    return tokens, node_logprobs


def choose_by_path_scores(tokens, node_logprobs, node_paths, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, node_logprobs [M], node_paths [M, depth] (`PathPlan.node_paths`) -> the N best nodes' tokens [N]
    and the nodes [N] in node order: dynamic_tree.py's choice (`kernels.dynamic_tree.tree_choice`, one launch on
    CUDA), each node's guesses looked up by node id instead of by rank. A node's score is the sum of its path's
    log-probabilities (each clamped to <= 0), root first, so a child's is its parent's plus its own and never
    above it; ties keep node order, so each node ranks after its parent."""
    depth = node_paths.shape[1]
    # tree_choice reads "head d's rank-r guess" at head_ids[d, r] for the rank r in a node's path; here the path
    # holds node ids and every depth reads the same row: head_ids[d, i] = tokens[i], the guess of node i.
    return tree_choice(tokens[0], tokens.expand(depth, -1), node_logprobs.expand(depth, -1), node_paths, num_nodes)


def propose_path_tree(heads: MedusaHeads, tree: TreeBuffers | DynamicTree, lm_head_weight, root, hidden,
                      embed) -> tuple[torch.Tensor, ...]:
    """`medusa_generation.propose` for heads that read their path: (tree tokens [T],) for a static tree,
    (tokens [N], the superset nodes chosen [N]) for a dynamic one."""
    if embed is None:
        raise NanoMedusaError("heads that read their path need the base model's token embedding; pass "
                              "embed=model.tok_embeddings.")
    plan = plan_for(tree, hidden.device)
    if isinstance(tree, DynamicTree):
        tokens, node_logprobs = guess_along_paths(heads, plan, lm_head_weight, root, hidden, embed, logprobs=True)
        return choose_by_path_scores(tokens, node_logprobs, plan.node_paths, tree.num_nodes)
    return (guess_along_paths(heads, plan, lm_head_weight, root, hidden, embed)[0],)

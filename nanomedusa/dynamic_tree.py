r"""Dynamic trees: each step's candidate tree chosen from the heads' own confidence, on the device.

A static tree (tree.py) verifies the same shape every step, tuned to the heads' average accuracy. But
the heads know when they are sure: after "The capital of France is" head 0 may give " Paris" 0.95,
elsewhere its best guess 0.2. A dynamic tree spends a fixed budget of N nodes (the root included) where
this step's guesses are likeliest. It keeps a fixed SUPERSET of M >= N candidate nodes (the heads'
accuracy tree of 256 nodes, or 4 N for heads that read their path: `DynamicTree.for_heads`), and each step:

  1. score: every superset node gets the product of its path's probabilities, where head d's rank-r
     guess has p = softmax(logits / T_d)[guess], T_d the head's fitted temperature (calibration.py).
     If the heads are calibrated, that is the chance that all the node's guesses are right: its
     expected contribution to the accepted length, as in the Medusa paper's tree construction.
  2. choose: the N best nodes, sorted by (score descending, node index ascending).
  3. lay out: the chosen nodes' tokens, and the buffers verifying them needs (attention mask, depths,
     retrieve rows), as `TreeBuffers.from_choices` would build them for the chosen paths.

Why the N best form a tree (every chosen node's parent chosen too): probabilities are at most 1, so a
score never grows down a path, and a tie goes to the smaller node index, which the superset's node order
gives every parent before its children. So each node ranks after its parent. Scores are summed
log-probabilities, each clamped to <= 0, and a child's score is computed as its parent's plus its own:
floating-point rounding of parent + x, with x <= 0, never exceeds the parent either.

Fixed shapes, no host sync: N and M are fixed, so every tensor has the same shape every step (the
retrieve rows are N, the leaves' first and -1 rows after), and
the whole step, choice included, still replays as one CUDA graph with no host sync in it. `choose` runs in
the step's `propose` (medusa_generation.py) and returns the chosen superset nodes beside the tokens; the
next step lays that tree out (`layout`) before verifying it. Each is one kernel launch on CUDA
(kernels/dynamic_tree.py, torch references elsewhere), from index tables made once here, and the heads'
calibrated log-probabilities come from their fused top-k kernel: so a dynamic step launches as many
kernels as a static one (`python -m bench.dynamic_trees` counts them). Every acceptance works on the chosen
tree as on a static one; lossless sampling stays lossless, since the tree depends on the context only (the
heads' output), never on the step's random draws.

Example: the superset is tree.py's example tree (M = 5), N = 4. Head 0 guesses (a, b) with probabilities
(0.7, 0.2), head 1 guesses (c, d) with (0.6, 0.3):

                      node 0: root      score 1
                     /            \
       node 1: [0] a  0.7        node 2: [1] b  0.2
         /              \
  node 3: [0,0] c  0.42   node 4: [0,1] d  0.21        (0.7 * 0.6, 0.7 * 0.3)

    ranks = [[-1, -1], [0, -1], [1, -1], [0, 0], [0, 1]]   (each node's path, -1 padded: the index table)
    by (score desc, node asc): 0, 1, 3, 4 | 2   -> nodes  = [0, 1, 3, 4]   (sorted back into node order)
    tokens           = [root, a, c, d]            depths = [0, 1, 2, 2]     parents = [0, 0, 1, 1]
    attn_mask        = [[1 . . .], [1 1 . .], [1 1 1 .], [1 1 . 1]]
    retrieve_indices = [[0, 1, 2], [0, 1, 3], [-1, -1, -1], [-1, -1, -1]]   (leaves [0,0] and [0,1], then padding)

With N = 3 this step's tree would be the chain root, a, c; a step where head 0 is unsure (say 0.3, 0.25)
takes [0] and [1] instead: a static tree verifies the same nodes either way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from kernels.dynamic_tree import tree_choice, tree_layout

from .errors import NanoMedusaError
from .heads import HeadsConfig
from .tree import TreeBuffers, cut_to_depth, lineages, parse_tree, tree_capacity, tree_from_head_accuracies

SUPERSET_NODES = 256  # candidates scored each step, the root included
# Heads that read their path run on every superset node with children (path_tree.py), so their superset is cut to
# 4 N nodes: it kept the 256-node superset's accepted length within 0.13% at 16 and 32 nodes offline and took
# 30-35% off the choice's time there on an H200; from 64 nodes on it is the 256-node superset (bench/RESULTS.md,
# twenty-sixth run).
PATH_SUPERSET_PER_NODE = 4
DEFAULT_NODES = 64  # the budget for heads without a tree of their own: the size of generate.py's default tree on a GPU


def default_nodes(config: HeadsConfig) -> int:
    """The node budget to start from: the size of the heads' own static tree (to be tuned on the GPU,
    with `python -m bench.dynamic_trees`)."""
    if not config.medusa_choices:
        return DEFAULT_NODES
    return len(cut_to_depth(parse_tree(config.medusa_choices), config.num_heads)) + 1


@dataclass(frozen=True, eq=False)
class DynamicTree:
    """A superset tree and a node budget; see the module docstring. M = superset.num_nodes, N = num_nodes."""

    superset: TreeBuffers  # the M candidate nodes, in node order (parents before children)
    num_nodes: int  # N: nodes verified each step, the root included
    ranks: torch.Tensor  # [M, depth_max] long: each node's path (its guesses' ranks), -1 padded right
    lineage: torch.Tensor  # [M, depth_max + 1] long: root..node, -1 padded right (a node's retrieve row)
    path_order: torch.Tensor  # [M] long: each node's rank in lexicographic path order (the retrieve rows' order)
    children: torch.Tensor  # [M, C] long: each node's children, -1 padded right (a chosen node without: a leaf)

    @classmethod
    def from_choices(cls, superset_choices, num_nodes: int, device=None, vocab_size: int | None = None) -> DynamicTree:
        """The budget-`num_nodes` tree over the superset of `superset_choices` (paths, as for TreeBuffers)."""
        superset = TreeBuffers.from_choices(superset_choices, device, vocab_size)
        if not 1 <= num_nodes <= superset.num_nodes:
            raise NanoMedusaError(f"a dynamic tree over a superset of {superset.num_nodes} nodes verifies 1 to "
                                  f"{superset.num_nodes} of them, not {num_nodes}; pass a node budget (--tree-nodes) "
                                  f"in that range.")
        # N nodes reach at most depth N - 1: deeper superset nodes are never chosen (each ranks after its N or
        # more ancestors, even scored on its first N - 1 guesses only), and the retrieve rows (so the K/V moved
        # per step) stay within the N cache slots a step has.
        depth = min(superset.depth_max, num_nodes - 1)
        lineage = [line[: depth + 1] for line in lineages(superset.paths)]
        by_path = sorted(range(superset.num_nodes), key=lambda node: superset.paths[node])
        kids: list[list[int]] = [[] for _ in range(superset.num_nodes)]
        for node, parent in enumerate(superset.parents.tolist()[1:], start=1):
            kids[parent].append(node)
        width = max(len(k) for k in kids)
        return cls(
            superset=superset,
            num_nodes=num_nodes,
            ranks=torch.tensor([path[:depth] + [-1] * (depth - len(path[:depth])) for path in superset.paths],
                               dtype=torch.long, device=device).view(superset.num_nodes, depth),
            lineage=torch.tensor([line + [-1] * (depth + 1 - len(line)) for line in lineage], device=device),
            path_order=torch.tensor(by_path, device=device).argsort(),
            children=torch.tensor([k + [-1] * (width - len(k)) for k in kids], device=device).view(-1, width),
        )

    @classmethod
    def for_heads(cls, config: HeadsConfig, num_nodes: int | None = None, superset_nodes: int | None = None,
                  device=None, vocab_size: int | None = None) -> DynamicTree:
        """The dynamic tree of `num_nodes` (default: `default_nodes`) for these heads: its superset is their
        accuracy tree (`tree_from_head_accuracies`) of max(superset_nodes, num_nodes) nodes, or every path
        their accuracy table allows if that is fewer. superset_nodes defaults to SUPERSET_NODES, for heads that
        read their path to min(SUPERSET_NODES, PATH_SUPERSET_PER_NODE * num_nodes)."""
        num_nodes = default_nodes(config) if num_nodes is None else num_nodes
        if type(num_nodes) is not int or num_nodes < 1:
            raise NanoMedusaError(f"a dynamic tree's node budget is a whole number of at least 1, not {num_nodes!r}; "
                                  f"pass a node budget (--tree-nodes) of 1 or more (default {default_nodes(config)}).")
        if superset_nodes is None:
            superset_nodes = (min(SUPERSET_NODES, PATH_SUPERSET_PER_NODE * num_nodes) if config.reads_path
                              else SUPERSET_NODES)
        acc = [row[: config.vocab_size] for row in config.rank_accuracies()]  # (a vocabulary smaller than the ranks)
        capacity = tree_capacity(len(acc), len(acc[0]))
        if num_nodes > capacity + 1:
            raise NanoMedusaError(f"{len(acc)} heads with top-{len(acc[0])} guesses make trees of at most "
                                  f"{capacity + 1} nodes, not {num_nodes}; pass a smaller node budget (--tree-nodes).")
        superset = tree_from_head_accuracies(acc, min(max(superset_nodes, num_nodes), capacity + 1) - 1)
        return cls.from_choices(superset, num_nodes, device, vocab_size)

    @property
    def depth_max(self) -> int:
        """The deepest a chosen node can be: the superset's depth, or N - 1."""
        return self.lineage.shape[1] - 1

    @property
    def topk(self) -> int:
        return self.superset.topk

    @property
    def key(self) -> tuple:
        """What makes two dynamic trees the same (for caching the step's CUDA graph)."""
        return ("dynamic", self.num_nodes, tuple(map(tuple, self.superset.paths)))

    def to(self, device) -> DynamicTree:
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "num_nodes"}
        return replace(self, **moved)

    def choose(self, root: torch.Tensor, head_ids: torch.Tensor, head_logprobs: torch.Tensor):
        """root [] (the base model's next token), head_ids and head_logprobs [K, k] (each head's top-k tokens
        and their calibrated log-probabilities, best first) -> this step's tree: its tokens [N] and the
        superset nodes they sit on [N], in node order. One launch on CUDA (`kernels.dynamic_tree.tree_choice`)."""
        return tree_choice(root, head_ids, head_logprobs, self.ranks, self.num_nodes)

    def layout(self, nodes: torch.Tensor) -> TreeBuffers:
        """The chosen superset nodes [N] (from `choose`) -> the step tree's buffers, with fixed shapes:
        retrieve_indices [N, depth_max + 1] (the leaves' rows in `TreeBuffers.from_choices`' order, then
        -1 rows). One launch on CUDA (`kernels.dynamic_tree.tree_layout`). Decoding reads the mask, the depths
        and the retrieve rows; parents and tree_indices, a few stores more in the same launch, make the step tree
        a whole TreeBuffers, which the tests compare with the static tree of the same paths."""
        s = self.superset
        attn_mask, depths, parents, tree_indices, retrieve = tree_layout(
            nodes, s.parents, s.depths, s.tree_indices, self.children, self.lineage, self.path_order)
        return TreeBuffers(
            paths=None,  # not known on the host
            num_nodes=self.num_nodes,
            depth_max=self.depth_max,
            topk=s.topk,
            attn_mask=attn_mask,  # [N, N]
            depths=depths,
            parents=parents,
            tree_indices=tree_indices,
            retrieve_indices=retrieve,
        )

r"""Medusa candidate trees: which guesses get verified together, and the index buffers for doing so.

K Medusa heads each propose top-k tokens for the positions after the base model's next token
(head d-1 guesses the token at depth d). A sparse tree picks which combinations to check: it is a
list of paths, where path [0, 1] means "head 0's top-0 token, then head 1's top-1 token". The root
(node 0) is the base model's own next token. All nodes go through the model in one forward pass;
each may attend only to itself and its ancestors, which `TreeBuffers.attn_mask` encodes. This module
builds the index tensors once per tree, and each step uses them here: `TreeBuffers.candidate_tokens` lays a
step's guesses out on the tree, `TreeBuffers.accepted_path` reads the accepted path back.

Example: choices [[0], [1], [0, 0], [0, 1]], so depth_max = 2 and topk = 2. The token pool the nodes
read from (`candidate_tokens`) is [root, head0_top0, head0_top1, head1_top0, head1_top1].

                    node 0: root                 depth 0, pool[0]
                   /            \
         node 1: [0]            node 2: [1]      depth 1, pool[1], pool[2]
         /          \
  node 3: [0,0]   node 4: [0,1]                  depth 2, pool[3], pool[4]

    attn_mask [T, T] (row attends to col) depths           = [0, 1, 1, 2, 2]
          0 1 2 3 4                       parents          = [0, 0, 0, 1, 1]
      0 [ 1 . . . . ]                     tree_indices     = [0, 1, 2, 3, 4]
      1 [ 1 1 . . . ]                     retrieve_indices = [[0, 1,  3],   leaf [0,0]
      2 [ 1 . 1 . . ]                                         [0, 1,  4],   leaf [0,1]
      3 [ 1 1 . 1 . ]                                         [0, 2, -1]]   leaf [1]
      4 [ 1 1 . . 1 ]

Had the tree also held [1, 0], that node would read pool[3] too: a head's guesses do not depend on
the branch they extend, so nodes of equal depth and rank read the same pool entry.

Trees come from `parse_tree` (a preset name from `PRESETS`, a JSON list of paths, or a .json file)
or from `tree_from_head_accuracies` (built from measured head accuracies, as the Medusa paper does).
A dynamic tree (dynamic_tree.py) instead picks each step's nodes from a superset tree, by the heads'
confidence at that step, and builds these buffers for them on the device.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from kernels.medusa_heads import MAX_TOPK
from nanomedusa.errors import NanoMedusaError
from nanomedusa.files import read_utf8


def chain(depth: int) -> list[list[int]]:
    """The top-1-only tree [[0], [0, 0], ...] of `depth` guesses (depth + 1 nodes with the root): one per head."""
    return [[0] * d for d in range(1, depth + 1)]


# The named trees below are published data from FasterDecoding/Medusa, file
# medusa/model/medusa_choices.py (Apache-2.0), as of commit 5e98053 (tuples there, lists here).
# They were tuned on Vicuna/Zephyr heads with top-10 candidates; each has 63 paths (64 nodes with
# the root). mc_sim_7b_63 is the reference's default. smollm2_135m_medusa1 and smollm2_135m_medusa2
# (below them) are ours.
PRESETS: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": [
        [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
        [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2],
        [3, 0], [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1],
        [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3],
        [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0],
        [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0],
        [0, 0, 0, 1], [1, 6], [0, 7, 0],
    ],
    "vicuna_7b_stage2": [
        [0], [0, 0], [1], [0, 1], [0, 0, 0], [1, 0], [2], [0, 2], [0, 0, 1], [0, 3], [3], [0, 1, 0],
        [2, 0], [4], [0, 0, 2], [0, 4], [1, 1], [1, 0, 0], [0, 0, 0, 0], [5], [0, 0, 3], [0, 5],
        [0, 2, 0], [3, 0], [0, 1, 1], [0, 6], [6], [0, 7], [0, 0, 4], [4, 0], [1, 2], [0, 8], [7],
        [0, 3, 0], [0, 0, 0, 1], [0, 0, 5], [2, 1], [0, 0, 6], [1, 0, 1], [0, 0, 1, 0], [2, 0, 0],
        [5, 0], [0, 9], [0, 1, 2], [8], [0, 4, 0], [0, 2, 1], [1, 3], [0, 0, 7], [0, 0, 0, 2],
        [0, 0, 8], [1, 1, 0], [0, 1, 0, 0], [6, 0], [9], [0, 1, 3], [0, 0, 0, 3], [1, 0, 2],
        [0, 5, 0], [3, 1], [0, 0, 2, 0], [7, 0], [1, 4],
    ],
    "vicuna_7b_stage1_ablation": [
        [0], [0, 0], [1], [0, 0, 0], [0, 1], [1, 0], [2], [0, 2], [0, 0, 1], [3], [0, 3], [0, 1, 0],
        [2, 0], [0, 0, 2], [0, 4], [4], [0, 0, 0, 0], [1, 0, 0], [1, 1], [0, 0, 3], [0, 2, 0],
        [0, 5], [5], [3, 0], [0, 1, 1], [0, 6], [6], [0, 0, 4], [1, 2], [0, 0, 0, 1], [4, 0],
        [0, 0, 5], [0, 7], [0, 8], [0, 3, 0], [0, 0, 1, 0], [1, 0, 1], [7], [2, 0, 0], [0, 0, 6],
        [2, 1], [0, 1, 2], [5, 0], [0, 2, 1], [0, 9], [0, 0, 0, 2], [0, 4, 0], [8], [1, 3],
        [0, 0, 7], [0, 1, 0, 0], [1, 1, 0], [6, 0], [9], [0, 0, 8], [0, 0, 9], [0, 5, 0],
        [0, 0, 2, 0], [1, 0, 2], [0, 1, 3], [0, 0, 0, 3], [3, 0, 0], [3, 1],
    ],
    "vicuna_7b_stage1": [
        [0], [0, 0], [1], [2], [0, 1], [1, 0], [3], [0, 2], [4], [0, 0, 0], [0, 3], [5], [2, 0],
        [0, 4], [6], [0, 5], [1, 1], [0, 0, 1], [7], [3, 0], [0, 6], [8], [9], [0, 1, 0], [0, 7],
        [0, 8], [4, 0], [0, 0, 2], [1, 2], [0, 9], [2, 1], [5, 0], [1, 0, 0], [0, 0, 3], [1, 3],
        [0, 2, 0], [0, 1, 1], [0, 0, 4], [6, 0], [1, 4], [0, 0, 5], [2, 2], [0, 3, 0], [3, 1],
        [0, 0, 6], [7, 0], [1, 5], [1, 0, 1], [2, 0, 0], [0, 0, 7], [8, 0], [0, 0, 0, 0], [4, 1],
        [0, 1, 2], [0, 4, 0], [9, 0], [0, 2, 1], [2, 3], [1, 6], [0, 0, 8], [0, 5, 0], [3, 2],
        [5, 1],
    ],
    "vicuna_13b_stage2": [
        [0], [0, 0], [1], [0, 0, 0], [0, 1], [1, 0], [2], [0, 2], [0, 0, 1], [0, 1, 0], [3], [0, 3],
        [2, 0], [0, 0, 2], [0, 0, 0, 0], [0, 4], [1, 0, 0], [1, 1], [4], [0, 0, 3], [0, 5],
        [0, 2, 0], [5], [3, 0], [0, 1, 1], [0, 6], [0, 0, 4], [0, 0, 0, 1], [0, 7], [0, 0, 5],
        [1, 2], [0, 0, 1, 0], [0, 3, 0], [1, 0, 1], [4, 0], [0, 0, 6], [0, 8], [2, 0, 0], [0, 9],
        [6], [7], [2, 1], [5, 0], [0, 1, 2], [0, 0, 0, 2], [8], [0, 4, 0], [0, 1, 0, 0], [0, 2, 1],
        [0, 0, 7], [1, 1, 0], [1, 3], [0, 0, 2, 0], [9], [0, 0, 8], [0, 5, 0], [0, 0, 0, 3],
        [0, 0, 9], [0, 1, 3], [1, 0, 2], [0, 0, 1, 1], [3, 0, 0], [1, 0, 0, 0],
    ],
    "vicuna_13b_stage1": [
        [0], [0, 0], [1], [0, 1], [2], [1, 0], [0, 0, 0], [0, 2], [3], [0, 3], [4], [2, 0], [0, 4],
        [0, 0, 1], [0, 5], [5], [1, 1], [0, 1, 0], [6], [0, 6], [0, 0, 2], [7], [3, 0], [8], [0, 7],
        [0, 8], [1, 0, 0], [0, 0, 3], [4, 0], [1, 2], [9], [0, 9], [2, 1], [0, 2, 0], [0, 0, 4],
        [1, 3], [0, 1, 1], [0, 0, 5], [5, 0], [0, 3, 0], [0, 0, 0, 0], [0, 0, 6], [6, 0], [1, 4],
        [2, 0, 0], [0, 1, 2], [3, 1], [0, 4, 0], [1, 0, 1], [2, 2], [0, 0, 7], [1, 5], [7, 0],
        [0, 0, 8], [8, 0], [0, 5, 0], [0, 0, 9], [0, 2, 1], [1, 1, 0], [0, 1, 3], [4, 1], [2, 3],
        [1, 6],
    ],
    "vicuna_33b_stage2": [
        [0], [0, 0], [1], [0, 1], [0, 0, 0], [1, 0], [2], [0, 2], [0, 0, 1], [0, 3], [3], [0, 1, 0],
        [2, 0], [0, 4], [4], [0, 0, 2], [1, 1], [1, 0, 0], [0, 5], [5], [0, 0, 0, 0], [0, 0, 3],
        [3, 0], [0, 2, 0], [0, 6], [0, 1, 1], [6], [0, 0, 4], [0, 7], [7], [1, 2], [4, 0], [8],
        [0, 3, 0], [0, 0, 5], [0, 0, 0, 1], [0, 8], [2, 1], [0, 9], [1, 0, 1], [2, 0, 0], [0, 0, 6],
        [5, 0], [0, 0, 1, 0], [1, 3], [0, 1, 2], [0, 4, 0], [0, 0, 7], [0, 2, 1], [9], [1, 1, 0],
        [0, 0, 0, 2], [6, 0], [0, 0, 8], [0, 1, 0, 0], [7, 0], [0, 1, 3], [0, 5, 0], [1, 4],
        [0, 0, 9], [3, 1], [1, 0, 2], [2, 2],
    ],
    "vicuna_33b_stage1": [
        [0], [1], [0, 0], [2], [0, 1], [3], [1, 0], [4], [0, 2], [5], [0, 3], [0, 0, 0], [6],
        [0, 4], [2, 0], [7], [1, 1], [0, 5], [3, 0], [8], [9], [0, 6], [0, 7], [0, 0, 1], [1, 2],
        [4, 0], [0, 1, 0], [0, 8], [0, 9], [2, 1], [0, 0, 2], [5, 0], [1, 3], [0, 0, 3], [1, 0, 0],
        [1, 4], [6, 0], [0, 2, 0], [3, 1], [2, 2], [0, 0, 4], [7, 0], [0, 1, 1], [1, 5], [4, 1],
        [0, 0, 5], [0, 3, 0], [9, 0], [8, 0], [1, 6], [0, 0, 6], [2, 3], [0, 1, 2], [3, 2],
        [0, 4, 0], [2, 0, 0], [1, 7], [1, 0, 1], [0, 0, 7], [5, 1], [2, 4], [0, 0, 8], [0, 2, 1],
    ],
    "zephyr_stage2": [
        [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [2, 0],
        [0, 0, 1], [0, 4], [5], [0, 5], [0, 1, 0], [1, 1], [6], [0, 0, 2], [3, 0], [0, 6], [7],
        [0, 7], [0, 8], [0, 0, 3], [1, 0, 0], [0, 9], [0, 2, 0], [1, 2], [4, 0], [8], [9], [2, 1],
        [0, 1, 1], [0, 0, 4], [0, 0, 0, 0], [5, 0], [0, 3, 0], [1, 3], [0, 0, 5], [0, 0, 6], [6, 0],
        [2, 0, 0], [1, 0, 1], [0, 1, 2], [0, 4, 0], [1, 4], [3, 1], [2, 2], [0, 0, 7], [7, 0],
        [0, 2, 1], [0, 0, 8], [0, 1, 3], [0, 5, 0], [1, 5], [0, 0, 9], [1, 1, 0], [0, 0, 0, 1],
        [0, 0, 1, 0], [4, 1], [2, 3],
    ],
    # Ours: the greedy trees of `tree_from_head_accuracies` for the heads shipped in weights/ (Medusa-1:
    # smollm2-135m-instruct-medusa, Medusa-2: smollm2-135m-instruct-medusa2), from their held-out rank
    # accuracies and sized to an H200's step times (`python -m nanomedusa.tree_tuning --step-times`);
    # each is also its checkpoint's config.json medusa_choices, the tree it runs with. The path-reading heads'
    # (smollm2-135m-instruct-medusa-path, the default) is their 32-node tree of depth 3, chosen by end-to-end
    # speed on an H200 (bench/RESULTS.md): their proposal costs a step more per depth than Medusa's.
    "smollm2_135m_medusa1": [
        [0], [1], [2], [3], [4], [5], [6], [7], [8], [9], [0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5],
        [0, 6], [0, 7], [0, 8], [0, 9], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4], [2, 0], [2, 1], [2, 2],
        [3, 0], [3, 1], [4, 0], [5, 0], [6, 0], [7, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 0, 4],
        [0, 0, 5], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 3, 0], [1, 0, 0], [2, 0, 0], [0, 0, 0, 0],
    ],
    "smollm2_135m_medusa2": [
        [0], [1], [2], [3], [4], [5], [6], [7], [8], [9], [0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5],
        [0, 6], [0, 7], [0, 8], [0, 9], [1, 0], [1, 1], [1, 2], [1, 3], [1, 4], [2, 0], [2, 1], [2, 2],
        [3, 0], [3, 1], [4, 0], [5, 0], [6, 0], [7, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 0, 4],
        [0, 0, 5], [0, 0, 6], [0, 0, 7], [0, 0, 8], [0, 0, 9], [0, 1, 0], [0, 1, 1], [0, 1, 2], [0, 1, 3],
        [0, 2, 0], [0, 2, 1], [0, 3, 0], [0, 4, 0], [0, 5, 0], [0, 6, 0], [1, 0, 0], [1, 0, 1], [1, 1, 0],
        [2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [0, 1, 0, 0],
    ],
    "smollm2_135m_medusa_path": [
        [0], [1], [2], [3], [4], [5], [6], [7], [8], [0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [0, 5],
        [0, 6], [0, 7], [1, 0], [1, 1], [2, 0], [3, 0], [4, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2],
        [0, 0, 3], [0, 1, 0], [0, 2, 0], [0, 3, 0], [1, 0, 0], [2, 0, 0],
    ],
    **{f"chain{depth}": chain(depth) for depth in range(1, 6)},
}

_SPEC_FORMS = (
    f"a preset name ({', '.join(PRESETS)}), a JSON list of paths such as '[[0],[0,0],[1]]', "
    "or the path of a .json file holding such a list"
)


def _node_order(path: list[int]) -> tuple[int, list[int]]:
    # Shallow nodes first, then lexicographic: the reference implementation's order, which also
    # puts every parent before its children.
    return len(path), path


def _check_paths(raw: object) -> list[list[int]]:
    """Validate a tree given as a sequence of paths and return it as fresh lists of ints."""
    if isinstance(raw, str) or not isinstance(raw, Sequence) or len(raw) == 0:
        raise NanoMedusaError(f"A tree must be a non-empty list of paths; pass {_SPEC_FORMS}.")
    paths: list[list[int]] = []
    for path in raw:
        if isinstance(path, str) or not isinstance(path, Sequence) or len(path) == 0:
            raise NanoMedusaError(
                f"Tree entry {path!r} is not a non-empty list of top-k indices; pass {_SPEC_FORMS}."
            )
        # bool is an int subclass, and JSON floats like 1.0 are almost certainly typos.
        if not all(type(i) is int and i >= 0 for i in path):
            raise NanoMedusaError(
                f"Tree path {list(path)} must hold non-negative integers (top-k ranks from 0); "
                "fix it."
            )
        if max(path) >= MAX_TOPK:  # the fused heads kernel's limit, so a tree runs on CPU and GPU alike
            raise NanoMedusaError(
                f"Tree path {list(path)} uses rank {max(path)} but the heads give at most their top-{MAX_TOPK} "
                f"guesses (ranks 0 to {MAX_TOPK - 1}); use smaller ranks."
            )
        paths.append(list(path))
    seen: set[tuple[int, ...]] = set()
    for path in paths:
        if tuple(path) in seen:
            raise NanoMedusaError(f"Tree path {path} is listed twice; list each path once.")
        seen.add(tuple(path))
    for path in paths:
        for cut in range(1, len(path)):
            if tuple(path[:cut]) not in seen:
                raise NanoMedusaError(
                    f"Tree path {path} needs its prefix {path[:cut]} in the tree too; add it."
                )
    return paths


def parse_tree(spec: str | Sequence[Sequence[int]]) -> list[list[int]]:
    """Checked paths from a preset name, a JSON list string, a .json file path or a list of paths.

    The result is a fresh list (callers may mutate it) in the order given, not yet in node order.
    """
    if not isinstance(spec, str):
        return _check_paths(spec)
    if spec in PRESETS:
        return _check_paths(PRESETS[spec])
    text = spec.strip()
    if not text.startswith("["):
        if not (text.endswith(".json") or os.path.isfile(text)):
            raise NanoMedusaError(f"Unknown tree {spec!r}; pass {_SPEC_FORMS}.")
        if not os.path.isfile(text):
            what = "is a directory, not a file" if os.path.isdir(text) else "does not exist"
            raise NanoMedusaError(f"Tree file {spec!r} {what}; pass {_SPEC_FORMS}.")
        text = read_utf8(text)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise NanoMedusaError(
            f"Tree {spec!r} is not valid JSON ({err.msg} at char {err.pos}); pass {_SPEC_FORMS}."
        ) from None
    return _check_paths(raw)


def lineages(paths: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each node's lineage, the node ids from the root down to it, for a tree given as its nodes' paths
    (`paths[i]` is node i's, the root's [] among them, every prefix present: as `TreeBuffers.paths`)."""
    node_of = {tuple(path): node for node, path in enumerate(paths)}
    return [[node_of[tuple(path[:d])] for d in range(len(path) + 1)] for path in paths]


def cut_to_depth(paths: list[list[int]], depth: int) -> list[list[int]]:
    """The paths at most `depth` deep: a tree fitted to K heads (a path of length d needs heads 0..d-1).
    Cutting keeps the tree ancestor-closed, since a path's prefixes are shorter than it."""
    return [p for p in paths if len(p) <= depth]


@dataclass(frozen=True, eq=False)
class TreeBuffers:
    """Index tensors for one tree, built once by `from_choices`. T = num_nodes, P = leaf count."""

    paths: list[list[int]] | None  # node i's path in node order, paths[0] == [] the root; None for a
    # dynamic tree's step (dynamic_tree.py), chosen on the device
    num_nodes: int  # T = len(choices) + 1
    depth_max: int  # longest path = number of heads the tree uses
    topk: int  # 1 + largest top-k index in any path = candidates needed per head
    attn_mask: torch.Tensor  # [T, T] bool: row i is True at node i and its ancestors
    depths: torch.Tensor  # [T] long, root 0: rope position offsets past the committed tokens
    parents: torch.Tensor  # [T] long, root's parent is 0
    tree_indices: torch.Tensor  # [T] long: each node's slot in the pool (see candidate_tokens)
    retrieve_indices: torch.Tensor  # [P, depth_max + 1] long: root..leaf node ids, -1 padded right

    @classmethod
    def from_choices(
        cls, choices: Sequence[Sequence[int]], device: torch.device | str | None = None,
        vocab_size: int | None = None,
    ) -> TreeBuffers:
        """Build the buffers from paths in any order (e.g. from `parse_tree`); with `vocab_size`, a tree
        asking for more guesses per head than the vocabulary holds is refused.

        Retrieve rows are ordered by their leaf's path, lexicographically: row 0 always takes the
        best-ranked child, so argmax over equally long acceptances prefers likelier guesses.
        """
        paths = [[]] + sorted(_check_paths(choices), key=_node_order)
        num_nodes = len(paths)
        lineage = lineages(paths)  # lineage[i] = node ids root..i
        parents = [0] + [line[-2] for line in lineage[1:]]
        depth_max = max(len(path) for path in paths)
        topk = 1 + max(max(path) for path in paths[1:])
        if vocab_size is not None and topk > vocab_size:
            raise NanoMedusaError(
                f"The tree uses rank {topk - 1} but the vocabulary has only {vocab_size} tokens; "
                f"use ranks below {vocab_size}."
            )
        tree_indices = [0] + [1 + (len(path) - 1) * topk + path[-1] for path in paths[1:]]

        attn_mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
        for node, line in enumerate(lineage):
            attn_mask[node, line] = True

        leaves = sorted(set(range(1, num_nodes)) - set(parents), key=lambda n: paths[n])
        retrieve = [lineage[n] + [-1] * (depth_max + 1 - len(lineage[n])) for n in leaves]

        def long(rows: list) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.long, device=device)

        return cls(
            paths=paths,
            num_nodes=num_nodes,
            depth_max=depth_max,
            topk=topk,
            attn_mask=attn_mask.to(device),
            depths=long([len(path) for path in paths]),
            parents=long(parents),
            tree_indices=long(tree_indices),
            retrieve_indices=long(retrieve),
        )

    @property
    def key(self) -> tuple:
        """What makes two trees the same (for caching the step's CUDA graph): their paths."""
        return tuple(map(tuple, self.paths))

    def to(self, device: torch.device | str) -> TreeBuffers:
        """A copy with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def candidate_tokens(self, root_token: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Lay the guesses out on the tree: root_token [] or [1], topk_ids [K, k] (each head's
        top-k token ids, best first) -> tree tokens [T]. Heads past depth_max and ranks past topk
        are not used."""
        k = topk_ids.shape[1]  # (generate_medusa checks up front that there are depth_max heads)
        if k < self.topk:
            raise NanoMedusaError(
                f"The tree uses top-{self.topk} candidates per head but only {k} were given; "
                f"take top-{self.topk} from each head."
            )
        guesses = topk_ids[: self.depth_max, : self.topk].reshape(-1)  # [depth_max * topk]
        root = root_token.reshape(1).to(topk_ids.dtype)  # [1]
        pool = torch.cat([root, guesses])  # [1 + depth_max * topk]
        return pool[self.tree_indices.to(pool.device)]  # [T]

    def accepted_path(self, best: torch.Tensor, accept_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieve row `best` [] with `accept_len` [] nodes accepted past the root -> the row's node ids
        [depth_max + 1] (root first; the -1 padding read as the root) and its last accepted node [1]."""
        path = self.retrieve_indices.index_select(0, best.view(1))[0].clamp(min=0)
        return path, path.gather(0, accept_len.view(1))


def tree_capacity(num_heads: int, topk: int) -> int:
    """How many nodes (root not counted) a tree over `num_heads` heads' top-`topk` guesses can hold at most."""
    return sum(topk**depth for depth in range(1, num_heads + 1))


def tree_from_head_accuracies(
    acc: Sequence[Sequence[float]] | torch.Tensor, num_nodes: int
) -> list[list[int]]:
    """The Medusa paper's greedy sparse tree: the `num_nodes` paths (root not counted, so the
    buffers get num_nodes + 1 nodes) with the largest expected acceptance, in node order.

    acc[d][i] is the probability that head d's rank-i guess is the right token ([K, topk], e.g.
    measured on held-out data). A path's expected contribution is the product of its heads'
    accuracies. Ties go to shorter, then lexicographically smaller paths.
    """
    bad_shape = NanoMedusaError(
        "Head accuracies must be a non-empty [num_heads, topk] table of probabilities; pass one."
    )
    try:
        table = torch.as_tensor(acc, dtype=torch.float64)  # [K, topk]
    except (TypeError, ValueError):
        raise bad_shape from None
    if table.dim() != 2 or table.numel() == 0:
        raise bad_shape
    if not bool(((table >= 0) & (table <= 1)).all()):
        raise NanoMedusaError("Head accuracies must be probabilities in [0, 1]; rescale them.")
    num_heads, topk = table.shape
    capacity = tree_capacity(num_heads, topk)
    if not 1 <= num_nodes <= capacity:
        raise NanoMedusaError(
            f"A tree over {num_heads} heads with top-{topk} has 1 to {capacity} nodes, not "
            f"{num_nodes}; ask for a size in that range."
        )
    rows = table.tolist()
    # Best-first search: scores only shrink along a path (accuracies <= 1), so popping the best
    # frontier path num_nodes times yields the num_nodes best paths, each after its parent.
    frontier = [(-rows[0][i], 1, [i]) for i in range(topk)]  # (-score, depth, path)
    heapq.heapify(frontier)
    chosen: list[list[int]] = []
    while len(chosen) < num_nodes:
        neg_score, depth, path = heapq.heappop(frontier)
        chosen.append(path)
        if depth < num_heads:
            for i in range(topk):
                heapq.heappush(frontier, (neg_score * rows[depth][i], depth + 1, path + [i]))
    return sorted(chosen, key=_node_order)


def expected_accept_length(acc: Sequence[Sequence[float]] | torch.Tensor, paths: Sequence[Sequence[int]]) -> float:
    """Expected tokens per step of a tree under the paper's model (each head's rank-i guess right with
    probability acc[d][i], independently): 1 for the bonus token plus, for each path, the chance that
    all its guesses are right."""
    table = torch.as_tensor(acc, dtype=torch.float64).tolist()
    return 1.0 + sum(math.prod(table[d][i] for d, i in enumerate(path)) for path in paths)

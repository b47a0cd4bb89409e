"""Tests for nanomedusa.tree: presets, parsing, the index buffers and the accuracy-driven tree.

Buffers are checked against facts recomputed here by walking path prefixes, not against the
module's own bookkeeping.
"""

import itertools
import json
import math

import pytest
import torch

from nanomedusa.errors import NanoMedusaError
from nanomedusa.tree import (
    PRESETS,
    TreeBuffers,
    chain,
    parse_tree,
    tree_from_head_accuracies,
)

REFERENCE_PRESETS = [
    "mc_sim_7b_63",
    "vicuna_7b_stage2",
    "vicuna_7b_stage1_ablation",
    "vicuna_7b_stage1",
    "vicuna_13b_stage2",
    "vicuna_13b_stage1",
    "vicuna_33b_stage2",
    "vicuna_33b_stage1",
    "zephyr_stage2",
]


def check_buffers(choices: list[list[int]], buf: TreeBuffers) -> None:
    """Every documented property of the buffers, recomputed from the paths alone."""
    paths = [()] + sorted((tuple(p) for p in choices), key=lambda p: (len(p), p))
    node_of = {p: i for i, p in enumerate(paths)}
    T = len(choices) + 1
    assert buf.num_nodes == T and [tuple(p) for p in buf.paths] == paths
    assert buf.depth_max == max(len(p) for p in paths)
    assert buf.topk == 1 + max(i for p in choices for i in p)

    assert buf.attn_mask.dtype == torch.bool and buf.attn_mask.shape == (T, T)
    for i, p in enumerate(paths):
        ancestors = {node_of[p[:cut]] for cut in range(len(p) + 1)}  # cut 0 is the root
        assert set(buf.attn_mask[i].nonzero().flatten().tolist()) == ancestors
    assert buf.depths.tolist() == [len(p) for p in paths]
    assert buf.parents.tolist() == [0] + [node_of[p[:-1]] for p in paths[1:]]

    leaves = {p for p in paths[1:] if not any(q[: len(p)] == p and q != p for q in paths)}
    assert buf.retrieve_indices.shape == (len(leaves), buf.depth_max + 1)
    row_leaves = []
    covered = set()
    for row in buf.retrieve_indices.tolist():
        nodes = [n for n in row if n >= 0]
        assert row == nodes + [-1] * (len(row) - len(nodes))  # padding only on the right
        assert nodes[0] == 0
        assert [len(paths[n]) for n in nodes] == list(range(len(nodes)))
        for parent, child in zip(nodes, nodes[1:]):
            assert paths[child][:-1] == paths[parent]
        row_leaves.append(paths[nodes[-1]])
        covered.update(nodes)
    assert sorted(row_leaves) == sorted(leaves)  # each leaf exactly once
    assert row_leaves == sorted(row_leaves)  # documented order: leaf paths, lexicographic
    assert covered == set(range(T))

    for i, p in enumerate(paths[1:], start=1):
        assert buf.tree_indices[i] == 1 + (len(p) - 1) * buf.topk + p[-1]
    assert buf.tree_indices[0] == 0


def test_reference_presets_ship_with_their_published_sizes():
    for name in REFERENCE_PRESETS:
        assert len(PRESETS[name]) == 63, name
        assert TreeBuffers.from_choices(PRESETS[name]).num_nodes == 64
    assert PRESETS["mc_sim_7b_63"][:5] == [[0], [0, 0], [1], [0, 1], [2]]
    for depth in range(1, 6):
        assert PRESETS[f"chain{depth}"] == chain(depth) == [[0] * d for d in range(1, depth + 1)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_buffers_match_prefix_walk(name):
    choices = parse_tree(name)
    assert choices == PRESETS[name]
    check_buffers(choices, TreeBuffers.from_choices(choices))


def test_docstring_example_exactly():
    buf = TreeBuffers.from_choices([[0, 1], [1], [0, 0], [0]])  # order given does not matter
    assert buf.attn_mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    assert buf.depths.tolist() == [0, 1, 1, 2, 2]
    assert buf.parents.tolist() == [0, 0, 0, 1, 1]
    assert buf.tree_indices.tolist() == [0, 1, 2, 3, 4]
    assert buf.retrieve_indices.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, -1]]


def random_tree(gen: torch.Generator, size: int, depth: int, topk: int) -> list[list[int]]:
    """A random valid tree: grow by attaching a random new child to a random existing node."""
    paths = [()]
    while len(paths) < size + 1:
        parent = paths[int(torch.randint(len(paths), (1,), generator=gen))]
        child = parent + (int(torch.randint(topk, (1,), generator=gen)),)
        if len(child) <= depth and child not in paths:
            paths.append(child)
    return [list(p) for p in paths[1:]]


def test_random_trees_match_prefix_walk():
    gen = torch.Generator().manual_seed(0)  # (seeded: a failure can be run again)
    for _ in range(50):
        size = int(torch.randint(1, 30, (1,), generator=gen))
        choices = random_tree(gen, size, depth=5, topk=4)
        check_buffers(choices, TreeBuffers.from_choices(choices))


@pytest.mark.parametrize("name", ["mc_sim_7b_63", "vicuna_33b_stage1", "chain3"])
def test_candidate_tokens_read_each_heads_ranked_guess(name):
    buf = TreeBuffers.from_choices(PRESETS[name])
    K, k = buf.depth_max + 1, buf.topk + 2  # spare heads and ranks must be ignored
    head_topk = torch.randperm(50_000)[: K * k].view(K, k)  # distinct ids: a wrong slot shows
    root = torch.randint(50_000, 60_000, ())
    for root_token in (root, root.reshape(1)):
        tokens = buf.candidate_tokens(root_token, head_topk)
        assert tokens.shape == (buf.num_nodes,)
        assert tokens[0] == root
        for node, path in enumerate(buf.paths[1:], start=1):
            assert tokens[node] == head_topk[len(path) - 1, path[-1]]


def test_candidate_tokens_errors():
    buf = TreeBuffers.from_choices(PRESETS["mc_sim_7b_63"])  # 4 deep, top-10
    with pytest.raises(NanoMedusaError, match="top-10 candidates per head but only 5"):
        buf.candidate_tokens(torch.tensor(1), torch.zeros(4, 5, dtype=torch.long))


def test_to_moves_every_tensor():
    moved = TreeBuffers.from_choices(PRESETS["chain4"]).to("meta")
    tensors = [v for v in vars(moved).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 5 and all(t.device.type == "meta" for t in tensors)
    assert moved.num_nodes == 5


def test_parse_forms(tmp_path):
    spec = [[0], [1], [0, 0]]
    assert parse_tree(json.dumps(spec)) == spec
    assert parse_tree(" [[0], [0,0]] ") == [[0], [0, 0]]
    assert parse_tree([(0,), (0, 0)]) == [[0], [0, 0]]  # the reference's tuple form
    f = tmp_path / "tree.json"
    f.write_text(json.dumps(spec))
    assert parse_tree(str(f)) == spec
    got = parse_tree("chain2")
    got.append([1])
    assert PRESETS["chain2"] == [[0], [0, 0]]  # callers get a copy


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mc_sim_7b_64", r"Unknown tree 'mc_sim_7b_64'; pass a preset name \(mc_sim_7b_63, "),
        ("[[0], [0,", r"is not valid JSON .*; pass a preset name .*'\[\[0\],\[0,0\],\[1\]\]'"),
        ("no/such/tree.json", r"Tree file 'no/such/tree.json' does not exist; pass a preset"),
        ("[]", r"A tree must be a non-empty list of paths; pass a preset name"),
        ("[0, 1]", r"Tree entry 0 is not a non-empty list of top-k indices"),
        ("[[0], [0, -1]]", r"Tree path \[0, -1\] must hold non-negative integers"),
        ("[[0], [1.0]]", r"Tree path \[1.0\] must hold non-negative integers"),
        ("[[0], [1], [0]]", r"Tree path \[0\] is listed twice; list each path once\."),
        ("[[0], [0, 1, 2]]", r"Tree path \[0, 1, 2\] needs its prefix \[0, 1\] in the tree too"),
        ("[[0, 0]]", r"Tree path \[0, 0\] needs its prefix \[0\] in the tree too; add it\."),
        ("[[16]]", r"Tree path \[16\] uses rank 16 but the heads give at most their top-16 guesses \(ranks 0 to 15\)"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(NanoMedusaError, match=message):
        parse_tree(spec)


def test_a_tree_file_that_is_a_directory_is_not_called_missing(tmp_path):
    (tmp_path / "tree.json").mkdir()
    with pytest.raises(NanoMedusaError, match=r"Tree file '.*tree.json' is a directory, not a file; pass a preset"):
        parse_tree(str(tmp_path / "tree.json"))


def test_tree_ranks_must_fit_the_vocabulary():
    assert TreeBuffers.from_choices([[0], [1], [2]], vocab_size=3).topk == 3
    with pytest.raises(NanoMedusaError, match="The tree uses rank 3 but the vocabulary has only 3 tokens; use ranks below 3"):
        TreeBuffers.from_choices([[0], [3]], vocab_size=3)


def test_tree_file_that_is_not_utf8(tmp_path):
    (tmp_path / "t.json").write_bytes(b"[[0]] \xff")
    with pytest.raises(NanoMedusaError, match=r"t.json is not UTF-8 text \(byte 0xff at offset 6\)"):
        parse_tree(str(tmp_path / "t.json"))


def test_accuracies_with_one_strong_guess_give_a_chain():
    acc = [[0.9, 0.05, 0.02], [0.9, 0.04, 0.03], [0.9, 0.05, 0.01]]
    assert tree_from_head_accuracies(acc, 3) == [[0], [0, 0], [0, 0, 0]]
    # 0.9^3 = 0.729 still beats every second-rank guess; the fourth pick is then the best 0.05.
    assert tree_from_head_accuracies(torch.tensor(acc), 4) == [[0], [1], [0, 0], [0, 0, 0]]


def test_accuracy_ties_prefer_shorter_then_smaller_paths():
    acc = [[0.5, 0.25], [0.5, 0.25]]  # dyadic, so products tie exactly: [1] and [0, 0] both 0.25
    assert tree_from_head_accuracies(acc, 2) == [[0], [1]]
    assert tree_from_head_accuracies(acc, 3) == [[0], [1], [0, 0]]
    # [0, 1] and [1, 0] tie at 0.125: lexicographic order picks [0, 1].
    assert tree_from_head_accuracies(acc, 4) == [[0], [1], [0, 0], [0, 1]]
    assert tree_from_head_accuracies(acc, 6) == [[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]]


def test_accuracy_tree_is_the_best_valid_tree_of_that_size():
    gen = torch.Generator().manual_seed(0)  # (seeded: a failure can be run again)
    for _ in range(20):
        K, k = (int(x) for x in torch.randint(1, 5, (2,), generator=gen))
        acc = torch.rand(K, k, generator=gen, dtype=torch.float64)
        every = [list(p) for d in range(1, K + 1) for p in itertools.product(range(k), repeat=d)]
        n = int(torch.randint(1, len(every) + 1, (1,), generator=gen))
        tree = tree_from_head_accuracies(acc, n)
        assert len(tree) == n and parse_tree(tree) == tree
        assert tree == sorted(tree, key=lambda p: (len(p), p))  # node order
        score = {tuple(p): math.prod(acc[d, i].item() for d, i in enumerate(p)) for p in every}
        kept = min(score[tuple(p)] for p in tree)
        dropped = [s for p, s in score.items() if list(p) not in tree]
        assert all(s <= kept for s in dropped)
        check_buffers(tree, TreeBuffers.from_choices(tree))


@pytest.mark.parametrize(
    "acc, n, message",
    [
        ([[0.5, 0.2]], 3, r"has 1 to 2 nodes, not 3; ask for a size in that range\."),
        ([[0.5, 0.2]], 0, r"has 1 to 2 nodes, not 0"),
        ([[0.5, 1.2]], 1, r"must be probabilities in \[0, 1\]; rescale them\."),
        ([[0.5], [0.2, 0.1]], 1, r"must be a non-empty \[num_heads, topk\] table"),
        ([0.5, 0.2], 1, r"must be a non-empty \[num_heads, topk\] table"),
    ],
)
def test_accuracy_errors(acc, n, message):
    with pytest.raises(NanoMedusaError, match=message):
        tree_from_head_accuracies(acc, n)

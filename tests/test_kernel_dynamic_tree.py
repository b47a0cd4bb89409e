"""The dynamic tree's choice and layout kernels against their torch references (kernels/dynamic_tree.py).

Both outputs are integers, so they must match exactly, on random supersets, budgets and log-probabilities,
half of them small integers whose sums tie often and exactly (ties go to the smaller node in both), with
every buffer the kernels allocate poisoned. The references themselves are checked against plain Python and
TreeBuffers.from_choices in tests/test_dynamic_tree.py. How many kernels a dynamic step's choice launches
is pinned there too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels/ is imported: see tests/conftest.py

import pytest  # noqa: E402

from kernels.dynamic_tree import tree_choice_triton  # noqa: E402
from kernels.errors import KernelInputError  # noqa: E402
from kernels.testing import check_tree_choice, check_tree_layout  # noqa: E402
from nanomedusa.dynamic_tree import DynamicTree  # noqa: E402
from tests.test_dynamic_tree import random_cases  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tables(tree: DynamicTree):
    s = tree.superset
    return s.parents, s.depths, s.tree_indices, tree.children, tree.lineage, tree.path_order


def test_choice_and_layout_match_the_references():
    for case, (tree, ids, logprobs) in enumerate(random_cases(24)):
        tree = tree.to(DEVICE)
        ids, logprobs = ids.to(DEVICE), logprobs.float().to(DEVICE)
        root = torch.tensor(4321, device=DEVICE)
        tokens, nodes = check_tree_choice(root, ids, logprobs, tree.ranks, tree.num_nodes)
        check_tree_layout(nodes, *tables(tree))


def test_the_heads_real_sizes():
    # A 256-node superset four heads deep, top-10 (the shipped heads' accuracy tree), budgets up to 128;
    # strided inputs as propose passes them ([K, 1, k] sliced to [K, k]).
    from nanomedusa.heads import HeadsConfig

    gen = torch.Generator().manual_seed(3)
    for nodes_budget in (2, 16, 128):
        tree = DynamicTree.for_heads(HeadsConfig(4, 1, 8, 100), nodes_budget, device=DEVICE)
        logprobs = torch.randn(4, 1, 10, generator=gen).log_softmax(-1).sort(-1, descending=True).values
        ids = torch.randperm(100, generator=gen)[:40].view(4, 1, 10)
        _, nodes = check_tree_choice(torch.tensor(7, device=DEVICE), ids.to(DEVICE)[:, 0],
                                     logprobs.to(DEVICE)[:, 0], tree.ranks, tree.num_nodes)
        check_tree_layout(nodes, *tables(tree))


def test_equal_scores_go_to_the_smaller_node():
    # Every log-probability 0 (clamped from just above): all scores tie, so the choice is the first N nodes.
    tree = DynamicTree.from_choices([[1], [0], [0, 0], [0, 0, 0], [1, 0]], 4).to(DEVICE)
    logprobs = torch.tensor([[1e-7, 0.0], [0.0, -0.0], [0.0, 0.0]], device=DEVICE)
    ids = torch.arange(6, device=DEVICE).view(3, 2)
    tokens, nodes = check_tree_choice(torch.tensor(9, device=DEVICE), ids, logprobs, tree.ranks, 4)
    assert nodes.tolist() == [0, 1, 2, 3] and tokens.tolist() == [9, 0, 1, 2]


def test_bad_inputs_name_the_fix():
    tree = DynamicTree.from_choices([[0], [1], [0, 0]], 3)
    with pytest.raises(KernelInputError, match=r"same \[K >= 2, k\] shape"):
        tree_choice_triton(torch.tensor(0), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), tree.ranks, 3)

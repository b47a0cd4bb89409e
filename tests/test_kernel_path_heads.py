"""The path-reading proposal's kernels against their torch references (kernels/path_heads.py): the parents' head
inputs (float32 and float16 everywhere, bfloat16 on a GPU; hidden as one row or one per parent, paths of 1-4
tokens, 1 to 40 parents) and the guesses' placement (integers: exactly). Decoding with them end to end:
tests/test_path_tree.py."""

import os
import re

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels/ is imported: see tests/conftest.py

import pytest  # noqa: E402

from kernels.dynamic_tree import tree_choice_reference, tree_choice_triton  # noqa: E402
from kernels.errors import KernelInputError  # noqa: E402
from kernels.path_heads import (path_input_reference, path_input_triton, place_guesses_reference,  # noqa: E402
                                place_guesses_triton)
from nanomedusa.dynamic_tree import DynamicTree  # noqa: E402
from nanomedusa.path_tree import PathPlan  # noqa: E402
from tests.test_medusa import SUPERSET  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # bf16: not in the interpreter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parents,depth,one_hidden", [(1, 1, True), (5, 2, True), (17, 3, False), (40, 4, True)])
def test_path_input_matches_the_reference(dtype, parents, depth, one_hidden):
    gen = torch.Generator().manual_seed(parents * 10 + depth)
    V, D, M = 53, 96, 64  # D: a K loop of two steps, the second cut short

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)

    hidden = randn(1 if one_hidden else parents, D)
    embed, proj = randn(V, D), randn(D, depth * D, scale=D ** -0.5)
    tokens = torch.randint(0, V, (M,), generator=gen).to(DEVICE)
    lineage = torch.randint(0, M, (parents, depth), generator=gen).to(DEVICE)
    expected = path_input_reference(hidden.float(), tokens, lineage, embed.float(), proj.float())
    got = path_input_triton(hidden, tokens, lineage, embed, proj)
    assert got.shape == (parents, D) and got.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert torch.allclose(got.float(), expected, atol=tol, rtol=tol), (got.float() - expected).abs().max()


def test_path_input_refuses_a_projection_of_another_depth():
    hidden, embed = torch.zeros(1, 8, device=DEVICE), torch.zeros(5, 8, device=DEVICE)
    lineage = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(KernelInputError, match="must be \\[D=8, 3 \\* D\\]"):
        path_input_triton(hidden, torch.zeros(4, dtype=torch.long, device=DEVICE), lineage, embed,
                          torch.zeros(8, 16, device=DEVICE))


@pytest.mark.parametrize("with_logprobs", [False, True])
def test_place_guesses_matches_the_reference(with_logprobs):
    gen = torch.Generator().manual_seed(1)
    M, P, topk, C = 40, 6, 5, 23
    ids = torch.randint(0, 1000, (P, topk), generator=gen).to(DEVICE)
    id_logprobs = -torch.rand(P, topk, generator=gen).to(DEVICE)
    children = torch.randperm(M - 1, generator=gen)[:C].add(1).to(DEVICE)
    parent_row = torch.randint(0, P, (C,), generator=gen).to(DEVICE)
    rank = torch.randint(0, topk, (C,), generator=gen).to(DEVICE)
    outs = []
    for place in (place_guesses_reference, place_guesses_triton):
        tokens = torch.full((M,), 7, dtype=torch.long, device=DEVICE)
        logprobs = torch.zeros(M, device=DEVICE) if with_logprobs else None
        place(tokens, logprobs, ids, id_logprobs if with_logprobs else None, children, parent_row, rank)
        outs.append((tokens, logprobs))
    assert torch.equal(outs[0][0], outs[1][0])
    assert not with_logprobs or torch.equal(outs[0][1], outs[1][1])


def strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view of stride 2 (every other element of a longer tensor, the rest garbage)."""
    return torch.stack([t, torch.full_like(t, 99)], -1)[..., 0]


def test_path_input_reads_strided_tokens_as_they_are():
    gen = torch.Generator().manual_seed(3)
    V, D, P, depth, M = 30, 16, 3, 2, 7
    hidden, embed = torch.randn(1, D, generator=gen).to(DEVICE), torch.randn(V, D, generator=gen).to(DEVICE)
    proj = torch.randn(D, depth * D, generator=gen).to(DEVICE)
    tokens = torch.randint(0, V, (M,), generator=gen).to(DEVICE)
    lineage = torch.randint(0, M, (P, depth), generator=gen).to(DEVICE)
    got = path_input_triton(hidden, strided(tokens), lineage, embed, proj)
    assert torch.allclose(got, path_input_reference(hidden, tokens, lineage, embed, proj), atol=1e-4, rtol=1e-4)


def test_place_guesses_reads_strided_indices_as_they_are():
    # Strided children were read as every other element: wrong nodes written, or past the end of tokens.
    ids, id_logprobs = torch.arange(100, 109, device=DEVICE).view(3, 3), -torch.rand(3, 3, device=DEVICE)
    children, parent_row, rank = (torch.tensor(v, device=DEVICE) for v in ([1, 2, 3], [0, 1, 2], [0, 2, 1]))
    outs = []
    for place, index in ((place_guesses_reference, lambda t: t), (place_guesses_triton, strided)):
        tokens, logprobs = torch.zeros(7, dtype=torch.long, device=DEVICE), torch.zeros(7, device=DEVICE)
        place(tokens, logprobs, ids, id_logprobs, index(children), index(parent_row), index(rank))
        outs.append((tokens, logprobs))
    assert outs[0][0].tolist() == outs[1][0].tolist() == [0, 100, 105, 107, 0, 0, 0]
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("output", ["tokens", "logprobs"])
def test_place_guesses_refuses_a_strided_output(output):
    ids, id_logprobs = torch.zeros(3, 3, dtype=torch.long, device=DEVICE), torch.zeros(3, 3, device=DEVICE)
    index = torch.zeros(3, dtype=torch.long, device=DEVICE)
    outs = {"tokens": torch.zeros(7, dtype=torch.long, device=DEVICE), "logprobs": torch.zeros(7, device=DEVICE)}
    outs[output] = strided(outs[output])
    with pytest.raises(KernelInputError, match=re.escape(f"place_guesses writes {output} in place and takes it 1-D "
                                                         f"and contiguous, not shaped (7,) with strides (2,)")):
        place_guesses_triton(outs["tokens"], outs["logprobs"], ids, id_logprobs, index, index, index)


@pytest.mark.parametrize("nodes", [1, 7, 40])
def test_the_choice_kernel_reads_guesses_by_node(nodes):
    # A dynamic tree over path-reading heads reuses the choice kernel with node ids where ranks were and each
    # node's own guess and log-probability broadcast over the depths (path_tree.choose_by_path_scores).
    gen = torch.Generator().manual_seed(nodes)
    tree = DynamicTree.from_choices(SUPERSET, nodes)
    node_paths = PathPlan.from_paths(tree.superset.paths, tree.depth_max, DEVICE).node_paths
    M, depth = node_paths.shape
    tokens = torch.randint(0, 1000, (M,), generator=gen).to(DEVICE)
    logprobs = (-torch.randint(0, 3, (M,), generator=gen).float()).to(DEVICE)  # ties, often and exactly
    args = (tokens[0], tokens.expand(depth, -1), logprobs.expand(depth, -1), node_paths, nodes)
    expected, got = tree_choice_reference(*args), tree_choice_triton(*args)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])

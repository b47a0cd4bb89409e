"""The Triton acceptance kernel against its torch reference (kernels/acceptance.py).

Without a GPU the kernel runs in Triton's CPU interpreter (fp32 and fp16 logits; bf16 only on CUDA,
as it is broken in the interpreter). Trees are random: node j hangs under a random earlier node, and
the retrieve rows come out shuffled. Tokens are set to their parent's argmax for a random subset of
nodes, so paths really get accepted. The scratch flags and outputs are poisoned before each run.
"""

import os
import random

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, i.e. when triton and kernels/
    # are imported: this must be set before those imports.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from kernels import acceptance  # noqa: E402
from kernels.errors import KernelInputError  # noqa: E402
from kernels.testing import acceptance_inputs, check_acceptance, random_parents, retrieve_from_parents  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
V = 257


def random_case(seed, dtype=torch.float32, V=V, num_nodes=None, **kwargs):
    """(logits [T, V], tokens [T], retrieve [P, Dp], parents) of a random tree of 1..13 nodes."""
    rng = random.Random(seed)
    parents = random_parents(num_nodes or rng.randint(1, 13), rng.randint(1, 4), rng)
    logits, tokens = acceptance_inputs(parents, V, dtype, DEVICE, generator=torch.Generator().manual_seed(seed),
                                       **kwargs)
    return logits, tokens, retrieve_from_parents(parents, rng), parents


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", acceptance.MODES)
def test_random_trees_match_reference(mode, dtype):
    accepted = 0
    for seed in range(8):
        logits, tokens, retrieve, _ = random_case(seed, dtype)
        accepted += check_acceptance(logits, tokens, retrieve, mode)[1]
    assert accepted > 0  # the cases must exercise acceptance, not just rejection


def test_everything_accepted_picks_first_deepest_path_when_greedy():
    logits, tokens, retrieve, _ = random_case(1, num_nodes=13, accept_prob=1.0, scale=10.0)
    depths = (retrieve >= 0).sum(1) - 1
    assert check_acceptance(logits, tokens, retrieve, "greedy") == (int(depths.argmax()), int(depths.max()))


# Two branches, root -> 1 -> 3 and root -> 2 -> 4 (tokens 0, 1, 0, x), over 4 tokens. Worked by hand at
# temperature 1, eps 0.09, alpha 0.3: under the root p = (0.3, 0.6, 0.05, 0.05), H = 0.97, so the threshold
# is min(0.09, 0.3 * exp(-0.97) = 0.11) = 0.09 and both branches pass; under nodes 1 and 2
# p = (0.5, 0.3, 0.15, 0.05), H = 1.14, threshold min(0.09, 0.096) = 0.09: token 0 passes, token 3 fails.
TWO_BRANCHES = torch.tensor([[0, 1, 3], [0, 2, 4]])


def two_branch_logits(root_probs):
    node = [0.5, 0.3, 0.15, 0.05]
    return torch.log(torch.tensor([root_probs, node, node, node, node])).to(DEVICE)  # [T=5, V=4]


@pytest.mark.parametrize("last_token, expected", [
    (0, (1, 2)),  # both rows accepted 2 deep: the likelier, row 1 (log 0.6 + log 0.5 > log 0.3 + log 0.5)
    (3, (0, 2)),  # row 1 stops after 1 node: the longer row 0 wins, although row 1 starts likelier
])
def test_typical_keeps_the_likeliest_of_the_longest(last_token, expected):
    tokens = torch.tensor([0, 0, 1, 0, last_token], device=DEVICE)
    logits = two_branch_logits([0.3, 0.6, 0.05, 0.05])
    assert check_acceptance(logits, tokens, TWO_BRANCHES, "typical") == expected


def test_typical_equally_likely_rows_take_the_first():
    tokens = torch.tensor([0, 0, 1, 0, 0], device=DEVICE)
    assert check_acceptance(two_branch_logits([0.45, 0.45, 0.05, 0.05]), tokens, TWO_BRANCHES, "typical") == (0, 2)


@pytest.mark.parametrize("mode", acceptance.MODES)
def test_everything_rejected(mode):
    logits, _, retrieve, parents = random_case(3, num_nodes=13, scale=10.0)
    tokens = logits.argmin(-1)[parents]  # the least likely token under each parent
    assert check_acceptance(logits, tokens, retrieve, mode) == (0, 0)


@pytest.mark.parametrize("mode", acceptance.MODES)
def test_root_only_tree(mode):
    logits, tokens = torch.randn(1, V, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
    assert check_acceptance(logits, tokens, torch.zeros(1, 1, dtype=torch.long), mode) == (0, 0)


def test_greedy_ties_take_the_first_maximum():
    # Logits from {0, 1, 2}: every row has tied maxima; tokens pick among the tied ones, so only
    # "the first maximum wins" (torch.argmax) matches the reference.
    accepted = 0
    for seed in range(6):
        logits, _, retrieve, parents = random_case(seed, V=16, num_nodes=13)
        logits = torch.randint(0, 3, logits.shape, generator=torch.Generator().manual_seed(seed)).float().to(DEVICE)
        tied = (logits == logits.max(-1, keepdim=True).values).float()[parents]  # [T, V]: ties under the parent
        tokens = torch.multinomial(tied.cpu(), 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1).to(DEVICE)
        accepted += check_acceptance(logits, tokens, retrieve, "greedy")[1]
    assert accepted > 0


@pytest.mark.parametrize("temperature, eps, alpha, scale", [
    (1.0, 0.09, 0.3, 0.0),      # uniform logits: maximal entropy, every token has p = 1/V
    (1.0, 0.09, 0.3, 1000.0),   # huge logits: one-hot softmax, the online softmax must not overflow
    (1e-5, 0.09, 0.3, 3.0),     # the engine's floor for greedy-like temperatures
    (0.5, 1e-4, 0.3, 3.0),      # eps binds: the threshold is eps, not alpha * exp(-H)
    (1.7, 0.5, 0.05, 1.0),      # flat, hot distribution: alpha * exp(-H) binds
])
def test_typical_edge_cases(temperature, eps, alpha, scale):
    for seed in range(2):
        logits, tokens, retrieve, _ = random_case(seed, scale=scale, accept_prob=0.5, num_nodes=9)
        check_acceptance(logits, tokens, retrieve, "typical", temperature, eps, alpha)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_typical_threshold_is_computed_exactly(temperature):
    # A chain root -> 1 -> ... -> 5 over 5000 logits (two slices). Each token's probability sits
    # 0.5-2% from its parent's threshold: above it, except at node 4, so accept_len must be 3.
    # A threshold off by more than that (say, without the +1e-5 inside the log) shows.
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits / temperature, dim=-1)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
    ratio = probs / torch.clamp(0.3 * torch.exp(-entropy), max=0.09)[:, None]  # [6, V]: p / threshold
    tokens = [0]
    for parent in range(5):
        lo, hi = (0.98, 0.995) if parent == 3 else (1.005, 1.02)
        tokens.append(int(((ratio[parent] > lo) & (ratio[parent] < hi)).nonzero()[0]))
    tokens = torch.tensor(tokens, device=DEVICE)
    chain = torch.arange(6)[None]
    assert check_acceptance(logits.to(DEVICE), tokens, chain, "typical", temperature) == (0, 3)


@pytest.mark.parametrize("mode", acceptance.MODES)
def test_vocab_in_many_slices(mode, monkeypatch):
    # 64-wide slices: 257 logits take 5 slices, the last with one column (online softmax, argmax scan).
    monkeypatch.setattr(acceptance, "BLOCK_V", 64)
    for seed in range(4):
        logits, tokens, retrieve, _ = random_case(seed, num_nodes=9)
        check_acceptance(logits, tokens, retrieve, mode)


@pytest.mark.parametrize("mode", acceptance.MODES)
def test_a_row_whose_first_slices_are_masked(mode, monkeypatch):
    # Banned tokens (-inf) filling a row's first slices left the online softmax's max at -inf, and exp(-inf - -inf)
    # made the typical rule's p NaN: every guess refused where the reference accepts.
    monkeypatch.setattr(acceptance, "BLOCK_V", 64)
    chain = torch.tensor([[0, 1, 2]])
    for masked in (64, 128, 200):
        logits = torch.randn(3, V, generator=torch.Generator().manual_seed(masked))
        logits[:, :masked] = float("-inf")
        tokens = torch.cat([torch.zeros(1, dtype=torch.long), logits[:2].argmax(-1)])
        assert check_acceptance(logits.to(DEVICE), tokens.to(DEVICE), chain, mode, 0.7, eps=0.3, alpha=1e-4) == (0, 2)


def test_arrival_counter_is_left_at_zero():
    logits, tokens, retrieve, _ = random_case(5)
    check_acceptance(logits, tokens, retrieve, "greedy")
    assert acceptance._arrival_counter(logits.device).item() == 0


def test_unknown_mode_and_draws_without_sample_mode():
    logits, tokens, retrieve, _ = random_case(0)
    with pytest.raises(KernelInputError, match="unknown acceptance mode 'sampling'; use one of greedy, typical, sam"):
        acceptance.accept_candidates_triton(logits, tokens, retrieve.to(DEVICE), "sampling")
    for mode, drawn in (("sample", None), ("greedy", tokens)):
        with pytest.raises(KernelInputError, match="pass `drawn`"):
            acceptance.accept_candidates(logits, tokens, retrieve.to(DEVICE), mode, drawn=drawn)


@pytest.mark.parametrize("drawn, expected", [
    ([0, 0, 3, 3, 3], (0, 2)),  # the root drew 0 (node 1), node 1 drew 0 (node 3): row 0, two deep, where greedy
    ([0, 1, 3, 3, 3], (0, 1)),  # takes row 1; here node 1 drew 1, which neither of its children carries
    ([1, 3, 0, 3, 3], (1, 2)),  # the root drew 1 (node 2), node 2 drew 0 (node 4): row 1, two deep
    ([2, 0, 0, 3, 3], (0, 0)),  # the root drew a token no child carries
])
def test_sample_mode_follows_the_draws(drawn, expected):
    # TWO_BRANCHES' tokens: node 1 = 0, node 2 = 1 under the root; node 3 = 0 under node 1, node 4 = 0 under node 2.
    tokens = torch.tensor([0, 0, 1, 0, 0], device=DEVICE)
    logits = two_branch_logits([0.3, 0.6, 0.05, 0.05])  # argmax 1 everywhere: the draws, not it, decide
    drawn = torch.tensor(drawn, device=DEVICE)
    assert check_acceptance(logits, tokens, TWO_BRANCHES, "sample", drawn=drawn) == expected


@pytest.mark.parametrize("mode", ["greedy", "typical"])
def test_a_token_outside_the_vocabulary_is_refused(mode):
    # Node 1 (under the root) carries token V + 5 and node 3 (under node 2) token -1: the kernel read the logits
    # just past the root's row and just before node 2's (logits[1, 5] and logits[1, V - 1], made to win) and
    # accepted both; the typical reference raised an IndexError. Both refuse them now: row 1, node 2 alone.
    V = 16
    logits = 3 * torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    logits[1, 5] = logits[1, V - 1] = 50.0
    tokens = torch.tensor([0, V + 5, int(logits[0].argmax()), -1])
    retrieve = torch.tensor([[0, 1, -1], [0, 2, 3]])
    assert check_acceptance(logits.to(DEVICE), tokens.to(DEVICE), retrieve, mode) == (1, 1)

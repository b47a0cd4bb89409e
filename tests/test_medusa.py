"""Medusa decoding: greedy output identical to plain greedy decoding, cache identical, sampling lossless."""

import math

import pytest
import torch

from nanomedusa.errors import NanoMedusaError
from nanomedusa.generation import generate
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.medusa_generation import generate_medusa, speculative_accept
from nanomedusa.sampling import Sampling, target_probs
from nanomedusa.tree import PRESETS, TreeBuffers, chain
from tests.helpers import make_hf_checkpoint

TREES = {
    "chain1": chain(1),
    "chain3": chain(3),
    "chain5": chain(5),
    "small": [[0], [1], [0, 0], [0, 1], [2], [0, 0, 0]],
    "mc_sim_7b_63": [p for p in PRESETS["mc_sim_7b_63"] if len(p) <= 5],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, overrides in {"mha": {}, "gqa": dict(num_key_value_heads=2, vocab_size=61)}.items():
        path = tmp_path_factory.mktemp(name)
        make_hf_checkpoint(path, seed=len(name), **overrides)
        out[name] = load_model(path, device="cpu", dtype="float32")[0]
    return out


def random_heads(model, seed, num_heads=5):
    """Untrained heads with random ResBlocks: they guess badly, so most candidates are rejected."""
    heads = MedusaHeads.from_base(model, num_heads=num_heads, num_layers=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device) * 0.5)
    return heads.eval()


class OracleHeads:
    """Heads that know the future: they recognise the position from the hidden state they are given
    (by matching it against the hidden states of the plain greedy run) and rank the true tokens first."""

    def __init__(self, model, prompt, continuation, num_heads=5, vocab=97):
        seq = torch.tensor([prompt + continuation], device=model.device)
        with torch.no_grad():
            model.drop_cache()
            self.hidden = model.forward_hidden(seq)[0]  # [P+N, D], hidden at each position
        self.seq, self.vocab = seq[0].tolist(), vocab
        self.config = type("C", (), {"num_heads": num_heads})()

    def topk(self, hidden, k, lm_head_weight=None):
        pos = (self.hidden - hidden).norm(dim=-1).argmin().item()  # which position this hidden state is
        out = torch.zeros(self.config.num_heads, 1, k, dtype=torch.long)
        for head in range(self.config.num_heads):
            t = pos + 2 + head  # head k at position t predicts token t + k + 2
            true = self.seq[t] if t < len(self.seq) else 0
            others = [x for x in range(self.vocab) if x != true][: k - 1]
            out[head, 0] = torch.tensor([true] + others)
        return out.to(hidden.device)


CASES = [(model, tree, heads, seed) for model in ("mha", "gqa") for tree in TREES for heads in ("random", "base")
         for seed in range(3)]  # 2 x 5 x 2 x 3 = 60 combinations, plus the oracle cases below


@pytest.mark.parametrize("model_name,tree_name,heads_kind,seed", CASES)
def test_greedy_medusa_equals_greedy(models, model_name, tree_name, heads_kind, seed):
    model = models[model_name]
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
    heads = random_heads(model, seed) if heads_kind == "random" else MedusaHeads.from_base(model, num_heads=5).eval()
    tree = TreeBuffers.from_choices(TREES[tree_name])
    expected = generate(model, prompt, max_new_tokens=30).tokens
    got = generate_medusa(model, heads, tree, prompt, max_new_tokens=30)
    assert got.tokens == expected


@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_oracle_heads_accept_the_whole_depth(models, tree_name):
    model = models["mha"]
    prompt = [5, 17, 42, 8]
    expected = generate(model, prompt, max_new_tokens=40).tokens
    heads = OracleHeads(model, prompt, expected)
    tree = TreeBuffers.from_choices(TREES[tree_name])
    got = generate_medusa(model, heads, tree, prompt, max_new_tokens=40)
    assert got.tokens == expected
    # Every step accepts the full depth plus the bonus token, but the last may be cut by max_new_tokens.
    assert got.steps == math.ceil((40 - 1) / (tree.depth_max + 1))


def test_kv_cache_equals_plain_decoding(models):
    model = models["gqa"]
    prompt = [4, 9, 33, 12, 7]
    heads = random_heads(model, 1)
    got = generate_medusa(model, heads, TreeBuffers.from_choices(TREES["small"]), prompt, max_new_tokens=25)
    n = len(prompt) + len(got.tokens) - 1  # slots holding the prompt and every emitted token but the last
    medusa_cache = model.kv_cache[:, :, :, :, :n].clone()
    with torch.inference_mode():  # as generation runs: the cache it made (and this reuses) is an inference tensor
        model.setup_cache(64)
        model.kv_cache.zero_()
        model(torch.tensor([prompt + got.tokens[:-1]]), prefix_len=0)
    assert torch.allclose(medusa_cache, model.kv_cache[:, :, :, :, :n], atol=1e-5, rtol=1e-5)


def test_stops_at_eos_like_plain_decoding(models):
    model = models["mha"]
    prompt = [3, 14, 15, 92]
    plain = generate(model, prompt, max_new_tokens=30).tokens
    eos = plain[11]  # a token the run produces mid-way
    expected = generate(model, prompt, max_new_tokens=30, eos_ids=[eos]).tokens
    heads = OracleHeads(model, prompt, plain)
    got = generate_medusa(model, heads, TreeBuffers.from_choices(chain(5)), prompt, max_new_tokens=30, eos_ids=[eos])
    assert got.tokens == expected and got.tokens[-1] == eos


def test_tree_that_does_not_fit_is_a_clear_error(models):
    model = models["mha"]  # context 256
    heads = MedusaHeads.from_base(model, num_heads=5)
    tree = TreeBuffers.from_choices(TREES["mc_sim_7b_63"])
    with pytest.raises(NanoMedusaError, match=r"tree \(\d+ nodes\) = \d+ exceeds the model's context of 256"):
        generate_medusa(model, heads, tree, list(range(3, 60)), max_new_tokens=150)


def test_too_few_heads_for_the_tree_is_a_clear_error(models):
    model = models["mha"]
    heads = MedusaHeads.from_base(model, num_heads=2)
    with pytest.raises(NanoMedusaError, match="only 2 Medusa heads"):
        generate_medusa(model, heads, TreeBuffers.from_choices(chain(3)), [5, 6], max_new_tokens=5)


# --- speculative sampling -------------------------------------------------------------------------

def chi_square_bound(df: int) -> float:
    """Upper 0.1% point of the chi-square distribution (Wilson-Hilferty approximation, z = 3.09)."""
    z = 3.09
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count < 5 pooled into one; -> (statistic, df)."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, p in probs.items():
        exp, obs = n * p, counts.get(key, 0)
        if exp < 5:
            pooled_obs, pooled_exp = pooled_obs + obs, pooled_exp + exp
        else:
            stat, cells = stat + (obs - exp) ** 2 / exp, cells + 1
    if pooled_exp > 0:
        stat, cells = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, cells + 1
    assert sum(counts.values()) == n and set(counts) <= set(probs), "a sample fell outside the support"
    return stat, cells - 1


def test_rejection_sampling_at_one_node_is_exact():
    """One tree node with three children: whatever comes out (a child or a draw from the residual)
    must be distributed as the target p. 20000 draws, chi-square at the 0.1% level."""
    torch.manual_seed(0)
    tree = TreeBuffers.from_choices([[0], [1], [2]])
    logits = torch.randn(tree.num_nodes, 6) * 1.5  # [T, V]
    tokens = torch.tensor([0, 3, 1, 5])  # root, then the children's guesses
    sampling = Sampling(temperature=0.8, top_k=5)
    p = target_probs(logits[0], sampling)
    gen = torch.Generator().manual_seed(1)
    counts, n = {}, 20000
    for _ in range(n):
        path, bonus = speculative_accept(logits, tokens, tree, sampling, gen)
        first = tokens[path[1]].item() if len(path) > 1 else bonus.item()
        counts[first] = counts.get(first, 0) + 1
    stat, df = chi_square(counts, {t: p[t].item() for t in range(6) if p[t] > 0}, n)
    assert stat < chi_square_bound(df), (stat, df)


def test_speculative_sampling_matches_plain_sampling(tmp_path):
    """End to end on a 6-token vocabulary: the joint law of the first three generated tokens under
    Medusa sampling must equal the model's own (computed exactly by enumeration). 3000 runs; with
    up to 215 degrees of freedom, a correct sampler fails the 0.1% bound once in a thousand runs,
    while a biased one (e.g. accepting guesses without the rejection step) fails it every time."""
    make_hf_checkpoint(tmp_path, seed=3, vocab_size=6, num_key_value_heads=2)
    model = load_model(tmp_path, device="cpu", dtype="float32")[0]
    sampling = Sampling(temperature=1.0)
    prompt = [1, 4, 2]
    with torch.no_grad():  # exact probabilities of every 3-token continuation
        probs = {}
        model.drop_cache()
        p1 = target_probs(model(torch.tensor([prompt]))[0, -1], sampling)
        for a in range(6):
            p2 = target_probs(model(torch.tensor([prompt + [a]]))[0, -1], sampling)
            p3 = target_probs(model(torch.tensor([prompt + [a, b] for b in range(6)]))[:, -1], sampling)  # [6, V]
            for b in range(6):
                for c in range(6):
                    probs[(a, b, c)] = (p1[a] * p2[b] * p3[b, c]).item()
    heads = MedusaHeads.from_base(model, num_heads=2).eval()  # guesses that are often right: both paths run
    tree = TreeBuffers.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])
    counts, n, accepted = {}, 3000, 0
    for seed in range(n):
        gen = torch.Generator().manual_seed(seed)
        out = generate_medusa(model, heads, tree, prompt, max_new_tokens=3, sampling=sampling, accept="sample",
                              generator=gen)
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
        accepted += out.steps == 1
    stat, df = chi_square(counts, probs, n)
    assert stat < chi_square_bound(df), (stat, df)
    assert accepted > n // 10  # guesses were accepted often enough for the test to mean something


# --- typical acceptance ---------------------------------------------------------------------------

def test_typical_acceptance_rule_on_hand_made_distributions():
    from kernels.acceptance import accept_candidates_reference

    # Tree: root -> node 1 -> node 2 (a chain). Node 1 is judged under the root's logits, node 2 under node 1's.
    retrieve = torch.tensor([[0, 1, 2]])
    peaked = torch.log(torch.tensor([0.94, 0.02, 0.02, 0.02]))  # H ~ 0.29: threshold min(0.09, 0.3*0.75) = 0.09
    flat = torch.zeros(4)  # H = log 4: threshold min(0.09, 0.3/4 = 0.075) = 0.075, every token has 0.25
    cases = [
        (peaked, peaked, [0, 0, 0], 2),  # likely tokens everywhere: both accepted
        (peaked, peaked, [0, 0, 1], 1),  # node 2's token has p = 0.02 < 0.09: stop after node 1
        (peaked, peaked, [0, 3, 0], 0),  # node 1 rejected: nothing accepted, whatever follows
        (flat, flat, [0, 2, 3], 2),  # under a flat distribution any token passes (0.25 > 0.075)
    ]
    for root_logits, node_logits, tokens, expected in cases:
        logits = torch.stack([root_logits, node_logits, torch.zeros(4)])  # [T=3, V=4]
        best, n = accept_candidates_reference(logits, torch.tensor(tokens), retrieve, "typical", 1.0, 0.09, 0.3)
        assert (best.item(), n.item()) == (0, expected), tokens
    # A lower epsilon lets the p=0.02 token through: the threshold is min(eps, alpha*exp(-H)).
    logits = torch.stack([peaked, peaked, torch.zeros(4)])
    _, n = accept_candidates_reference(logits, torch.tensor([0, 0, 1]), retrieve, "typical", 1.0, 0.01, 0.3)
    assert n.item() == 2


def test_typical_acceptance_runs_end_to_end(models):
    model = models["mha"]
    heads = MedusaHeads.from_base(model, num_heads=3).eval()
    out = generate_medusa(model, heads, TreeBuffers.from_choices(TREES["small"]), [5, 6, 7], max_new_tokens=20,
                          sampling=Sampling(temperature=0.7), accept="typical",
                          generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 20 and out.mean_accepted >= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the compiled kernels need a GPU")
@pytest.mark.parametrize("tree_name", ["chain3", "small", "mc_sim_7b_63"])
def test_graphed_medusa_step_on_gpu_equals_greedy(tmp_path, tree_name):
    # On a GPU the whole Medusa step (forward, acceptance, compaction, next guesses) replays as one
    # CUDA graph with the Triton kernels: its output must still be plain greedy decoding's.
    make_hf_checkpoint(tmp_path, seed=3, num_key_value_heads=2)
    model = load_model(tmp_path, device="cuda", dtype="float32")[0]
    tree = TreeBuffers.from_choices(TREES[tree_name])
    for seed, prompt in enumerate(([5, 17, 42, 8], list(range(3, 40)))):
        expected = generate(model, prompt, max_new_tokens=60).tokens
        heads = random_heads(model, seed) if seed else MedusaHeads.from_base(model, num_heads=5).eval()
        assert generate_medusa(model, heads, tree, prompt, max_new_tokens=60).tokens == expected
        oracle = OracleHeads(model, prompt, expected)
        got = generate_medusa(model, oracle, tree, prompt, max_new_tokens=60, cuda_graphs=False)
        assert got.tokens == expected


@pytest.mark.parametrize("tree_name", ["chain3", "small"])
def test_triton_kernels_give_the_same_medusa_output(tmp_path, tree_name):
    # The whole decode on the Triton kernels (in the interpreter on a CPU; compiled on a GPU): RMSNorm,
    # RoPE + cache writes, SwiGLU, tree attention, fused heads, acceptance and compaction together must
    # give plain greedy decoding's output, as the torch references do.
    import kernels

    # Compiled kernels need CUDA tensors; the interpreter (CPU machines) runs them on CPU tensors.
    make_hf_checkpoint(tmp_path, seed=3, num_key_value_heads=2, vocab_size=61)
    model = load_model(tmp_path, device="cuda" if torch.cuda.is_available() else "cpu", dtype="float32")[0]
    prompt = [5, 17, 42, 8, 9]
    heads = MedusaHeads.from_base(model, num_heads=5).eval()
    try:
        kernels.set_backend("torch")
        expected = generate(model, prompt, max_new_tokens=12).tokens
        kernels.set_backend("triton")
        got = generate_medusa(model, heads, TreeBuffers.from_choices(TREES[tree_name]), prompt, max_new_tokens=12)
        plain = generate(model, prompt, max_new_tokens=12).tokens
    finally:
        kernels.set_backend("auto")
    assert got.tokens == expected and plain == expected

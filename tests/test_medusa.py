"""Medusa decoding: greedy output identical to plain greedy decoding, cache identical, sampling lossless;
with static trees and with dynamic ones (each step's tree chosen from the heads' confidence)."""

import math

import pytest
import torch

import nanomedusa.decoder as decoder_module
import nanomedusa.medusa_generation as medusa_generation
import kernels.sample_token
from kernels.acceptance import accept_candidates_triton
from nanomedusa.errors import NanoMedusaError
from nanomedusa.decoder import Decoder
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.generation import generate
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.medusa_generation import generate_medusa
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
SUPERSET = TREES["mc_sim_7b_63"]  # dynamic trees choose among its 64 nodes
DYNAMIC_SIZES = [1, 2, 9, 64]  # root only, root and one guess, a few, the whole superset


def make_tree(name: str) -> TreeBuffers | DynamicTree:
    """A static tree of TREES, or "dynamic-N": a dynamic tree of N nodes over SUPERSET."""
    if name.startswith("dynamic-"):
        return DynamicTree.from_choices(SUPERSET, int(name.removeprefix("dynamic-")))
    return TreeBuffers.from_choices(TREES[name])


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared CPU spinning threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytestmark = pytest.mark.usefixtures("one_thread")


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
            model.kv_cache = None
            self.hidden = model.forward_hidden(seq)[0]  # [P+N, D], hidden at each position
        self.seq, self.vocab = seq[0].tolist(), vocab
        self.config = type("C", (), {"num_heads": num_heads, "reads_path": False, "hidden_size": model.config.dim,
                                     "vocab_size": model.config.vocab_size})()

    def parameters(self):  # (none: generate_medusa checks the heads' weights against the model's only when there are)
        return iter(())

    def copies_serial(self, lm_head_weight=None):  # (no weights, so no copies of them: itself)
        return id(self)

    def topk(self, hidden, k, lm_head_weight=None):
        pos = (self.hidden - hidden).norm(dim=-1).argmin().item()  # which position this hidden state is
        out = torch.zeros(self.config.num_heads, 1, k, dtype=torch.long)
        for head in range(self.config.num_heads):
            t = pos + 2 + head  # head k at position t predicts token t + k + 2
            true = self.seq[t] if t < len(self.seq) else 0
            others = [x for x in range(self.vocab) if x != true][: k - 1]
            out[head, 0] = torch.tensor([true] + others)
        return out.to(hidden.device)

    def topk_logprobs(self, hidden, k, lm_head_weight=None):
        """As sure of the true token as can be: log-probability 0, then -1, -2, ... down the ranks."""
        ids = self.topk(hidden, k)
        return ids, -torch.arange(k, dtype=torch.float32, device=ids.device).expand(ids.shape)


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
    expected = generate(Decoder(model), prompt, max_new_tokens=30).tokens
    got = generate_medusa(Decoder(model), heads, tree, prompt, max_new_tokens=30)
    assert got.tokens == expected


@pytest.mark.parametrize("tree_name", sorted(TREES))
def test_oracle_heads_accept_the_whole_depth(models, tree_name):
    model = models["mha"]
    prompt = [5, 17, 42, 8]
    expected = generate(Decoder(model), prompt, max_new_tokens=40).tokens
    heads = OracleHeads(model, prompt, expected)
    tree = TreeBuffers.from_choices(TREES[tree_name])
    got = generate_medusa(Decoder(model), heads, tree, prompt, max_new_tokens=40)
    assert got.tokens == expected
    # Every step accepts the full depth plus the bonus token, but the last may be cut by max_new_tokens.
    assert got.steps == math.ceil((40 - 1) / (tree.depth_max + 1))


@pytest.mark.parametrize("max_new_tokens, steps", [(37, 6), (40, 7)])  # the last step hits the end; overshoots it
def test_steps_queued_ahead_stay_within_a_cache_sized_for_the_run(models, monkeypatch, max_new_tokens, steps):
    # The loop queues each next step before reading the last one's tokens while the run surely goes on. With heads
    # that accept a chain's whole depth the last step ends the run exactly (31 -> 37 of 37 tokens) or overshoots it
    # (37 -> 43 of 40): no step may be queued after it (none is wasted when a run ends by length), and every step's
    # tree must fit a cache sized for the run alone (on the CPU a slot past the cache raises).
    calls = []
    step = medusa_generation.medusa_step
    monkeypatch.setattr(medusa_generation, "medusa_step", lambda *args: calls.append(1) or step(*args))
    model = models["mha"]
    prompt = [5, 17, 42, 8]
    expected = generate(Decoder(model), prompt, max_new_tokens=50).tokens  # the oracle knows past the end
    heads, tree = OracleHeads(model, prompt, expected), TreeBuffers.from_choices(TREES["chain5"])
    model.kv_cache = None  # not the larger cache an earlier test left, which would hide an overflow
    got = generate_medusa(Decoder(model), heads, tree, prompt, max_new_tokens=max_new_tokens)
    assert model.kv_cache.max_seq_len == len(prompt) + max_new_tokens + tree.num_nodes
    assert got.tokens == expected[:max_new_tokens] and got.steps == len(calls) == steps


@pytest.mark.parametrize("model_name,nodes,heads_kind", [
    (model, nodes, heads) for model in ("mha", "gqa") for nodes in DYNAMIC_SIZES for heads in ("random", "base")])
def test_greedy_medusa_with_dynamic_trees_equals_greedy(models, model_name, nodes, heads_kind):
    model = models[model_name]
    heads = random_heads(model, nodes) if heads_kind == "random" else MedusaHeads.from_base(model, num_heads=5).eval()
    prompt = [5, 17, 42, 8, 3, 9]
    expected = generate(Decoder(model), prompt, max_new_tokens=30).tokens
    got = generate_medusa(Decoder(model), heads, make_tree(f"dynamic-{nodes}"), prompt, max_new_tokens=30)
    assert got.tokens == expected


@pytest.mark.parametrize("nodes", DYNAMIC_SIZES)
def test_oracle_heads_fill_the_dynamic_tree(models, nodes):
    # The oracle is sure of its rank-0 guesses, so each step's tree puts the rank-0 chain first: every step
    # accepts as deep as N nodes reach (N - 1, at most the superset's depth 4), plus the bonus token.
    model = models["mha"]
    prompt = [5, 17, 42, 8]
    expected = generate(Decoder(model), prompt, max_new_tokens=40).tokens
    tree = make_tree(f"dynamic-{nodes}")
    got = generate_medusa(Decoder(model), OracleHeads(model, prompt, expected), tree, prompt, max_new_tokens=40)
    assert got.tokens == expected
    assert got.steps == math.ceil((40 - 1) / (min(nodes - 1, 4) + 1))


def test_dynamic_tree_of_the_whole_superset_decodes_as_the_superset(models):
    # With N = M every step chooses every node: each acceptance must then give the static superset's tokens,
    # random draws included (the same seed, the same uniforms).
    model = models["gqa"]
    heads = random_heads(model, 3)
    for accept, sampling in (("greedy", Sampling()), ("typical", Sampling(0.7)), ("sample", Sampling(0.9, top_p=0.95))):
        outs = [generate_medusa(Decoder(model), heads, tree, [4, 9, 33], 25, sampling, accept,
                                generator=torch.Generator().manual_seed(0)).tokens
                for tree in (make_tree("mc_sim_7b_63"), make_tree("dynamic-64"))]
        assert outs[0] == outs[1], accept


def test_kv_cache_equals_plain_decoding(models):
    model = models["gqa"]
    prompt = [4, 9, 33, 12, 7]
    heads = OracleHeads(model, prompt, generate(Decoder(model), prompt, max_new_tokens=40).tokens, vocab=61)
    got = generate_medusa(Decoder(model), heads, TreeBuffers.from_choices(TREES["small"]), prompt, max_new_tokens=25)
    assert got.steps < len(got.tokens) - 1  # guesses accepted, so the compaction moved their entries into place
    n = len(prompt) + len(got.tokens) - 1  # slots holding the prompt and every emitted token but the last
    medusa_cache = model.kv_cache.buffer[:, :, :, :, :n].clone()
    with torch.inference_mode():  # as generation runs: the cache it made (and this reuses) is an inference tensor
        model.setup_cache(64)
        model.kv_cache.buffer.zero_()
        model(torch.tensor([prompt + got.tokens[:-1]]), prefix_len=0)
    assert torch.allclose(medusa_cache, model.kv_cache.buffer[:, :, :, :, :n], atol=1e-5, rtol=1e-5)


def test_stops_at_eos_like_plain_decoding(models):
    model = models["mha"]
    prompt = [3, 14, 15, 92]
    plain = generate(Decoder(model), prompt, max_new_tokens=30).tokens
    eos = plain[11]  # a token the run produces mid-way
    expected = generate(Decoder(model), prompt, max_new_tokens=30, eos_ids=[eos]).tokens
    heads = OracleHeads(model, prompt, plain)
    got = generate_medusa(Decoder(model), heads, TreeBuffers.from_choices(chain(5)), prompt, max_new_tokens=30, eos_ids=[eos])
    assert got.tokens == expected and got.tokens[-1] == eos


def test_tree_that_does_not_fit_is_a_clear_error(models):
    model = models["mha"]  # context 256
    heads = MedusaHeads.from_base(model, num_heads=5)
    tree = TreeBuffers.from_choices(TREES["mc_sim_7b_63"])
    with pytest.raises(NanoMedusaError, match=r"tree \(\d+ nodes\) = \d+ exceeds the model's context of 256 tokens; "
                                              r"shorten the prompt, lower --max-new-tokens or use a smaller tree\."):
        generate_medusa(Decoder(model), heads, tree, list(range(3, 60)), max_new_tokens=150)


def test_too_few_heads_for_the_tree_is_a_clear_error(models):
    model = models["mha"]
    heads = MedusaHeads.from_base(model, num_heads=2)
    with pytest.raises(NanoMedusaError, match="only 2 Medusa heads"):
        generate_medusa(Decoder(model), heads, TreeBuffers.from_choices(chain(3)), [5, 6], max_new_tokens=5)


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


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def on_the_kernels(monkeypatch):
    """Lossless sampling's own kernels (the draws and the acceptance) in place of their references: on CPU
    tensors the interpreter runs them (conftest.py), while the model stays on the fast references."""
    monkeypatch.setattr(kernels.sample_token, "sample_token", kernels.sample_token.sample_token_triton)
    monkeypatch.setattr(medusa_generation, "accept_candidates", accept_candidates_triton)


def test_lossless_acceptance_at_one_node_is_exact(n=20000):
    """One tree node with three children: whatever comes out first (an accepted child or the bonus token) must
    be distributed as the root's target p (top-k and top-p: a proposal of token 0 is refused), and a
    child must be accepted with probability p(its token), the sum over the three. Chi-square at the 0.1% level;
    the acceptance rate within four standard deviations. (The kernels' draws and acceptance equal the references'
    token for token: test_kernel_sample_token.py, test_kernel_acceptance.py; composed, the three-token law below.)"""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tree = TreeBuffers.from_choices([[0], [1], [2]], device=device)
    logits = (torch.randn(tree.num_nodes, 6) * 1.5).to(device)  # [T, V]
    tokens = torch.tensor([0, 3, 1, 5], device=device)  # root, then the children's guesses
    rule = medusa_generation.Acceptance(mode="sample", sampling=Sampling(temperature=0.8, top_k=5, top_p=0.95))
    p = target_probs(logits, rule.sampling)[0].cpu()  # [V] the root's target
    rng = torch.Generator(device).manual_seed(1)
    counts, accepted = {}, 0
    for _ in range(n):
        path, _, accept_len, bonus = medusa_generation.accept(logits, tokens, tree, rule, rng)
        first = tokens[path[1]].item() if accept_len > 0 else bonus.item()
        counts[first] = counts.get(first, 0) + 1
        accepted += accept_len.item()
    stat, df = chi_square(counts, {t: p[t].item() for t in range(6) if p[t] > 0}, n)
    assert stat < chi_square_bound(df), (stat, df)
    rate = p[[3, 1, 5]].sum().item()
    assert abs(accepted / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5


def three_token_law(model, prompt, sampling) -> dict:
    """The exact probability of every 3-token continuation under plain sampling (by enumeration), > 0 only."""
    with torch.no_grad():
        probs = {}
        model.kv_cache = None
        p1 = target_probs(model(torch.tensor([prompt], device=model.device))[0, -1], sampling)
        for a in range(6):
            p2 = target_probs(model(torch.tensor([prompt + [a]], device=model.device))[0, -1], sampling)
            rows = torch.tensor([prompt + [a, b] for b in range(6)], device=model.device)
            p3 = target_probs(model(rows)[:, -1], sampling)  # [6, V]
            for b in range(6):
                for c in range(6):
                    probs[(a, b, c)] = (p1[a] * p2[b] * p3[b, c]).item()
    return {k: v for k, v in probs.items() if v > 0}


@pytest.mark.parametrize("decoder, device, on_kernels, n", [
    ("plain", "cpu", False, 3000), ("medusa", "cpu", False, 3000),
    pytest.param("medusa", "cpu", True, 600, marks=pytest.mark.skipif(  # the interpreter, on CPU tensors
        torch.cuda.is_available(), reason="on a GPU the cuda case runs the compiled kernels")),
    pytest.param("plain", "cuda", False, 3000, marks=CUDA), pytest.param("medusa", "cuda", False, 3000, marks=CUDA),
])
def test_sampling_matches_the_models_distribution(tmp_path, monkeypatch, decoder, device, on_kernels, n):
    """End to end on a 6-token vocabulary, temperature and top-p applied on the device: the joint law of the
    first three generated tokens, plain or Medusa sampling, must equal the model's own (computed exactly by
    enumeration). n runs; with up to 215 degrees of freedom, a correct sampler fails the 0.1% bound once in a
    thousand runs, while a biased one (e.g. accepting a guess its parent did not draw) fails it every time.
    On a GPU every step replays as a CUDA graph, the draws and the acceptance inside it."""
    if on_kernels:
        on_the_kernels(monkeypatch)
    make_hf_checkpoint(tmp_path, seed=3, vocab_size=6, num_key_value_heads=2)
    model = load_model(tmp_path, device=device, dtype="float32")[0]
    sampling = Sampling(temperature=0.9, top_p=0.95)
    prompt = [1, 4, 2]
    probs = three_token_law(model, prompt, sampling)
    heads = MedusaHeads.from_base(model, num_heads=2).eval()  # guesses that are often right: both paths run
    tree = TreeBuffers.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])
    counts, accepted = {}, 0
    for seed in range(n):
        gen = torch.Generator(device).manual_seed(seed)
        if decoder == "plain":
            out = generate(Decoder(model), prompt, max_new_tokens=3, sampling=sampling, generator=gen)
        else:
            out = generate_medusa(Decoder(model), heads, tree, prompt, max_new_tokens=3, sampling=sampling, accept="sample",
                                  generator=gen)
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
        accepted += out.steps == 1
    stat, df = chi_square(counts, probs, n)
    assert stat < chi_square_bound(df), (stat, df)
    if decoder == "medusa":
        assert accepted > n // 10  # guesses were accepted often enough for the test to mean something


class ReplayOfTheFirstCall:
    """A stand-in for GraphedStep on a CPU that replays as a CUDA graph does: the function it was made with, on
    its static inputs, whatever the caller passes later. A graph key that leaves out something a step depends on
    then replays another step, as on a GPU."""

    def __init__(self, fn, *example_inputs, enabled=True, generator=None, pool=None):
        self.fn, self.inputs = fn, [x.clone() for x in example_inputs]

    def __call__(self, *inputs):
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        return self.fn(*self.inputs)


def test_graph_keys_name_everything_a_step_depends_on(models, monkeypatch):
    # (the decoder's graph bookkeeping on a CPU: GPU runs check the real graphs, test_generation.py and below)
    monkeypatch.setattr(decoder_module, "GraphedStep", ReplayOfTheFirstCall)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    model = models["gqa"]
    graphed = Decoder(model)
    graphed.uses_graphs = True
    for prompt in ([5, 17, 42], list(range(3, 60)) * 2, [9, 8, 7, 6, 5]):  # padded prefills of 64, 128, 64 tokens
        assert generate(graphed, prompt, 20).tokens == generate(Decoder(model), prompt, 20).tokens
    heads = MedusaHeads.from_base(model, num_heads=5).eval()
    # two trees of as many nodes (one step graph each), and a dynamic one
    for tree in (TreeBuffers.from_choices(chain(3)), TreeBuffers.from_choices([[0], [1], [0, 0]]),
                 make_tree("dynamic-24")):
        want = generate_medusa(Decoder(model), heads, tree, [5, 17, 42, 8], 30)
        got = generate_medusa(graphed, heads, tree, [5, 17, 42, 8], 30)
        assert (got.tokens, got.steps) == (want.tokens, want.steps) and want.steps < len(want.tokens) - 1


@pytest.mark.parametrize("tree_name", ["chain3", "dynamic-24"])
def test_seeded_medusa_sampling_is_reproducible(models, tree_name):
    # (the eager steps a CPU runs; the graphed ones, on a GPU: the test below)
    model = models["gqa"]
    heads, tree = random_heads(model, 0), make_tree(tree_name)
    sampling = Sampling(temperature=0.7, top_k=20, top_p=0.9)

    def run(seed):
        return generate_medusa(Decoder(model), heads, tree, [5, 17, 42, 8], 30, sampling, accept="sample",
                               generator=torch.Generator().manual_seed(seed)).tokens

    first = run(1)
    assert run(1) == first and run(2) != first


@CUDA
@pytest.mark.parametrize("tree_name", ["chain3", "mc_sim_7b_63", "dynamic-24"])
def test_seeded_sampling_on_gpu_is_reproducible_and_graphs_change_nothing(tmp_path, tree_name):
    # The graphed steps draw from the generator they are registered with, seeded per run: the same seed
    # gives the same tokens, replayed or eager; another seed other tokens.
    make_hf_checkpoint(tmp_path, seed=3, num_key_value_heads=2)
    model = load_model(tmp_path, device="cuda", dtype="float32")[0]
    tree = make_tree(tree_name)
    heads = random_heads(model, 0)
    sampling = Sampling(temperature=0.7, top_k=20, top_p=0.9)

    decoders = {True: Decoder(model), False: Decoder(model, cuda_graphs=False)}  # one each: graphs are replayed

    def run(seed, cuda_graphs=True, medusa=True):
        gen, decoder = torch.Generator("cuda").manual_seed(seed), decoders[cuda_graphs]
        if medusa:
            return generate_medusa(decoder, heads, tree, [5, 17, 42, 8], 40, sampling, accept="sample", generator=gen).tokens
        return generate(decoder, [5, 17, 42, 8], 40, sampling, generator=gen).tokens

    for medusa in (False, True):
        first = run(1, medusa=medusa)
        assert run(1, medusa=medusa) == first == run(1, cuda_graphs=False, medusa=medusa)
        assert run(2, medusa=medusa) != first


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


@pytest.mark.parametrize("tree_name", ["small", "dynamic-9"])
def test_typical_acceptance_runs_end_to_end(models, tree_name):
    model = models["mha"]
    heads = MedusaHeads.from_base(model, num_heads=5).eval()
    out = generate_medusa(Decoder(model), heads, make_tree(tree_name), [5, 6, 7], max_new_tokens=20,
                          sampling=Sampling(temperature=0.7), accept="typical",
                          generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == 20 and out.mean_accepted > 1.0


def test_typical_acceptance_takes_root_and_bonus_greedily(models):
    # As in the paper (the reference's fast=True): each step's first token and the bonus token are the
    # argmax, not drawn at the temperature. With a threshold no guess can pass (p > 2), every step emits
    # only its bonus token, so the output is plain greedy decoding's whatever the seed.
    model = models["mha"]
    heads = MedusaHeads.from_base(model, num_heads=3).eval()
    expected = generate(Decoder(model), [5, 6, 7], max_new_tokens=12).tokens
    for seed in range(3):
        out = generate_medusa(Decoder(model), heads, TreeBuffers.from_choices(TREES["small"]), [5, 6, 7], max_new_tokens=12,
                              sampling=Sampling(temperature=1.5), accept="typical", posterior_threshold=2.0,
                              posterior_alpha=1e9, generator=torch.Generator().manual_seed(seed))
        assert out.tokens == expected and out.mean_accepted == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the compiled kernels need a GPU")
@pytest.mark.parametrize("tree_name", ["chain3", "small", "mc_sim_7b_63", "dynamic-1", "dynamic-24", "dynamic-64"])
def test_graphed_medusa_step_on_gpu_equals_greedy(tmp_path, tree_name):
    # On a GPU the whole Medusa step (forward, acceptance, compaction, next guesses) replays as one
    # CUDA graph with the Triton kernels: its output must still be plain greedy decoding's.
    make_hf_checkpoint(tmp_path, seed=3, num_key_value_heads=2)
    model = load_model(tmp_path, device="cuda", dtype="float32")[0]
    tree = make_tree(tree_name)
    decoder = Decoder(model)
    for seed, prompt in enumerate(([5, 17, 42, 8], list(range(3, 40)))):
        expected = generate(decoder, prompt, max_new_tokens=60).tokens
        heads = random_heads(model, seed) if seed else MedusaHeads.from_base(model, num_heads=5).eval()
        assert generate_medusa(decoder, heads, tree, prompt, max_new_tokens=60).tokens == expected
        oracle = OracleHeads(model, prompt, expected)
        got = generate_medusa(Decoder(model, cuda_graphs=False), oracle, tree, prompt, max_new_tokens=60)
        assert got.tokens == expected


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("tree_name", ["small", "dynamic-9"])
def test_decoding_after_the_heads_weights_change_uses_the_new_weights(tmp_path, device, tree_name):
    # The fused kernels read stacked copies of the heads' weights, and on a GPU the graphs a decoder captured read
    # those copies' memory: after a load_state_dict or an optimizer's in-place step, a decoder that already ran must
    # decode with the new weights, as a fresh one does, and without capturing its graphs again.
    make_hf_checkpoint(tmp_path, num_key_value_heads=2)
    model = load_model(tmp_path, device=device, dtype="float32")[0]
    tree, prompt = make_tree(tree_name), [3, 1, 4, 1, 5, 9, 2, 6]

    def emitted_per_step(decoder, heads):  # what the heads' guesses decide (the tokens are greedy's whatever they are)
        lengths = []
        generate_medusa(decoder, heads, tree, prompt, 40, on_tokens=lambda tokens: lengths.append(len(tokens)))
        return lengths

    def negate(heads):  # in place, as an optimizer writes: the vocabulary projections then rank the least likely first
        with torch.no_grad():
            for p in heads.parameters():
                p.neg_()
        return heads

    # Zero ResBlocks and the lm_head: the heads guess the next token again, right where this model repeats itself.
    good = MedusaHeads.from_base(model, num_heads=5).eval()
    expected = emitted_per_step(Decoder(model), good)
    assert max(expected) > 1  # guesses were accepted: without them the comparisons below would mean nothing
    decoder = Decoder(model)
    heads = negate(MedusaHeads.from_base(model, num_heads=5).eval())
    assert max(emitted_per_step(decoder, heads)) == 1
    graphs = len(decoder.graphs)
    heads.load_state_dict(good.state_dict())
    assert emitted_per_step(decoder, heads) == expected
    assert max(emitted_per_step(decoder, negate(heads))) == 1
    assert emitted_per_step(decoder, negate(heads)) == expected
    with torch.inference_mode():  # weights made here keep no version counter (the benches load heads so)
        frozen = negate(MedusaHeads.from_base(model, num_heads=5).eval())
        assert max(emitted_per_step(decoder, frozen)) == 1
        frozen.load_state_dict(good.state_dict())
        assert emitted_per_step(decoder, frozen) == expected
    assert len(decoder.graphs) == graphs + 2 * (device == "cuda")  # the frozen heads' own step and start graphs


@pytest.mark.parametrize("tree_name", ["chain3", "small", "dynamic-5"])
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
        expected = generate(Decoder(model), prompt, max_new_tokens=12).tokens
        kernels.set_backend("triton")
        got = generate_medusa(Decoder(model), heads, make_tree(tree_name), prompt, max_new_tokens=12)
        plain = generate(Decoder(model), prompt, max_new_tokens=12).tokens
    finally:
        kernels.set_backend("auto")
    assert got.tokens == expected and plain == expected

"""Heads that read their path (heads.py `reads_path`) and the trees they propose depth by depth (path_tree.py).

Checked: the plan of the module's worked example; a proposal against node-by-node evaluation of the heads;
untrained path projections (zero) propose exactly what the plain heads' static and dynamic trees propose;
the choice of a dynamic tree's nodes against a plain-Python reference (ties included); greedy decoding with
such heads equals plain greedy decoding (static and dynamic trees, torch and Triton kernels); checkpoints
round-trip and trim; and training: on answers where a token tells the next-but-one, path-reading heads learn
what plain heads cannot.
"""

import copy
import dataclasses
import json
import random
import string

import pytest
import torch

import kernels
import train as train_cli
from nanomedusa.decoder import Decoder
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.errors import NanoMedusaError
from nanomedusa.generation import generate
from nanomedusa.heads import MedusaHeads, path_ids
from nanomedusa.loading import load_model
from nanomedusa.medusa_generation import generate_medusa, propose
from nanomedusa.path_tree import PathPlan, choose_by_path_scores, guess_along_paths
from nanomedusa.tree import TreeBuffers, lineages
from nanomedusa.tree_tuning import trim_heads
from nanomedusa.training import TrainConfig, Trainer
from nanomedusa.training.losses import shifted_targets
from tests.helpers import make_hf_checkpoint
from tests.test_medusa import SUPERSET, TREES, make_tree, one_thread  # noqa: F401 (a fixture)
from tests.tiny_tokenizer import make_chat_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("path-heads")
    make_hf_checkpoint(path, seed=5, num_key_value_heads=2, vocab_size=61)
    return load_model(path, device="cpu", dtype="float32")[0]


def path_heads(model, seed, num_heads=5, scale=0.5, path_scale=10.0):
    """Heads that read their path, with random weights: P_k large enough that the path changes most guesses
    (the tiny model's embeddings are small)."""
    heads = MedusaHeads.from_base(model, num_heads=num_heads, num_layers=1, reads_path=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (path_scale if name.startswith("medusa_path") else scale))
    return heads.eval()


def test_plan_of_the_worked_example():
    tree = TreeBuffers.from_choices([[0], [1], [0, 0], [0, 1], [1, 0]])
    plan = PathPlan.from_paths(tree.paths, tree.depth_max)
    one, two = plan.levels
    assert plan.num_nodes == 6 and one.parent_lineage.tolist() == [[0]] and one.children.tolist() == [1, 2]
    assert one.parent_row.tolist() == [0, 0] and one.rank.tolist() == [0, 1] and one.topk == 2
    assert two.parent_lineage.tolist() == [[0, 1], [0, 2]] and two.children.tolist() == [3, 4, 5]
    assert two.parent_row.tolist() == [0, 0, 1] and two.rank.tolist() == [0, 1, 0] and two.topk == 2


@pytest.mark.parametrize("tree_name", ["small", "mc_sim_7b_63"])
def test_proposal_equals_each_node_guessed_on_its_own(model, tree_name):
    heads = path_heads(model, 1)
    tree = TreeBuffers.from_choices(TREES[tree_name])
    hidden, root = torch.randn(1, model.config.dim), torch.tensor(7)
    with torch.no_grad():
        tokens, logprobs = guess_along_paths(heads, PathPlan.from_paths(tree.paths, tree.depth_max),
                                             model.lm_head.weight, root, hidden, model.tok_embeddings, logprobs=True)
        for node, line in enumerate(lineages(tree.paths)[1:], start=1):
            k, rank = len(tree.paths[node]) - 1, tree.paths[node][-1]
            above = model.tok_embeddings(tokens[line[:-1]])[None]  # [1, k + 1, D]: root .. the parent
            logits = heads.head_logits(k, hidden, model.lm_head.weight, above)[0]  # [V]
            top = torch.log_softmax(logits, -1).topk(rank + 1)
            assert tokens[node] == top.indices[rank], node
            assert torch.allclose(logprobs[node], top.values[rank], rtol=1e-4, atol=1e-4)
    assert tokens[0] == 7 and logprobs[0] == 0
    if tree_name == "mc_sim_7b_63":  # nodes of one depth and rank differ by parent (they would not for Medusa's)
        same_slot = [(a, b) for a in range(tree.num_nodes) for b in range(a + 1, tree.num_nodes)
                     if len(tree.paths[a]) == len(tree.paths[b]) > 1 and tree.paths[a][-1] == tree.paths[b][-1]]
        assert sum(int(tokens[a] != tokens[b]) for a, b in same_slot) > len(same_slot) // 2


@pytest.mark.parametrize("tree_name", ["small", "mc_sim_7b_63", "dynamic-9", "dynamic-64"])
def test_untrained_path_reading_proposes_what_the_plain_heads_propose(model, tree_name):
    plain = path_heads(model, 2)  # its ResBlocks, without the path: P_k = 0 below
    plain.medusa_path = None
    plain.config = dataclasses.replace(plain.config, reads_path=False)
    grown = plain.with_path_reading().eval()
    assert grown.config.reads_path and all(not p.weight.any() for p in grown.medusa_path)
    tree, hidden, root = make_tree(tree_name), torch.randn(1, model.config.dim), torch.tensor(11)
    args = (model.lm_head.weight, root, hidden)
    expected = propose(plain, tree, *args)
    got = propose(grown, tree, *args, model.tok_embeddings)
    assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected))


def reference_choice(parents: list[int], logprobs: list[float], n: int) -> list[int]:
    """The n nodes of the largest summed log-probability along their paths (root first), ties to the smaller
    node, in node order."""
    score = [0.0] * len(parents)
    for node in range(1, len(parents)):
        score[node] = score[parents[node]] + min(logprobs[node], 0.0)
    return sorted(sorted(range(len(parents)), key=lambda node: (-score[node], node))[:n])


@pytest.mark.parametrize("case", range(8))
def test_choice_by_path_scores_against_a_reference(case):
    gen = torch.Generator().manual_seed(case)
    tree = DynamicTree.from_choices(SUPERSET, num_nodes=int(torch.randint(1, 64, (1,), generator=gen)))
    M = tree.superset.num_nodes
    # half the cases: small integers, whose sums tie exactly and often
    logprobs = (-torch.randint(0, 3, (M,), generator=gen).float() if case % 2
                else torch.rand(M, generator=gen).log() * 2)
    logprobs[0] = 0
    tokens = torch.randint(0, 50, (M,), generator=gen)
    plan = PathPlan.from_paths(tree.superset.paths, tree.depth_max)
    assert torch.equal(torch.cat([tree.lineage[:, :1], plan.node_paths], 1), tree.lineage)  # root, then these
    got_tokens, nodes = choose_by_path_scores(tokens, logprobs, plan.node_paths, tree.num_nodes)
    expected = reference_choice(tree.superset.parents.tolist(), logprobs.tolist(), tree.num_nodes)
    assert nodes.tolist() == expected and torch.equal(got_tokens, tokens[nodes])
    assert set(tree.superset.parents[nodes].tolist()) <= set(nodes.tolist())  # ancestor-closed


@pytest.mark.parametrize("tree_name", ["chain3", "small", "mc_sim_7b_63", "dynamic-1", "dynamic-2", "dynamic-9",
                                       "dynamic-64"])
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_medusa_with_path_heads_equals_greedy(model, tree_name, seed):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.config.vocab_size, (6,), generator=gen).tolist()
    expected = generate(Decoder(model), prompt, max_new_tokens=30).tokens
    got = generate_medusa(Decoder(model), path_heads(model, seed), make_tree(tree_name), prompt, max_new_tokens=30)
    assert got.tokens == expected


@pytest.mark.parametrize("tree_name", ["small", "dynamic-5"])
def test_triton_kernels_give_the_same_path_tree_output(model, tree_name):
    # The fused heads kernel runs once per depth on that depth's parents (the interpreter on a CPU; compiled on a
    # GPU, which needs CUDA tensors: a copy of the module's model there).
    prompt, heads = [5, 17, 42, 8, 9], path_heads(model, 3)
    if torch.cuda.is_available():
        model, heads = copy.deepcopy(model).cuda(), heads.cuda()
    try:
        kernels.set_backend("torch")
        expected = generate_medusa(Decoder(model), heads, make_tree(tree_name), prompt, max_new_tokens=12)
        kernels.set_backend("triton")
        got = generate_medusa(Decoder(model), heads, make_tree(tree_name), prompt, max_new_tokens=12)
    finally:
        kernels.set_backend("auto")
    assert got.tokens == expected.tokens and got.steps == expected.steps


def test_path_ids_are_the_tokens_after_each_position():
    tokens = torch.tensor([[10, 11, 12, 13]])
    assert path_ids(tokens, 2).tolist() == [[[11, 12], [12, 13], [13, 0], [0, 0]]]


def test_training_reads_exactly_the_tokens_between_a_position_and_its_target():
    # Head k at position t guesses token t+k+2 (shifted_targets row k+1) and must read t+1 .. t+k+1, never the
    # target itself: the alignment a step's tree gives it (root = t+1, then the path's guesses).
    T, K = 9, 3
    tokens = torch.arange(100, 100 + T)[None]  # token t is 100 + t
    targets = shifted_targets(tokens, K)[1:]  # [K, 1, T]
    reads = path_ids(tokens, K)  # [1, T, K]
    for k in range(K):
        for t in range(T - k - 2):
            assert targets[k, 0, t] == 100 + t + k + 2
            assert reads[0, t, : k + 1].tolist() == [100 + t + j for j in range(1, k + 2)]


def test_checkpoints_round_trip_and_trim(model, tmp_path):
    heads = path_heads(model, 4, num_heads=3)
    heads.save(tmp_path)
    loaded = MedusaHeads.load(tmp_path, model.config)
    assert loaded.config.reads_path and json.loads((tmp_path / "config.json").read_text())["reads_path"]
    hidden, path = torch.randn(4, model.config.dim), torch.randn(4, 3, model.config.dim)
    with torch.no_grad():
        assert torch.equal(loaded(hidden, model.lm_head.weight, path), heads(hidden, model.lm_head.weight, path))
    with pytest.raises(NanoMedusaError, match="pass their embeddings as path"):
        loaded(hidden, model.lm_head.weight)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rank_accuracy"] = [[0.5]] * 3
    trim_heads(tmp_path, config, 2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    trimmed = MedusaHeads.load(tmp_path, model.config)
    assert trimmed.config.num_heads == 2 and len(trimmed.medusa_path) == 2
    with torch.no_grad():
        assert torch.equal(trimmed(hidden, model.lm_head.weight, path), heads(hidden, model.lm_head.weight, path)[:2])
    plain = MedusaHeads.from_base(model, num_heads=2)
    plain.save(tmp_path / "plain")
    (tmp_path / "plain" / "config.json").write_text(json.dumps({**config, "reads_path": True}))
    with pytest.raises(NanoMedusaError, match="no medusa_path tensors"):
        MedusaHeads.load(tmp_path / "plain", model.config)


def write_pair_data(path, n: int, seed: int):
    """Answers of letter pairs "xX": a random letter, then its capital. The capital after a random letter is
    known from that letter alone, which a head at the position before the letter does not see, and a head that
    reads its path does."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            answer = "".join(c + c.upper() for c in rng.choices(string.ascii_lowercase, k=12))
            turns = [{"from": "human", "value": "pairs"}, {"from": "gpt", "value": answer}]
            f.write(json.dumps({"id": f"p{i}", "conversations": turns}) + "\n")
    return path


def test_training_path_heads_learns_what_plain_heads_cannot(tmp_path):
    make_chat_checkpoint(tmp_path / "ckpt", seed=1)
    data = write_pair_data(tmp_path / "pairs.jsonl", 96, seed=2)
    common = dict(model=str(tmp_path / "ckpt"), data=str(data), batch_size=8, lr=3e-2, warmup_steps=5, log_every=50,
                  save_every=0, eval_fraction=0.125, max_len=80, seed=3, max_steps=100, num_heads=2)
    plain = Trainer(TrainConfig(out=str(tmp_path / "plain"), **common)).run()
    read = Trainer(TrainConfig(out=str(tmp_path / "path"), reads_path=True, **common)).run()
    # head 0 at a capital guesses the next capital: a coin of 26 for plain heads, given for one reading the
    # letter between (half of the answer positions; the other half guess a random letter either way); measured
    # 0.04 against 0.46
    assert plain["heads"][0]["top1"] < 0.15 and read["heads"][0]["top1"] > plain["heads"][0]["top1"] + 0.25
    # and no more than reading the letter can give: a head that saw its own target would approach 1
    assert read["heads"][0]["top1"] < 0.6
    heads = MedusaHeads.load(tmp_path / "path" / "heads", load_model(tmp_path / "ckpt", "cpu", "float32")[0].config)
    assert heads.config.reads_path and any(p.weight.abs().sum() > 0 for p in heads.medusa_path)


def test_train_cli_adds_path_reading_to_given_heads(tmp_path):
    make_chat_checkpoint(tmp_path / "ckpt", seed=1)
    data = write_pair_data(tmp_path / "pairs.jsonl", 24, seed=2)
    base = ["--model", str(tmp_path / "ckpt"), "--data", str(data), "--batch-size", "4", "--max-len", "80",
            "--save-every", "0"]
    assert train_cli.main([*base, "--out", str(tmp_path / "plain"), "--max-steps", "2", "--num-heads", "2"]) == 0
    assert train_cli.main([*base, "--out", str(tmp_path / "grown"), "--max-steps", "2", "--reads-path",
                           "--heads", str(tmp_path / "plain" / "heads")]) == 0
    assert json.loads((tmp_path / "grown" / "heads" / "config.json").read_text())["reads_path"] is True


def test_typical_and_lossless_sampling_run_on_path_trees(model):
    # The tree depends on the context only (the heads' output), never on a step's random draws, so every
    # acceptance works on it as on Medusa's trees; with N = M the dynamic tree chooses every node, and must then
    # decode as the static tree of its superset does, random draws included.
    from nanomedusa.sampling import Sampling

    heads = path_heads(model, 6)
    for accept, sampling in (("typical", Sampling(0.7)), ("sample", Sampling(0.9, top_p=0.95))):
        outs = [generate_medusa(Decoder(model), heads, make_tree(name), [4, 9, 33], 25, sampling, accept,
                                generator=torch.Generator().manual_seed(0)).tokens
                for name in ("mc_sim_7b_63", "dynamic-64")]
        assert len(outs[0]) == 25 and outs[0] == outs[1], accept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the compiled kernels need a GPU")
@pytest.mark.parametrize("tree_name", ["small", "mc_sim_7b_63", "dynamic-9"])
def test_graphed_path_tree_runs_on_gpu(tmp_path, tree_name):
    """Greedy output equal to plain greedy decoding's, and seeded sampling the same replayed as eager, with
    path-reading heads whose start (root and first proposal) and steps are CUDA graphs."""
    from nanomedusa.sampling import Sampling

    make_hf_checkpoint(tmp_path, seed=5, num_key_value_heads=2, vocab_size=61)
    model = load_model(tmp_path, device="cuda", dtype="float32")[0]
    heads = path_heads(load_model(tmp_path, device="cpu", dtype="float32")[0], 2).to("cuda")
    tree, prompt = make_tree(tree_name), [5, 17, 42, 8, 9]
    graphed, eager = Decoder(model), Decoder(model, cuda_graphs=False)
    expected = generate(eager, prompt, max_new_tokens=40).tokens
    for _ in range(2):  # the second run replays the graphs the first captured
        assert generate_medusa(graphed, heads, tree, prompt, max_new_tokens=40).tokens == expected
    sampling = Sampling(temperature=0.8, top_p=0.95)

    def sampled(decoder):
        gen = torch.Generator("cuda").manual_seed(7)
        return generate_medusa(decoder, heads, tree, prompt, 40, sampling, accept="sample", generator=gen).tokens

    assert sampled(graphed) == sampled(graphed) == sampled(eager)

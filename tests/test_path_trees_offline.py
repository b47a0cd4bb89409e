"""bench/path_trees_offline.py, the offline simulator of greedy decoding with path-reading heads: its static rule
and dynamic rules must take the steps the engine takes (so their comparison with EAGLE-2's expansion is one of real
runs), and its expansion must verify what its rule says."""

import json

import pytest
import torch

from bench import path_trees_offline
from bench.path_trees_offline import Step, accepted_depth, simulate, walk
from bench.prompts import chat_prompts
from nanomedusa.decoder import Decoder
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.errors import NanoMedusaError
from nanomedusa.generation import generate
from nanomedusa.loading import load_model
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.tokenizer import Tokenizer
from nanomedusa.tree import TreeBuffers, tree_from_head_accuracies
from tests.test_medusa import one_thread  # noqa: F401 (a fixture)
from tests.test_path_tree import model, path_heads  # noqa: F401 (model is a fixture)
from tests.tiny_tokenizer import make_chat_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def test_walk_and_accepted_depth():
    # a chain 0 -> 1 -> 2 and a second child 3 of the root; the future is [5, 6]
    parents, depths, tokens = [0, 0, 1, 0], [0, 1, 2, 1], [9, 5, 6, 7]
    assert accepted_depth(parents, depths, tokens, None, [5, 6]) == 2
    assert accepted_depth(parents, depths, tokens, {1, 3}, [5, 6]) == 1  # node 2 not verified
    assert accepted_depth(parents, depths, tokens, None, [5]) == 1  # a guess past the end is wrong
    assert walk(list(range(10)), lambda i: 0) == 9 and walk(list(range(10)), lambda i: 2) == 3


@pytest.mark.parametrize("seed", [1, 5])  # random heads whose guesses some steps accept (most seeds': none)
def test_static_and_dynamic_rules_take_the_engines_steps(model, seed):
    heads = path_heads(model, seed, num_heads=3)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.config.vocab_size, (5,), generator=gen).tolist()
    continuation = generate(Decoder(model), prompt, max_new_tokens=24).tokens
    budgets = [4, 12]
    supersets = [8, 40]  # below and above a budget: for_heads takes the larger
    steps = simulate(model, heads, prompt, continuation, budgets, max_depth=3, beam=4, children=4,
                     supersets=supersets)
    for n in budgets:
        tree = TreeBuffers.from_choices(tree_from_head_accuracies(heads.config.rank_accuracies(), n - 1))
        run = generate_medusa(Decoder(model), heads, tree, prompt, max_new_tokens=24)
        assert run.tokens == continuation and steps[("static", n)] == run.steps, n
        assert steps[("expand", n)] <= len(continuation) - 1
        for size in supersets:
            dynamic = DynamicTree.for_heads(heads.config, n, superset_nodes=size)
            run = generate_medusa(Decoder(model), heads, dynamic, prompt, max_new_tokens=24)
            assert run.tokens == continuation and steps[(f"dynamic-{size}", n)] == run.steps, (n, size)
    assert steps[("static", 12)] < len(continuation) - 1  # some step accepted a guess: the check bites
    assert steps[("dynamic-40", 12)] < len(continuation) - 1


def test_expansion_keeps_the_beam_and_scores_down_the_path(model):
    heads = path_heads(model, 2, num_heads=3)
    parents, depths, tokens, scores = Step(heads, model, torch.randn(1, model.config.dim), 7).expand(3, 2, 3)
    assert len(tokens) == 1 + 3 + 2 * 3 * 2 and depths.count(1) == 3 and depths.count(3) == 6
    assert tokens[0] == 7 and all(scores[n] <= scores[parents[n]] for n in range(1, len(tokens)))
    # depth 2's parents are depth 1's two best
    best = sorted((n for n in range(len(tokens)) if depths[n] == 1), key=lambda n: -scores[n])[:2]
    assert {parents[n] for n in range(len(tokens)) if depths[n] == 2} == set(best)


def test_the_prompts_are_decoded_in_chat_format(tmp_path, monkeypatch):
    # The heads are measured on prompts of the format they were trained on: --chat-format reaches the ids decoded.
    make_chat_checkpoint(tmp_path / "model", seed=1)
    path_heads(load_model(tmp_path / "model", "cpu", "float32")[0], 1, num_heads=2).save(tmp_path / "heads")
    fed = []

    def generate_batch(base, prompts, *args, **kwargs):  # the prompts continued; then stop
        fed.append(prompts)
        raise NanoMedusaError("enough")

    monkeypatch.setattr(path_trees_offline, "generate_batch", generate_batch)
    prompts = "bench/prompts-chat.jsonl"
    argv = ["--model", str(tmp_path / "model"), "--heads", str(tmp_path / "heads"), "--prompts", prompts,
            "--num-prompts", "1"]
    for chat_format in ("auto", "plain"):
        assert path_trees_offline.main([*argv, "--chat-format", chat_format]) == 2
    want = [[p.ids for p in chat_prompts(Tokenizer.from_dir(tmp_path / "model", preset), prompts, 1)]
            for preset in ("auto", "plain")]
    assert fed == want and want[0] != want[1]


def test_a_full_run_writes_its_numbers_and_format(tmp_path):
    make_chat_checkpoint(tmp_path / "model", seed=1)
    path_heads(load_model(tmp_path / "model", "cpu", "float32")[0], 1, num_heads=2).save(tmp_path / "heads")
    prompts, out = "bench/prompts-chat.jsonl", tmp_path / "results" / "path-trees.json"
    assert path_trees_offline.main(["--model", str(tmp_path / "model"), "--heads", str(tmp_path / "heads"),
                                    "--prompts", prompts, "--num-prompts", "2", "--max-new-tokens", "6", "--budgets",
                                    "4,8", "--supersets", "16", "--beam", "2", "--children", "2", "--json",
                                    str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["chat_format"] == "chatml"  # the tiny checkpoint's own, which auto found
    assert results["max_depth"] == 2 and list(results["sets"]) == [prompts]
    numbers = results["sets"][prompts]
    assert numbers["prompts"] == 2 and 2 <= numbers["tokens_after_the_first"] <= 2 * 5
    assert [row["nodes"] for row in numbers["rows"]] == [4, 8]
    assert all(set(row) == {"nodes", "static", "expand", "dynamic-16"} and row["static"] >= 1
               for row in numbers["rows"])

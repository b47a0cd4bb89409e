"""bench/dynamic_trees_offline.py's simulator: its vectorised choice is the engine's, and its walk counts steps
as generate_medusa does. (Its --validate mode checks the whole simulator against the engine on the real model.)"""

import json
from pathlib import Path

import torch

from bench import dynamic_trees_offline
from bench.dynamic_trees_offline import TOPK, Positions, Rules, Superset, Trace, choose, heads_config, walk
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.loading import load_model
from nanomedusa.tokenizer import Tokenizer
from tests.tiny_tokenizer import make_chat_checkpoint

HEADS = "weights/smollm2-135m-instruct-medusa"
PROMPTS = "bench/prompts-chat.jsonl"


def random_logprobs(P, K, k, generator):
    """[P, K, k] log-probabilities, descending per head as a head's top-k come (best first), in tied pairs."""
    lp = -6 * torch.rand(P, K, k, generator=generator)
    lp[:, :, 1::2] = lp[:, :, 0::2][:, :, : k // 2]
    return lp.sort(-1, descending=True).values


def test_the_offline_choice_is_the_engines():
    config = heads_config(HEADS)
    superset = Superset.for_heads(config)
    generator = torch.Generator().manual_seed(0)
    K, k = superset.ranks.shape[1], 1 + int(superset.ranks.max())
    lp = random_logprobs(12, K, k, generator)
    ids = torch.arange(K * k).view(K, k)
    for N in (16, 64):
        tree = DynamicTree.for_heads(config, N)
        chosen = choose(lp, superset, N)  # [P, M] bool
        for p in range(len(lp)):
            _, nodes = tree.choose(torch.tensor(7), ids, lp[p])
            assert chosen[p].nonzero()[:, 0].tolist() == sorted(nodes.tolist()), (N, p)


def test_walk_advances_by_the_accepted_guesses_plus_the_root():
    # 6 tokens; at root positions 0, 1, 3: 2, 0, 1 guesses accepted -> steps at 0 (to 3), 3 (to 5): 2 steps.
    trace = Trace(torch.arange(6), torch.zeros(6, 1, 1, dtype=torch.long), torch.zeros(6, 1, 1), torch.zeros(6, 3))
    assert walk([trace], torch.tensor([2, 0, 0, 1, 0, 0])) == [(6, 2)]
    assert walk([trace, trace], torch.tensor([0] * 6 + [5, 0, 0, 0, 0, 0])) == [(6, 5), (6, 1)]


def test_static_and_oracle_bound_what_a_rule_accepts():
    config = heads_config(HEADS)
    superset = Superset.for_heads(config)
    generator = torch.Generator().manual_seed(1)
    K = superset.ranks.shape[1]
    tokens = torch.randint(0, 5, (40,), generator=generator)
    ids = torch.randint(0, 5, (40, K, 10), generator=generator)  # a vocabulary of 5: many right guesses
    trace = Trace(tokens, ids, random_logprobs(40, K, 10, generator), torch.zeros(40, 2 + K))
    positions = Positions.of([trace], superset)
    rules = Rules(config, superset)
    oracle = rules.accepted("oracle", positions, 16)
    for name in ("static", "dynamic"):
        got = rules.accepted(name, positions, 16)
        assert (got <= oracle).all() and (oracle <= rules.accepted("ceiling", positions, 16)).all()
    assert oracle.sum() > 0


def test_the_features_rule_learns_what_the_context_says():
    # Where the base model is sure (context column 0 near 0) every head's top guess is right. Elsewhere heads 1-3
    # are wrong and head 0's first or second guess is right, half and half. 5 nodes hold either the path of 4 top
    # guesses (right where sure) or head 0's two guesses (right elsewhere), and the heads' probabilities are
    # noise. Fitted on these positions, "features" must take the right shape at every position (the oracle's),
    # which neither the probabilities nor the ranks alone can: it fails when the context does not reach it.
    config = heads_config(HEADS)
    superset = Superset.for_heads(config)
    assert len(superset.nodes_of([[0, 0, 0, 0], [1]])) == 2  # both are candidates (nodes_of raises otherwise)
    generator = torch.Generator().manual_seed(2)
    K, L = superset.ranks.shape[1], 300
    tokens = torch.randint(0, 1000, (L,), generator=generator)
    ids = torch.randint(1000, 2000, (L, K, 10), generator=generator)  # never right
    sure, first = torch.rand(2, L, generator=generator) < 0.5
    future = torch.cat([tokens, torch.full((K + 1,), -1)])  # past the end: never right
    for d in range(K):
        ids[:, d, 0] = torch.where(sure | (d == 0) & first, future[d + 1: d + 1 + L], ids[:, d, 0])
    ids[:, 0, 1] = torch.where(~sure & ~first, future[1: 1 + L], ids[:, 0, 1])
    context = torch.randn(L, 2 + K, generator=generator)
    context[:, 0] = torch.where(sure, 0.0, -4.0)
    positions = Positions.of([Trace(tokens, ids, random_logprobs(L, K, 10, generator), context)], superset)
    rules = Rules(config, superset)
    rules.fit(positions, [5])
    oracle = rules.accepted("oracle", positions, 5)
    assert (rules.accepted("features", positions, 5) == oracle).all()
    assert rules.accepted("dynamic", positions, 5).sum() < oracle.sum()


def trace_with_a_tiny_model(monkeypatch, tmp_path, make_trace) -> None:
    """Tracing as the bench does it, with a tiny model standing in for the default one and `make_trace` for the
    engine's decode."""
    make_chat_checkpoint(tmp_path / "model", seed=1)
    model = load_model(tmp_path / "model", "cpu", "float32")[0]
    monkeypatch.setattr(dynamic_trees_offline, "resolve_checkpoint", lambda spec: tmp_path / "model")
    monkeypatch.setattr(dynamic_trees_offline, "load_model", lambda *args, **kwargs: (model, tmp_path / "model"))
    monkeypatch.setattr(dynamic_trees_offline, "load_heads_and_adapter", lambda heads_dir, model: None)
    monkeypatch.setattr(dynamic_trees_offline, "make_trace", make_trace)


def test_traces_are_made_and_cached_in_chat_format(tmp_path, monkeypatch):
    # Traces of one prompt set in two formats are two sets of traces: --chat-format reaches the prompt ids traced,
    # and a trace cached in one format is not read back for another; the model's own format named is auto's, whose
    # traces it reads back.
    K, traced = heads_config(HEADS).num_heads, []

    def make_trace(model, heads, decoder, prompt_ids, max_new_tokens, eos_ids):
        traced.append(prompt_ids)
        return Trace(torch.tensor([2]), torch.zeros(1, K, TOPK, dtype=torch.long), torch.zeros(1, K, TOPK),
                     torch.zeros(1, 2 + K))

    trace_with_a_tiny_model(monkeypatch, tmp_path, make_trace)
    argv = ["--heads", HEADS, "--eval", f"{PROMPTS}:1", "--tune", f"{PROMPTS}:1", "--max-new-tokens", "4",
            "--cache", str(tmp_path / "cache"), "--trace-only"]
    for chat_format in ("auto", "plain", "auto", "chatml"):  # (the last two: all cached)
        assert dynamic_trees_offline.main([*argv, "--chat-format", chat_format]) == 0
    messages = [{"role": "user", "content": json.loads(Path(PROMPTS).read_text().split("\n")[0])["prompt"]}]
    want = [Tokenizer.from_dir(tmp_path / "model", preset).encode_chat(messages) for preset in ("auto", "plain")]
    assert traced == want and want[0] != want[1]


def test_the_results_name_the_chat_format(tmp_path, monkeypatch):
    # A full run on random traces: its JSON holds a row per set and budget, and the format the prompts were in.
    K, generator = heads_config(HEADS).num_heads, torch.Generator().manual_seed(2)

    def make_trace(model, heads, decoder, prompt_ids, max_new_tokens, eos_ids):
        L = 30  # (a vocabulary of 4: many right guesses)
        tokens, ids = torch.randint(0, 4, (L,), generator=generator), torch.randint(0, 4, (L, K, TOPK),
                                                                                   generator=generator)
        return Trace(tokens, ids, random_logprobs(L, K, TOPK, generator), -torch.rand(L, 2 + K, generator=generator))

    trace_with_a_tiny_model(monkeypatch, tmp_path, make_trace)
    out = tmp_path / "results" / "offline.json"
    assert dynamic_trees_offline.main(["--heads", HEADS, "--eval", f"{PROMPTS}:2", "--tune", f"{PROMPTS}:3",
                                       "--budgets", "4,8", "--cache", str(tmp_path / "cache"), "--chat-format",
                                       "plain", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["chat_format"] == "plain" and set(results["params"]) == {HEADS}
    assert [(r["set"], r["prompts"], r["nodes"]) for r in results["rows"]] == [
        ("tuning (in-sample)", 3, 4), ("tuning (in-sample)", 3, 8), ("prompts-chat", 2, 4), ("prompts-chat", 2, 8)]
    assert all(1 <= r["static"] <= r["oracle"] for r in results["rows"])

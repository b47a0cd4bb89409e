"""bench/feature_draft_probe.py on a tiny model: every depth's guesses, computed for all chains in one attention call,
equal each chain run alone; depth m is scored where head m - 1 is; the loss; trees drafted node by node (static ranks,
EAGLE-2's rule, acceptance, decoding turn by turn) agree with their definitions; and the probe runs end to end."""

import json

import torch
import torch.nn.functional as F

from bench import feature_draft_probe as probe
from nanomedusa.loading import load_model
from tests.helpers import make_hf_checkpoint
from tests.test_conditioned_heads_probe import fed_in_each_format, pairs_probe_files


def chain_logits(draft, embeds, features, lm_head_weight, t: int, depth: int, path_embeds=None) -> torch.Tensor:
    """The depth-th guess of the chain that starts at t, run alone: the inputs at positions 0 .. t from the true
    features, then one position at a time from the feature the draft just predicted, causal attention over them.
    The tokens after t are the answer's (embeds), or those whose embeddings path_embeds [depth - 1, D] holds."""
    path_embeds = embeds[t + 1: t + depth] if path_embeds is None else path_embeds
    x = draft.inputs(embeds[: t + 1], features[: t + 1])
    for s in range(depth):  # x [t + 1 + s, D]
        q, k, v = draft.qkv(x, *draft.rope(len(x)))
        predicted = draft.finish_layer(x, q, k, v, torch.ones(len(x), len(x), dtype=torch.bool).tril())[-1:]
        if s + 1 < depth:
            x = torch.cat([x, draft.inputs(path_embeds[s: s + 1], predicted)])
    return F.linear(predicted[0], lm_head_weight)


def random_draft_and_answer(tmp_path, T=14):
    """A tiny model, a draft with weights large enough that every input matters, and an answer of T tokens."""
    from nanomedusa.training.data import IGNORE, Example

    make_hf_checkpoint(tmp_path, seed=2, num_key_value_heads=2)
    model, _ = load_model(tmp_path, "cpu", torch.float32)
    draft = probe.FeatureDraft(model.config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.dim() == 1 else 0.3))
    ids = torch.randint(3, model.config.vocab_size, (T,), generator=gen).tolist()
    return model, draft, Example(ids, [IGNORE] * 2 + ids[2:])


def test_each_depths_guesses_are_its_chains_run_alone(tmp_path):
    model, draft, _ = random_draft_and_answer(tmp_path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        T, D = 9, model.config.dim
        embeds, features = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
        W = model.lm_head.weight
        logits = probe.draft_guesses(draft, embeds, features, W, depth=3)
        assert torch.allclose(logits[0], F.linear(draft(embeds, features), W), atol=1e-5)  # depth 1: causal
        for m, depth_logits in enumerate(logits, start=1):
            for t in range(T - m + 1):
                want = chain_logits(draft, embeds, features, W, t, m)
                assert torch.allclose(depth_logits[t + m - 1], want, atol=1e-4), (m, t)
        # the draft's own features change its guesses, so the chain check above is not vacuous
        assert not torch.allclose(logits[1][2:], logits[0][2:], atol=1e-3)
    mask = probe.frontier_mask(4, 2, "cpu").int().tolist()
    assert mask == [[0, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 0],
                    [1, 1, 1, 0, 0, 0, 0, 1]]


def test_the_probe_trains_measures_and_compares(tmp_path):
    # Answers of letter pairs ("qqzzbb..."): after the first of a pair the next letter repeats, which the token the
    # draft reads beside the feature tells; training must find it.
    train, held = pairs_probe_files(tmp_path, 32, 8)
    args = ["--model", str(tmp_path / "ckpt"), "--heads", str(tmp_path / "heads"), "--train", str(train), "--eval",
            str(held), "--depth", "3", "--topk", "5", "--paths", "6", "--sim-answers", "3", "--tree-answers", "8",
            "--sim-paths", "3,6", "--batch", "4", "--lr", "1e-2", "--ce-weight", "1", "--device", "cpu", "--log-every",
            "1000", "--json", str(tmp_path / "p.json")]
    untrained = probe.run(probe.parse_args(args + ["--epochs", "0"]))
    out = probe.run(probe.parse_args(args + ["--epochs", "8"]))  # (a random tiny model's features: slow to learn)
    acc = torch.tensor(out["draft_acc"])
    assert acc.shape == (3, 5) and bool((acc >= 0).all()) and bool((acc.sum(1) <= 1 + 1e-9).all())
    assert len(torch.tensor(out["heads_acc"])) == 2  # the heads' table: one row per head
    assert out["losses"][-1] < out["losses"][0]
    assert out["draft_acc"][0][0] > untrained["draft_acc"][0][0] + 0.1
    assert out["expected_accepted"]["draft"] >= 1.0 and out["expected_accepted"]["heads"] >= 1.0
    assert out["expected_accepted"]["draft, 2 deep"] <= out["expected_accepted"]["draft"]
    assert json.loads((tmp_path / "p.json").read_text())["draft_acc"] == out["draft_acc"]
    assert [(r["paths"], r["answers"]) for r in out["trees"]] == [(3, 3), (6, 3)]
    assert all(1.0 <= r["static"] <= 4.0 and 1.0 <= r["dynamic"] <= 4.0 for r in out["trees"])


def test_depth_m_is_scored_where_head_m_minus_1_is(tmp_path):
    # Depth m's row j guesses token j + 2 for the chain that started at t = j - m + 1: the same (position, target)
    # pairs as head m - 1 at t (tree_tuning.rank_accuracies: head k at t guesses t + k + 2), answer tokens only.
    from nanomedusa.training.data import IGNORE, Example
    from nanomedusa.training.losses import shifted_targets

    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        T = int(torch.randint(3, 30, (), generator=gen))
        ids = torch.randint(5, 90, (T,), generator=gen).tolist()
        labels = [t if bool(torch.rand((), generator=gen) < 0.7) else IGNORE for t in ids]
        targets = shifted_targets(torch.tensor([labels]), 4)[1:, 0]  # [K, T]: head k's target at t
        for m in range(1, 5):
            rows, got = probe.targets_at_depth(Example(ids, labels), m, "cpu")
            t = torch.nonzero(targets[m - 1] != IGNORE)[:, 0]
            assert torch.equal(rows - (m - 1), t) and torch.equal(got, targets[m - 1][t])


def test_the_loss_is_zero_for_a_draft_that_predicts_the_next_feature(tmp_path):
    # draft_loss scores the predicted f_{j+1} against the base model's feature at j + 1 and its guess against x_{j+2}:
    # a draft returning exactly the next features has no feature loss, and its token loss is the base model's own.
    from nanomedusa.training.data import IGNORE, Example

    make_hf_checkpoint(tmp_path, seed=2)
    model, _ = load_model(tmp_path, "cpu", torch.float32)
    ids = [5, 9, 14, 3, 22, 7, 11]
    example = Example(ids, [IGNORE, IGNORE, IGNORE, 3, 22, 7, 11])
    features, _ = probe.example_tensors(model, example)

    class Oracle(torch.nn.Module):
        def forward(self, embeds, feats):
            return torch.cat([feats[:, 1:], feats[:, -1:]], dim=1)  # row j: f_{j+1}

    loss, tokens = probe.draft_loss(Oracle(), model, [example], ce_weight=1.0)
    rows = torch.tensor([1, 2, 3, 4])  # j with x_{j+2} an answer token
    want = F.cross_entropy(F.linear(features[rows + 1], model.lm_head.weight), torch.tensor(ids[3:]), reduction="sum")
    assert tokens == 4 and torch.allclose(loss, want, atol=1e-5)


def test_a_batch_is_its_answers_run_alone(tmp_path):
    # Answers of unequal length share one right-padded forward (base model and draft): each answer's features,
    # embeddings and predictions are those of a forward of it alone, and the batch's loss is the sum of its answers'
    # (an answer with nothing to score first, so the others' rows sit after an offset).
    from nanomedusa.training.data import IGNORE, Example

    model, draft, long_answer = random_draft_and_answer(tmp_path, T=14)
    batch = [Example([4, 6, 8], [IGNORE] * 3), long_answer, Example([7, 5, 12, 9, 3, 8], [IGNORE] * 3 + [9, 3, 8])]
    with torch.no_grad():
        features, embeds = probe.batch_tensors(model, batch)
        predicted = draft(embeds, features)
        for b, example in enumerate(batch):
            L, ids = len(example.input_ids), torch.tensor(example.input_ids)
            assert torch.allclose(features[b, :L], model.forward_hidden(ids[None])[0], atol=1e-6)
            assert torch.equal(embeds[b, : L - 1], model.tok_embeddings(ids[1:]))
            alone_features, alone_embeds = probe.example_tensors(model, example)
            # Rounding, not a bug, parts them: a few float32 ulps of the largest logit (45-57 here) where the batched
            # and the lone products take different BLAS kernels; a wrong row or offset would differ by whole units.
            alone = draft(alone_embeds, alone_features)
            assert torch.allclose(predicted[b, :L], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())
        batch_loss, batch_tokens = probe.draft_loss(draft, model, batch, ce_weight=0.5)
        alone = [probe.draft_loss(draft, model, [e], ce_weight=0.5) for e in batch]
    assert [n for _, n in alone] == [0, 12, 3] and batch_tokens == 15
    assert torch.allclose(batch_loss, sum(loss for loss, _ in alone), rtol=1e-6)


@torch.no_grad()
def test_every_node_of_a_grown_tree_is_its_path_run_alone(tmp_path):
    # Each node's call, down the answer's own path and across a grown tree whose siblings share child tokens, gives
    # the guesses of its path's chain run from scratch; a chain tree accepts what the chain's top-1s get right.
    model, draft, example = random_draft_and_answer(tmp_path)
    features, embeds = probe.example_tensors(model, example)
    W, ids = model.lm_head.weight, example.input_ids
    guesses = probe.draft_guesses(draft, embeds, features, W, depth=3)
    sim = probe.TreeSimulator(draft, model, example, max_depth=3, ranks=4)
    for t in (1, 4, 7):
        root = sim.root(t)
        grown = sim.grow(root, t, depth=3, beam=3, branch=4)
        for node in [root, *[n for n in grown if n.call is not None]]:
            path = [*node.ancestors(), node] if node.parent else []  # its tokens after the root
            tokens = torch.tensor([n.token for n in path], dtype=torch.long)
            want = chain_logits(draft, embeds, features, W, t, len(path) + 1, model.tok_embeddings(tokens))
            got_tokens, got_logprobs = zip(*node.call.ranked)
            values, indices = F.log_softmax(want, -1).topk(4)
            assert list(got_tokens) == indices.tolist() and torch.allclose(torch.tensor(got_logprobs), values,
                                                                              atol=1e-4), (t, [n.token for n in path])
        assert sum(n.call is not None for n in grown) >= 3  # the checks above reached depth 2 and 3
    for t in range(1, len(ids) - 4):
        right = [int(guesses[d - 1][t + d - 1].argmax()) == ids[t + 1 + d] for d in range(1, 4)]
        want = next((i for i, r in enumerate(right) if not r), 3)
        assert sim.accepted(sim.static_tree(t, [[0], [0, 0], [0, 0, 0]]), t) == want


@torch.no_grad()
def test_static_trees_follow_their_ranks_and_acceptance_follows_the_answer(tmp_path):
    from nanomedusa.training.data import IGNORE, Example

    model, draft, example = random_draft_and_answer(tmp_path)
    sim = probe.TreeSimulator(draft, model, example, max_depth=2, ranks=3)
    root = sim.static_tree(3, [[0], [1], [1, 0], [2]])
    ranked = [tok for tok, _ in root.call.ranked]
    assert list(root.children) == ranked[:3]
    second = root.children[ranked[1]]
    assert list(second.children) == [second.call.ranked[0][0]] and not root.children[ranked[0]].children
    # acceptance: down the tree while the answer's next token is a child, and never past a token that is not the
    # answer's (IGNORE: another turn, or the prompt)
    ids = example.input_ids
    path_tree = probe.DraftNode(ids[4], 0.0, None)
    a = path_tree.children[ids[5]] = probe.DraftNode(ids[5], -1.0, path_tree)
    a.children[ids[6]] = probe.DraftNode(ids[6], -2.0, a)
    assert sim.accepted(path_tree, 3) == 2
    cut = Example(ids, [*example.labels[:6], IGNORE, *example.labels[7:]])
    assert probe.TreeSimulator(draft, model, cut, 2, 3).accepted(path_tree, 3) == 1


@torch.no_grad()
def test_decoding_with_trees_walks_every_turn_as_the_engine_steps(tmp_path):
    from nanomedusa.training.data import IGNORE, Example

    model, draft, _ = random_draft_and_answer(tmp_path)
    ids = list(range(10, 30))
    labels = [IGNORE] * 3 + ids[3:10] + [IGNORE] * 2 + ids[12:]  # turns: positions 3..9 and 12..19
    example = Example(ids, labels)
    assert probe.answer_spans(example) == [(3, 10), (12, 20)]
    sim = probe.TreeSimulator(draft, model, example, max_depth=2, ranks=2)

    def answers_own_path(t, depth=2):  # a tree holding the answer's next `depth` tokens: every guess accepted
        root = node = probe.DraftNode(ids[t + 1], 0.0, None)
        for d in range(min(depth, len(ids) - t - 2)):
            node.children[ids[t + 2 + d]] = node = probe.DraftNode(ids[t + 2 + d], 0.0, node)
        return root

    # each turn's first token from the prefill, then 3 tokens a step (2 accepted + 1): turn 1 has 6 more tokens (2
    # steps), turn 2 has 7 (3 steps, the last emitting 1)
    assert probe.decode_with_trees(sim, example, answers_own_path) == (13, 5)
    assert probe.decode_with_trees(sim, example, lambda t: probe.DraftNode(ids[t + 1], 0.0, None)) == (13, 13)


@torch.no_grad()
def test_a_dynamic_tree_keeps_its_likeliest_nodes_and_their_ancestors(tmp_path):
    model, draft, example = random_draft_and_answer(tmp_path)
    t, paths, depth, beam, branch = 4, 7, 3, 2, 3
    sim = probe.TreeSimulator(draft, model, example, max_depth=depth, ranks=branch)
    grown = sim.grow(sim.root(t), t, depth, beam, branch)
    # each depth grows `branch` children under each of the `beam` likeliest nodes of the depth before (the root first)
    by_depth = [[n for n in grown if n.depth == d] for d in range(1, depth + 1)]
    assert [len(nodes) for nodes in by_depth] == [branch] + [beam * branch] * (depth - 1)
    for above, below in zip(by_depth, by_depth[1:]):
        likeliest = sorted(above, key=lambda n: -n.score)[:beam]
        assert {id(n.parent) for n in below} == {id(n) for n in likeliest}
    for node in grown:  # each child among its parent's `branch` likeliest, its score its path's log-probability
        logprob = dict(node.parent.call.ranked)[node.token]
        assert abs(node.score - (node.parent.score + logprob)) < 1e-6

    def reachable(node):
        return [c for child in node.children.values() for c in (child, *reachable(child))]

    # (a second tree of the same start: the same calls, so the same scores)
    kept = reachable(sim.dynamic_tree(t, paths, depth, beam, branch))  # through kept parents only
    cut = min(n.score for n in kept)
    assert len(kept) == paths and all(n.score <= cut for n in grown if n.score not in {k.score for k in kept})


def test_bad_flags_end_in_one_error_line_before_any_training(tmp_path, capsys):
    train, held = pairs_probe_files(tmp_path, 2, 2)
    capsys.readouterr()  # (the checkpoint's own progress lines)
    base = ["--model", str(tmp_path / "ckpt"), "--train", str(train), "--eval", str(held), "--device", "cpu"]
    assert probe.main([*base, "--heads", str(tmp_path / "missing")]) == 2
    assert probe.main([*base, "--heads", "", "--topk", "3"]) == 2
    assert probe.main([*base, "--heads", "", "--depth", "1", "--sim-paths", "9"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --heads {tmp_path / 'missing'} is not a directory; check the path.",
        "error: --topk 3: the table reports top-5 accuracy; pass --topk 5 or more.",
        "error: --sim-paths 9: each must be 1 to 8 (--topk 8 ranks, --depth 1 deep)."]


def test_the_answers_are_rendered_in_chat_format(tmp_path, monkeypatch):
    # The draft and the heads are measured on answers rendered as the heads were trained: in --chat-format's format.
    train, held = pairs_probe_files(tmp_path, 2, 2)
    fed, want = fed_in_each_format(probe, monkeypatch, [
        "--model", str(tmp_path / "ckpt"), "--heads", "", "--train", str(train), "--eval", str(held), "--device",
        "cpu"])
    assert fed == want and want[0] != want[1]

"""bench/feature_draft_probe.py on a tiny model: every depth's guesses, computed for all chains in one attention call,
equal each chain run alone; and the probe trains, measures and compares on tiny answers."""

import json

import torch
import torch.nn.functional as F

from bench import feature_draft_probe as probe
from nanomedusa.loading import load_model
from tests.helpers import make_hf_checkpoint
from tests.test_conditioned_heads_probe import pairs_probe_files


def chain_logits(draft, embeds, features, lm_head_weight, t: int, depth: int) -> torch.Tensor:
    """The depth-th guess of the chain that starts at t, run alone: the inputs at positions 0 .. t from the true
    features, then one position at a time from the feature the draft just predicted, causal attention over them."""
    x = draft.inputs(embeds[: t + 1], features[: t + 1])
    for s in range(depth):  # x [t + 1 + s, D]
        q, k, v = draft.qkv(x, *draft.rope(len(x)))
        predicted = draft.attend(x, q, k, v, torch.ones(len(x), len(x), dtype=torch.bool).tril())[-1:]
        if s + 1 < depth:
            x = torch.cat([x, draft.inputs(embeds[t + s + 1: t + s + 2], predicted)])
    return F.linear(predicted[0], lm_head_weight)


def test_each_depths_guesses_are_its_chains_run_alone(tmp_path):
    make_hf_checkpoint(tmp_path, seed=2, num_key_value_heads=2)
    model, _ = load_model(tmp_path, "cpu", torch.float32)
    draft = probe.FeatureDraft(model.config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():  # larger than the init, so that every input and position matters
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if p.dim() == 1 else 0.3))
        T, D = 9, model.config.dim
        embeds, features = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
        W = model.lm_head.weight
        logits = probe.draft_guesses(draft, embeds, features, W, depth=3)
        assert torch.allclose(logits[0], F.linear(draft(embeds, features), W), atol=1e-5)  # depth 1: causal
        for m, depth_logits in enumerate(logits, start=1):
            for t in range(T - m + 1):
                want = chain_logits(draft, embeds, features, W, t, m)
                assert torch.allclose(depth_logits[t + m - 1], want, atol=1e-4), (m, t)
        # the chains differ from depth to depth (the check above would pass on a draft that ignored its own features)
        assert not torch.allclose(logits[1][2:], logits[0][2:], atol=1e-3)
    mask = probe.frontier_mask(4, 2, "cpu").int().tolist()
    assert mask == [[0, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 0],
                    [1, 1, 1, 0, 0, 0, 0, 1]]


def test_the_probe_trains_measures_and_compares(tmp_path):
    # Answers of letter pairs ("qqzzbb..."): after the first of a pair the next letter repeats, which the token the
    # draft reads beside the feature tells; training must find it.
    train, held = pairs_probe_files(tmp_path, 32, 8)
    args = ["--model", str(tmp_path / "ckpt"), "--heads", str(tmp_path / "heads"), "--train", str(train), "--eval",
            str(held), "--depth", "3", "--topk", "4", "--nodes", "6", "--batch", "4", "--lr", "1e-2", "--ce-weight",
            "1", "--device", "cpu", "--log-every", "1000", "--json", str(tmp_path / "p.json")]
    untrained = probe.run(probe.parse_args(args + ["--epochs", "0"]))
    out = probe.run(probe.parse_args(args + ["--epochs", "8"]))  # (a random tiny model's features: slow to learn)
    acc = torch.tensor(out["draft_acc"])
    assert acc.shape == (3, 4) and bool((acc >= 0).all()) and bool((acc.sum(1) <= 1 + 1e-9).all())
    assert len(torch.tensor(out["heads_acc"])) == 2  # the heads' table: one row per head
    assert out["losses"][-1] < out["losses"][0]
    assert out["draft_acc"][0][0] > untrained["draft_acc"][0][0] + 0.1
    assert out["expected_accepted"]["draft"] >= 1.0 and out["expected_accepted"]["heads"] >= 1.0
    assert json.loads((tmp_path / "p.json").read_text())["draft_acc"] == out["draft_acc"]

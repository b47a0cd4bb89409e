"""bench/conditioned_heads_probe.py on a tiny model: the variants start as the head they copy, and reading the
root token lets head 0 learn what its hidden state alone does not hold."""

import json
import random
import string

import torch
import torch.nn.functional as F

from bench import conditioned_heads_probe as probe
from nanomedusa.errors import NanoMedusaError
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.tokenizer import Tokenizer
from nanomedusa.training.data import load_conversations, tokenize_all
from tests.test_training import write_counting_data
from tests.tiny_tokenizer import make_chat_checkpoint


def write_pairs_data(path, n, seed):
    """Answers of random letters, each written twice ("qqzzbb..."): after the first of a pair the next letter is
    that one again, which no hidden state before it can know but the letter itself tells."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            answer = "".join(2 * rng.choice(string.ascii_lowercase) for _ in range(20))
            turns = [{"from": "human", "value": "pairs"}, {"from": "gpt", "value": answer}]
            f.write(json.dumps({"id": f"p{i}", "conversations": turns}) + "\n")
    return path


def test_a_conditioned_head_starts_as_its_copy_and_reads_the_right_tokens(tmp_path):
    make_chat_checkpoint(tmp_path / "ckpt", seed=3)
    model, _ = load_model(tmp_path / "ckpt", "cpu", torch.float32)
    examples = tokenize_all(Tokenizer.from_dir(tmp_path / "ckpt"),
                            load_conversations(write_counting_data(tmp_path / "d.jsonl", 4, seed=1)), 256)
    stream = probe.Stream(model, examples)
    assert stream.hidden.shape == (stream.ids.numel(), model.config.dim)
    heads = MedusaHeads.from_base(model, num_heads=2, num_layers=1, shared_lm_head=True)
    with torch.no_grad():
        heads.medusa_head[1][0].linear.weight.normal_(0, 0.1)
    t = stream.positions(1)
    # every position's target (t + 3) is an answer token of t's own example
    assert len(t) and bool((t + 3 < stream.end[t]).all()) and bool((stream.labels[t + 3] >= 0).all())
    plain = probe.ProbeHead(heads.medusa_head[1][:1], 0, model.config.dim)
    reading = probe.ProbeHead(heads.medusa_head[1][:1], 2, model.config.dim)
    with torch.no_grad():
        assert torch.equal(plain(stream, t, model), reading(stream, t, model))
        reading.condition.weight.normal_()
        # what it adds to h_t: W [e(x_{t+1}), e(x_{t+2})], the two tokens after t
        e = model.tok_embeddings(torch.stack([stream.ids[t + 1], stream.ids[t + 2]], 1)).flatten(1)
        want = F.linear(heads.medusa_head[1][:1](stream.hidden[t] + reading.condition(e)), model.lm_head.weight)
        assert not torch.allclose(want, plain(stream, t, model), atol=1e-3)
        assert torch.allclose(reading(stream, t, model), want, atol=1e-5)


def pairs_probe_files(tmp_path, n_train: int, n_eval: int):
    """A tiny chat checkpoint in tmp_path/ckpt, two fresh heads sharing its lm_head in tmp_path/heads, and letter-pair
    answers to train on and to measure on -> (train file, eval file)."""
    make_chat_checkpoint(tmp_path / "ckpt", seed=4)
    model, _ = load_model(tmp_path / "ckpt", "cpu", torch.float32)
    MedusaHeads.from_base(model, num_heads=2, num_layers=1, shared_lm_head=True).save(tmp_path / "heads")
    return (write_pairs_data(tmp_path / "train.jsonl", n_train, seed=1),
            write_pairs_data(tmp_path / "eval.jsonl", n_eval, seed=2))


def test_the_probe_runs_every_variant_and_reading_the_root_helps_where_it_should(tmp_path, capsys):
    train, held = pairs_probe_files(tmp_path, 64, 16)
    out = probe.run(probe.parse_args([
        "--model", str(tmp_path / "ckpt"), "--heads", str(tmp_path / "heads"), "--train", str(train), "--eval",
        str(held), "--probe-heads", "0", "1", "--steps", "150", "--batch", "64", "--lr", "1e-2", "--condition-lr",
        "3e-2", "--device", "cpu", "--json", str(tmp_path / "p.json")]))
    got = {(r["head"], r["variant"]): r for r in out["results"]}
    assert sorted(got) == [(0, "medusa"), (0, "root"), (0, "shipped"), (1, "medusa"), (1, "path"), (1, "root"),
                           (1, "shipped")]
    assert all(0 <= r["top1"] <= r["top5"] <= 1 for r in out["results"])
    # pairs: where the root opens a pair, head 0's target is the root again (about half the positions)
    assert got[(0, "root")]["top1"] > got[(0, "medusa")]["top1"] + 0.2
    # and where t + 2 opens one, head 1's target is t + 2's letter: only the path (the tree's own token) tells
    assert got[(1, "path")]["top1"] > got[(1, "root")]["top1"] + 0.2
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["results"] == out["results"] and saved["chat_format"] == "chatml"  # (the format the answers had)
    capsys.readouterr()
    assert probe.main(["--model", str(tmp_path / "ckpt"), "--heads", str(tmp_path / "heads"), "--train", str(train),
                       "--eval", str(held), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'heads'} has 2 heads; pass --probe-heads among 0 .. 1.\n"


def fed_in_each_format(module, monkeypatch, argv) -> tuple[list, list]:
    """A probe's `main(argv)` with --chat-format auto, then plain, each run stopped once it tokenized --train ->
    (the ids it tokenized, per run; --train's ids from --model's tokenizer in those two formats)."""
    tokenized, fed = probe.load_examples, []

    def load_examples(tokenizer, files, max_len):
        fed.append([e.input_ids for e in tokenized(tokenizer, files, max_len)])
        raise NanoMedusaError("enough")

    monkeypatch.setattr(module, "load_examples", load_examples)
    for chat_format in ("auto", "plain"):
        assert module.main([*argv, "--chat-format", chat_format]) == 2
    model, train = argv[argv.index("--model") + 1], argv[argv.index("--train") + 1]
    want = [[e.input_ids for e in tokenized(Tokenizer.from_dir(model, preset), [train], 1024)]
            for preset in ("auto", "plain")]
    return fed, want


def test_the_answers_are_rendered_in_chat_format(tmp_path, monkeypatch):
    # Heads learn the prompt format they were trained on: the probe measures them on answers rendered in it.
    train, held = pairs_probe_files(tmp_path, 2, 2)
    fed, want = fed_in_each_format(probe, monkeypatch, [
        "--model", str(tmp_path / "ckpt"), "--heads", str(tmp_path / "heads"), "--train", str(train), "--eval",
        str(held), "--probe-heads", "0", "--device", "cpu"])
    assert fed == want and want[0] != want[1]

"""Training on tiny random chat checkpoints: data rendering, warm-up, joint, resume, distillation, CLI errors.

The synthetic task: the user asks "count from x", the assistant answers with the alphabet from x, then
the capitals, then "." -- so every future answer token follows from the current one, except the first
answer letter (it depends on the prompt). Heads on a random backbone can therefore learn it well.
"""

import importlib
import json
import random
import re
import shutil
import string
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train as train_cli
from nanomedusa import calibration, tree_tuning
from nanomedusa.adapter import ADAPTER_FILE, apply_adapter
from nanomedusa.heads import MedusaHeads, load_heads_and_adapter
from nanomedusa.loading import load_model
from nanomedusa.tokenizer import Tokenizer
from nanomedusa.training import DistillConfig, TrainConfig, Trainer, distill
from nanomedusa.errors import NanoMedusaError
from nanomedusa.training.data import (IGNORE, Conversation, Example, StepSampler, load_conversations, mix_examples,
                                      split_by_position, tokenize_all, tokenize_conversation, tokenize_held_out,
                                      train_eval_split)
from nanomedusa.training import hidden_cache
from nanomedusa.training.hidden_cache import HiddenCache, backbone_key, fingerprint
from nanomedusa.training.losses import shifted_targets, token_stats
from tests.tiny_tokenizer import make_chat_checkpoint

distill_module = importlib.import_module("nanomedusa.training.distill")  # the package's `distill` is the function
trainer_module = importlib.import_module("nanomedusa.training.trainer")

LOWER = string.ascii_lowercase


def counting_answer(start: int) -> str:
    return LOWER[start:] + string.ascii_uppercase + string.digits + "."


def write_counting_data(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            s = rng.randrange(26)
            turns = [{"from": "human", "value": f"count from {LOWER[s]}"}, {"from": "gpt", "value": counting_answer(s)}]
            f.write(json.dumps({"id": f"c{i}", "conversations": turns}) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: extra threads cost more than they save (several times over on shared CI cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    seed = 0  # (fixed: a failure must be one that can be run again)
    make_chat_checkpoint(root / "ckpt", seed=seed)
    return root, str(root / "ckpt"), str(write_counting_data(root / "data.jsonl", 128, seed))


def config(setup, out, **kw):
    root, ckpt, data = setup
    base = dict(model=ckpt, data=data, out=str(root / out), batch_size=8, lr=1e-2, warmup_steps=5,
                log_every=5, save_every=0, eval_fraction=0.125, max_len=160, seed=3)
    return TrainConfig(**{**base, **kw})


def all_close(a: dict, b: dict, tol: float) -> bool:
    return a.keys() == b.keys() and all((a[k].float() - b[k].float()).abs().max() <= tol for k in a)


# ----- data --------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_answers(setup):
    tok = Tokenizer.from_dir(setup[1])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "bye"}]
    ex = tokenize_conversation(tok, messages, max_len=1000)
    assert ex.input_ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False), add_bos=False)
    answer_ids = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(answer_ids, skip_special_tokens=False) == "hello there<|im_end|>\nbye<|im_end|>\n"
    labelled = [i for i, t in enumerate(ex.labels) if t != IGNORE]
    assert all(ex.labels[i] == ex.input_ids[i] for i in labelled)
    cut = tokenize_conversation(tok, messages, max_len=len(tok.encode_chat(messages[:2])) + 3)
    assert cut.input_ids == ex.input_ids[: len(cut.input_ids)] and sum(t != IGNORE for t in cut.labels) == 3
    assert tokenize_conversation(tok, messages[:2], max_len=1000) is None  # no answer, nothing to learn
    # distillation cut the last answer before the model ended it: no end-of-turn marker after it to learn
    unfinished = tokenize_conversation(tok, messages, max_len=1000, truncated=True)
    assert tok.decode([t for t in unfinished.labels if t != IGNORE], skip_special_tokens=False) == \
        "hello there<|im_end|>\nbye"
    assert unfinished.input_ids == ex.input_ids[: len(unfinished.input_ids)] < ex.input_ids


def test_formats_and_split(tmp_path):
    sharegpt = {"id": "a", "conversations": [{"from": "gpt", "value": "orphan"}, {"from": "human", "value": "q"},
                                             {"from": "gpt", "value": "r"}]}
    openai = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}
    prompt = {"id": "p", "source": "x", "prompt": "q"}
    (tmp_path / "d.json").write_text(json.dumps([sharegpt, openai, prompt]))
    a, b, c = load_conversations(tmp_path / "d.json")
    assert a.messages == b.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert (a.id, b.id, c.id) == ("a", "1", "p") and c.messages == [{"role": "user", "content": "q"}]
    odd = {"prompt": "line\u2028separator\x85next\r\n"}  # JSON lines may hold these unescaped
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [odd, openai]) + "\n", encoding="utf-8")
    assert [c.messages[0]["content"] for c in load_conversations(tmp_path / "d.jsonl")] == [odd["prompt"], "q"]
    (tmp_path / "bom.jsonl").write_text(json.dumps(prompt) + "\n", encoding="utf-8-sig")  # as some editors save
    assert [c.id for c in load_conversations(tmp_path / "bom.jsonl")] == ["p"]
    items = list(range(50))
    train, held = split_by_position(items, 0.2, seed=7)
    assert len(held) == 10 and sorted(train + held) == items and split_by_position(items, 0.2, seed=7)[1] == held
    assert split_by_position(items, 0.2, seed=8)[1] != held


def test_the_split_by_id_keeps_each_conversation_on_its_side_as_a_file_grows(tmp_path):
    def conversations(ids):
        turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        return [Conversation(i, turns) for i in ids]

    first = conversations([f"c{i}" for i in range(200)])
    grown = conversations([f"c{i}" for i in reversed(range(300))])  # distillation went on; the file was reordered
    ids = {c.id for c in first}
    for split, stays in (("id", True), ("position", False)):
        train, held = train_eval_split(first, 0.1, 3, split)
        train2, held2 = train_eval_split(grown, 0.1, 3, split)
        moved = {c.id for c in held2} & ids != {c.id for c in held}
        assert moved is not stays and (not stays or {c.id for c in train2} & ids == {c.id for c in train})
    held = train_eval_split(first, 0.1, 3, "id")[1]
    assert 10 <= len(held) <= 30 and held != train_eval_split(first, 0.1, 4, "id")[1]  # about a tenth, by the seed
    with pytest.raises(NanoMedusaError, match="unknown split 'ids'; use one of id, position."):
        train_eval_split(first, 0.1, 3, "ids")
    # a small file keeps one conversation on each side whatever the share; one alone trains
    for fraction, sizes in ((0.001, [2, 1]), (0.999, [1, 2])):
        assert [len(part) for part in train_eval_split(first[:3], fraction, 3)] == sizes
    assert [len(part) for part in train_eval_split(first[:1], 0.5, 3)] == [1, 0]
    assert train_eval_split(first, 0.0, 3) == (first, [])


def test_held_out_settings_come_from_the_flags_else_the_heads_record_else_the_defaults():
    from nanomedusa.training.data import held_out_split

    record = {"eval_fraction": 0.1, "seed": 7, "split": "id"}
    assert held_out_split(record, None, None, None) == (0.1, 7, "id")
    assert held_out_split(record, 0.3, 2, "position") == (0.3, 2, "position")
    assert held_out_split({}, None, None, None) == (0.02, 0, "position")  # heads of a version before the record
    assert held_out_split(None, None, None, None, reads_heads=False) == (0.02, 0, "id")  # new heads
    assert held_out_split({**record, "eval_fraction": 0}, None, None, None)[0] == 0.02  # (and a note says why)
    for key, value, flag in (("eval_fraction", "0.1", "--eval-fraction"), ("eval_fraction", 1.5, "--eval-fraction"),
                             ("seed", 3.0, "--seed"), ("seed", -1, "--seed"), ("split", "ids", "--split")):
        with pytest.raises(NanoMedusaError, match=f"config.json has held_out.{key} {value!r}, which is no {flag}; fix "
                                                  f"it, or pass {flag}."):
            held_out_split({**record, key: value}, None, None, None)
        given = {"--eval-fraction": 0.1, "--seed": 7, "--split": "id"}
        assert held_out_split({**record, key: value}, *given.values()) == (0.1, 7, "id")  # a flag given: not read


def test_overwrite_knows_which_paths_it_would_remove(tmp_path, monkeypatch):
    from nanomedusa.training.checkpoint import output_holding

    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "heads").symlink_to(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    assert output_holding(out, "out/model/x") == out / "model"
    assert output_holding("out", tmp_path / "out" / "checkpoint") == Path("out") / "checkpoint"
    assert output_holding(out, tmp_path / "elsewhere") == out / "heads"  # what a link in OUT points to
    assert output_holding(out, out) is None and output_holding(out, out / "cache") is None
    assert output_holding(out, tmp_path / "out-model") is None


MALFORMED = [  # (file name, text, what the error says after the file's name)
    ("role.jsonl", '{"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "a"}]}\n',
     "line 1 has a turn"),
    ("role.json", '[{"messages": [{"role": {"a": 1}, "content": "hi"}]}]', "record 1 has a turn"),
    ("turns.jsonl", '{"prompt": "a"}\n{"conversations": "hello"}\n', "line 2 has turns that are not a list"),
    ("text.jsonl", '{"conversations": [{"from": "human", "value": "hi \\ud83d"}, {"from": "gpt", "value": "a"}]}\n',
     "line 1 is not valid UTF-8"),
    ("id.json", '[{"prompt": "a"}, {"id": "a\\udc00", "prompt": "b"}]', "record 2 is not valid UTF-8"),
    ("deep.jsonl", '{"prompt": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", "line 2 nests its JSON too deeply"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nests its JSON too deeply"),
    ("lines.json", '{"prompt": "a"}\n{"prompt": "b"}\n', "a file of one record per line must be named .jsonl"),
]


@pytest.mark.parametrize("name, text, says", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_records_are_one_sentence(tmp_path, name, text, says):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(NanoMedusaError, match=f"^{path} .*{says}[^.]*\\.$"):
        load_conversations(path)


def test_mix_weights_repeat_and_thin_each_file(setup, tmp_path):
    a, b = [Example([i], [i]) for i in range(10)], [Example([100 + i], [100 + i]) for i in range(8)]
    mixed = mix_examples([a, b], [2, 0.5], seed=1)
    assert sum(e in a for e in mixed) == 20 and sum(e in b for e in mixed) == 4
    assert mixed == mix_examples([a, b], [2, 0.5], seed=1)  # the seed alone decides which half is kept
    # Through the trainer: each file is split on its own, and the weights apply to the training parts.
    other = write_counting_data(tmp_path / "other.jsonl", 64, seed=5)
    trainer = Trainer(config(setup, "mix", data=[setup[2], str(other)], data_weights=[1, 0.5]))
    one = Trainer(config(setup, "mix1"))
    other_train, other_eval = train_eval_split(load_conversations(other), 0.125, 3)  # (config's split)
    assert len(trainer.train_set) == len(one.train_set) + round(len(other_train) / 2)  # + half of other's training
    assert len(trainer.eval_set) == len(one.eval_set) + len(other_eval) and 0 < len(other_eval) < 64
    with pytest.raises(NanoMedusaError, match="one weight per file"):
        Trainer(config(setup, "mix2", data=[setup[2], str(other)], data_weights=[1]))


def test_shifted_targets_and_sampler():
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :2] = IGNORE
    targets = shifted_targets(labels, num_heads=3)
    for j in range(4):
        for t in range(9):
            expect = labels[:, t + j + 1] if t + j + 1 < 9 else torch.full((3,), IGNORE)
            assert torch.equal(targets[j, :, t], expect)
    two = [StepSampler(40, 2, 3, 2, rank, seed=1) for rank in range(2)]
    one = StepSampler(40, 4, 3, 1, 0, seed=1)
    for step in (0, 1, 5):  # the global batch is the same whatever the process count
        assert sorted(sum(two[0].micro_batches(step) + two[1].micro_batches(step), [])) == sorted(sum(one.micro_batches(step), []))
    epoch = sum((sum(one.micro_batches(s), []) for s in range(3)), [])
    assert one.steps_per_epoch == 3 and len(set(epoch)) == 36  # each example once, the last partial batch dropped


def test_token_stats_match_topk():
    logits = torch.randn(3, 40, 30)
    targets = torch.randint(0, 30, (3, 40))
    targets[:, ::7] = IGNORE
    ce, stats = token_stats(logits, targets)
    valid = targets != IGNORE
    top5 = logits.topk(5, dim=-1).indices
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1))
    assert torch.equal(stats[:, 1], valid.sum(-1).float())
    assert torch.equal(stats[:, 2], ((top5[..., 0] == targets) & valid).sum(-1).float())
    assert torch.equal(stats[:, 3], ((top5 == targets[..., None]).any(-1) & valid).sum(-1).float())


# ----- warm-up ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warmed(setup):
    trainer = Trainer(config(setup, "warm", max_steps=40))
    before = {k: v.clone() for k, v in trainer.module.model.state_dict().items()}
    results = trainer.run()
    return trainer, before, results


def test_warmup_heads_learn_the_future(warmed):
    trainer, _, results = warmed
    log = [json.loads(line) for line in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    assert log[-1]["heads"][0]["top1"] > log[0]["heads"][0]["top1"] + 0.2
    assert json.loads((trainer.out / "eval.json").read_text()) == results
    # Only targets within the first answer letters are unpredictable (k + 2 of ~52 for head k).
    assert results["heads"][0]["top1"] >= 0.9 and results["heads"][3]["top1"] >= 0.85
    assert results["lm"]["top1"] < 0.3  # the untouched random backbone has not learnt the task


def test_warmup_keeps_backbone_and_saves_loadable_heads(warmed):
    trainer, before, _ = warmed
    after = trainer.module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in trainer.module.model.parameters())
    model = trainer.module.model
    loaded = MedusaHeads.load(trainer.out / "heads", model.config, "cpu", torch.float32)
    hidden = torch.randn(5, model.config.dim)
    with torch.no_grad():
        assert torch.allclose(loaded(hidden, model.lm_head.weight), trainer.module.heads(hidden, model.lm_head.weight), atol=1e-6)


def test_hidden_cache_serves_later_epochs(setup, warmed, tmp_path):
    # (split by position: 112 training examples exactly, 14 whole batches, so the second epoch reads no new one)
    cached = Trainer(config(setup, "cached", epochs=2, cache_hidden=str(tmp_path / "cache"), split="position"))
    calls = []
    backbone = cached.module.model.forward_hidden
    cached.module.model.forward_hidden = lambda tokens: calls.append(tokens.shape) or backbone(tokens)
    cached.run()
    steps = cached.sampler.steps_per_epoch
    assert cached.total_steps == 2 * steps and len(list((tmp_path / "cache").glob("*.safetensors"))) == steps * 8
    eval_calls = len(calls) - steps
    assert eval_calls == -(-len(cached.eval_set) // 8)  # epoch 2 ran no backbone at all
    plain = Trainer(config(setup, "uncached", epochs=2, split="position"))
    plain.run()
    assert all_close(cached.module.heads.state_dict(), plain.module.heads.state_dict(), tol=1e-5)
    with pytest.raises(NanoMedusaError, match="made for another model"):
        Trainer(config(setup, "other", epochs=2, max_len=100, cache_hidden=str(tmp_path / "cache")))


def test_continued_heads_drop_what_was_measured_on_their_old_weights(setup, warmed, tmp_path):
    # Temperatures and rank accuracies describe the weights they were fitted on; trained on, the heads save
    # without them (calibration.py and tree_tuning.py refit them), and keep everything else.
    heads_dir = tmp_path / "heads"
    shutil.copytree(warmed[0].out / "heads", heads_dir)
    raw = json.loads((heads_dir / "config.json").read_text())
    fitted = {"medusa_temperatures": [1.5] * raw["medusa_num_heads"], "rank_accuracy": [[0.5]] * raw["medusa_num_heads"],
              "medusa_choices": [[0], [1]]}
    (heads_dir / "config.json").write_text(json.dumps({**raw, **fitted}))
    trainer = Trainer(config(setup, "continued", heads=str(heads_dir), max_steps=2))
    trainer.run()
    saved = json.loads((trainer.out / "heads" / "config.json").read_text())
    assert saved.get("medusa_temperatures") is None and saved.get("rank_accuracy") is None
    assert saved["medusa_choices"] == [[0], [1]]


# ----- joint --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_joint_changes_backbone_and_keeps_lm_loss(setup, warmed, lora_rank):
    trainer = Trainer(config(setup, f"joint{lora_rank}", stage="joint", heads=str(warmed[0].out / "heads"), max_steps=12,
                             lora_rank=lora_rank, backbone_lr=3e-3, medusa_weight=0.5, medusa_weight_warmup=4))
    start = trainer.evaluate()
    results = trainer.run()
    # Trained on the LM loss too, the backbone must not get worse at it (it should get better).
    assert results["lm"]["loss"] <= start["lm"]["loss"] + 0.05
    assert results["heads"][0]["top1"] >= start["heads"][0]["top1"] - 0.05
    original, _ = load_model(setup[1], "cpu", "float32")
    heads_config = json.loads((trainer.out / "heads" / "config.json").read_text())
    if lora_rank:  # the heads ship the adapter; loading them onto the base model merges it (bf16 file)
        assert not (trainer.out / "model").exists() and heads_config["lora"] == {"rank": 4, "alpha": 16.0}
        exported, _ = load_model(setup[1], "cpu", "float32")
        assert "LoRA adapter" in apply_adapter(exported, trainer.out / "heads")
        tolerance = 2e-3
    else:
        exported, ckpt = load_model(trainer.out / "model", "cpu", "float32")
        assert (ckpt / "tokenizer.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
        assert heads_config["base_model_name_or_path"] == str(trainer.out / "model")  # heads pair with the new model
        tolerance = 1e-4
    changed = [k for k, v in exported.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert any(".attention.wqkv." in k for k in changed)
    tokens = torch.randint(0, 80, (2, 17))
    with torch.no_grad():  # the exported backbone (LoRA merged in) is the model that was trained
        assert torch.allclose(exported(tokens), trainer.module.model(tokens), atol=tolerance)


@pytest.fixture(scope="module")
def adapted(setup, warmed):
    """Medusa-2 heads: OUT/heads of LoRA joint training, which carry the backbone's adapter."""
    trainer = Trainer(config(setup, "lora-joint", stage="joint", heads=str(warmed[0].out / "heads"), max_steps=2,
                             lora_rank=4, backbone_lr=3e-3))
    trainer.run()
    return trainer.out / "heads"


def adapted_backbone(setup, heads_dir):
    """The base model with the adapter in `heads_dir` merged in: the backbone those heads read."""
    model = load_model(setup[1], "cpu", "float32")[0]
    apply_adapter(model, heads_dir)
    return model


def test_full_joint_from_adapted_heads_trains_their_backbone_into_out_model(setup, adapted):
    start = adapted_backbone(setup, adapted)
    trainer = Trainer(config(setup, "full-from-adapted", stage="joint", heads=str(adapted), max_steps=2,
                             backbone_lr=1e-3))
    trained = trainer.module.model
    assert all(torch.allclose(trained.state_dict()[k], v, atol=1e-6) for k, v in start.state_dict().items())
    trainer.run()
    saved = json.loads((trainer.out / "heads" / "config.json").read_text())
    assert saved["lora"] is None and saved["base_model_name_or_path"] == str(trainer.out / "model")
    assert not (trainer.out / "heads" / ADAPTER_FILE).exists()  # merged into OUT/model, not applied twice
    exported = load_model(trainer.out / "model", "cpu", "float32")[0]
    load_heads_and_adapter(trainer.out / "heads", exported, say=lambda _: pytest.fail("an adapter was merged"))
    tokens = torch.randint(0, 80, (2, 17))
    with torch.no_grad():
        assert torch.allclose(exported(tokens), trained(tokens), atol=1e-4)
        assert not torch.allclose(exported(tokens), start(tokens), atol=1e-4)  # the backbone did train on


def test_lora_joint_from_adapted_heads_is_refused_before_the_model_loads(setup, adapted, monkeypatch):
    monkeypatch.setattr(trainer_module, "load_model", lambda *args, **kw: pytest.fail("the model loaded"))
    with pytest.raises(NanoMedusaError, match=r"drop --lora-rank\) or start LoRA joint training from warm-up heads\.$"):
        Trainer(config(setup, "lora-on-lora", stage="joint", heads=str(adapted), lora_rank=4))


def test_half_precision_joint_training_is_refused_and_a_diverged_run_stops(setup, warmed):
    heads = str(warmed[0].out / "heads")
    for dtype in ("float16", "fp16", torch.float16, "bfloat16", "bf16", torch.bfloat16):
        with pytest.raises(NanoMedusaError, match="pass --dtype float32, or add --lora-rank"):
            config(setup, "fp16", stage="joint", heads=heads, dtype=dtype).check()
    for dtype in ("float16", "bfloat16"):  # LoRA trains float32
        config(setup, "half", stage="joint", heads=heads, dtype=dtype, lora_rank=4).check()
    config(setup, "float32", stage="joint", heads=heads, dtype="float32").check()
    # The first step's update (~lr) blows the heads up: the next window's loss is not finite, and with one step only,
    # the final evaluation's. Either way nothing diverged is exported.
    for steps, stop in ((4, 2), (1, 1)):
        trainer = Trainer(config(setup, f"diverged{steps}", lr=1e30, warmup_steps=0, max_steps=steps, log_every=1))
        with pytest.raises(NanoMedusaError, match=f"not finite at step {stop} .*lower --lr"):
            trainer.run()
        assert not (trainer.out / "heads").exists()
    # A checkpoint between log lines is written only after its window's loss is checked.
    trainer = Trainer(config(setup, "diverged-save", lr=1e30, warmup_steps=0, max_steps=4, log_every=5, save_every=2))
    with pytest.raises(NanoMedusaError, match="not finite at step 2 "):
        trainer.run()
    assert not (trainer.out / "checkpoint").exists() and not (trainer.out / "heads").exists()


# ----- resume -------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def interrupted_run(cfg: TrainConfig, steps: int) -> Trainer:
    """A run stopped in its step `steps` + 1, as a kill would stop it: its checkpoints so far stay."""
    trainer = Trainer(cfg)

    def step_then_stop(step):
        if step == steps:
            raise Interrupted
        return Trainer.train_step(trainer, step)

    trainer.train_step = step_then_stop
    with pytest.raises(Interrupted):
        trainer.run()
    return trainer


def test_resume_matches_uninterrupted_run(setup):
    straight = Trainer(config(setup, "straight", max_steps=8, save_every=3))
    straight.run()
    cut = interrupted_run(config(setup, "cut", max_steps=8, save_every=3), 7)  # after checkpoints at 3 and 6 steps
    with pytest.raises(NanoMedusaError, match="already holds a training checkpoint"):
        Trainer(config(setup, "cut", max_steps=8, save_every=3))
    resumed = Trainer(config(setup, "cut", max_steps=8, save_every=3, resume=True))
    assert resumed.start_step == 6
    resumed.run()
    a, b = straight.module.heads.state_dict(), resumed.module.heads.state_dict()
    assert all_close(a, b, tol=1e-6)
    assert not all_close(a, cut.module.heads.state_dict(), tol=1e-6)  # the cut run really stopped early


def test_new_heads_name_their_base_model_by_absolute_path(setup, tmp_path, monkeypatch):
    # (so that generate.py's base-model note finds it from any directory)
    shutil.copytree(setup[1], tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(config(setup, "relative-model", model="ckpt", max_steps=1))
    trainer.run()
    recorded = json.loads((trainer.out / "heads" / "config.json").read_text())["base_model"]
    assert recorded == str((tmp_path / "ckpt").resolve())


def test_a_finished_run_is_neither_resumed_nor_overwritten_unasked(setup):
    done = config(setup, "finished", max_steps=4, save_every=3)
    Trainer(done).run()
    out = Path(done.out)
    assert (out / "heads" / "config.json").is_file() and not (out / "checkpoint").exists()  # (resuming would redo
    with pytest.raises(NanoMedusaError, match="has finished .* so there is nothing to resume"):  # step 4 for nothing)
        Trainer(replace(done, resume=True))
    with pytest.raises(NanoMedusaError, match=r"holds an earlier run's heads/, eval.json; pass --overwrite"):
        Trainer(replace(done, lr=5e-3))
    # --overwrite replaces every output, including one this run would not write (an earlier joint run's model), and
    # nothing else (a --cache-hidden folder, notes)
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    (out / "cache").mkdir()
    (out / "notes.txt").write_text("mine")
    Trainer(replace(done, eval_fraction=0.0, overwrite=True)).run()
    assert sorted(p.name for p in out.iterdir()) == ["cache", "heads", "log.jsonl", "notes.txt", "train_config.json"]
    assert json.loads((out / "train_config.json").read_text())["eval_fraction"] == 0.0
    # but not where it would remove what this run reads first
    with pytest.raises(NanoMedusaError, match=f"--heads {out / 'heads'} is or lies in {out / 'heads'}, which "
                                              f"--overwrite removes before this run reads it; move it out of --out"):
        Trainer(replace(done, heads=str(out / "heads"), overwrite=True))
    assert (out / "heads" / "config.json").is_file()


def test_resume_refuses_a_checkpoint_of_other_settings(setup, warmed):
    interrupted_run(config(setup, "path-ckpt", reads_path=True, max_steps=2, save_every=1), 1)
    with pytest.raises(NanoMedusaError, match="made with reads_path=True but this run has None"):
        Trainer(config(setup, "path-ckpt", max_steps=2, save_every=1, resume=True))
    lora = dict(stage="joint", heads=str(warmed[0].out / "heads"), lora_rank=4, max_steps=2, save_every=1)
    interrupted_run(config(setup, "lora-ckpt", **lora), 1)
    with pytest.raises(NanoMedusaError, match="made with lora_alpha=16.0 but this run has 1000.0"):
        Trainer(config(setup, "lora-ckpt", **lora, lora_alpha=1000.0, resume=True))
    assert Trainer(config(setup, "lora-ckpt", **lora, resume=True)).start_step == 1
    # the schedule and the loss: a flag left out on resuming was its default silently (and the weight decay the
    # checkpoint's optimizer's)
    for key, value in dict(lr=1e-3, weight_decay=0.1, warmup_steps=1, grad_clip=0.5, head_decay=0.5,
                           backbone_lr=1e-4, medusa_weight=1.0, medusa_weight_warmup=0).items():
        with pytest.raises(NanoMedusaError, match=f"made with {key}=.* but this run has {value}; resume with the same"):
            Trainer(config(setup, "lora-ckpt", **lora, **{key: value}, resume=True))
    # a checkpoint from before lora_alpha was recorded still resumes
    path = setup[0] / "lora-ckpt" / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=True)
    del state["settings"]["lora_alpha"]
    for key in ("lr", "weight_decay", "warmup_steps", "grad_clip", "head_decay", "backbone_lr", "medusa_weight",
                "medusa_weight_warmup"):  # (and one from before the schedule was recorded)
        del state["settings"][key]
    torch.save(state, path)
    assert Trainer(config(setup, "lora-ckpt", **lora, resume=True)).start_step == 1
    # the prompts' format, given or found in the template: heads trained on one must not resume on another
    with pytest.raises(NanoMedusaError, match="made with chat_format='chatml' but this run has 'zephyr'"):
        Trainer(config(setup, "lora-ckpt", **lora, chat_format="zephyr", resume=True))
    assert Trainer(config(setup, "lora-ckpt", **lora, chat_format="chatml", resume=True)).start_step == 1
    del state["settings"]["chat_format"]  # (and one from before it was recorded resumes)
    torch.save(state, path)
    assert Trainer(config(setup, "lora-ckpt", **lora, chat_format="zephyr", resume=True)).start_step == 1
    # a checkpoint from before the split could be chosen split by position, and resumes only so
    del state["settings"]["split"]
    torch.save(state, path)
    with pytest.raises(NanoMedusaError, match=r"made with split='position' but this run has 'id'; resume with the "
                                              r"same settings \(--split position\)"):
        Trainer(config(setup, "lora-ckpt", **lora, resume=True))
    assert Trainer(config(setup, "lora-ckpt", **lora, split="position", resume=True)).start_step == 1


def test_a_new_run_starts_its_log_afresh(setup):
    # The first run dies before it has any result to keep (no checkpoint, no heads); the second, not resumed, runs
    # into its --out.
    interrupted_run(config(setup, "relogged", lr=1e-2, max_steps=3, log_every=1), 2)
    trainer = Trainer(config(setup, "relogged", lr=5e-3, max_steps=3, log_every=1))
    trainer.run()
    log = [json.loads(line) for line in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3] and log[0]["lr"] == pytest.approx(5e-3 / 5)


# ----- distillation -------------------------------------------------------------------------------


def test_distill_writes_resumable_data_that_trains(setup):
    root, ckpt, _ = setup
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "source": "t", "prompt": f"count from {c}"}) + "\n"
                               for i, c in enumerate("abcdefghijkl")))
    out = root / "answers.jsonl"
    cfg = DistillConfig(model=ckpt, data=str(prompts), out=str(out), max_new_tokens=6, limit=5, device="cpu")
    assert distill(cfg) == 5
    with open(out, "a") as f:
        f.write('{"id": "p5", "conv')  # a line torn by an interruption
    cfg.limit = None
    assert distill(cfg) == 7
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"p{i}" for i in range(12)]
    assert lines[0]["conversations"][0] == {"from": "human", "value": "count from a"}
    # 6 tokens cut every answer of the tiny model (it counts on): each record says so, and trains no end marker
    assert all(r["truncated"] is True for r in lines) and load_conversations(out)[0].truncated
    assert lines[0]["conversations"][1]["from"] == "gpt"
    sharded = DistillConfig(model=ckpt, data=str(prompts), out=str(root / "shard.jsonl"), max_new_tokens=2, shard="1/4")
    assert distill(sharded) == 3 and [json.loads(line)["id"] for line in open(sharded.out)] == ["p1", "p5", "p9"]
    with pytest.raises(NanoMedusaError, match="--shard '4/4' is not of the form i/n"):
        distill(DistillConfig(model=ckpt, data=str(prompts), out=str(root / "x.jsonl"), shard="4/4"))
    results = Trainer(TrainConfig(model=ckpt, data=str(out), out=str(root / "distilled"), max_steps=2, batch_size=4,
                                  eval_fraction=0.2, seed=1)).run()
    assert results["heads"][0]["tokens"] > 0 and (root / "distilled" / "heads" / "config.json").is_file()


def write_mixed_prompts(path):
    """Prompts of many lengths for the tiny model (context 256, 55 template tokens + 1 per character).

    With max_new_tokens 8 the last four leave less than 8 tokens of context (caps 4, 5, 5, 6), and there
    are an empty prompt, one too long to answer and a duplicate id, which are all skipped.
    """
    rng = random.Random(0)
    lengths = [3, 40, 17, 90, 8, 60, 25, 197, 196, 196, 195]
    records = [{"id": f"m{i}", "prompt": "".join(rng.choice(LOWER + " ") for _ in range(n))} for i, n in enumerate(lengths)]
    records.insert(4, {"id": "empty", "conversations": [{"from": "gpt", "value": "an answer to nothing"}]})
    records.insert(7, {"id": "long", "prompt": "x" * 201})
    records.append({"id": "m2", "prompt": "a duplicate id"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def distilled(path) -> dict:
    records = [json.loads(line) for line in open(path)]
    assert len({r["id"] for r in records}) == len(records)  # no id twice
    return {r["id"]: r["conversations"] for r in records}


@pytest.fixture
def decode_calls(monkeypatch):
    """Records (function, rows, max_new_tokens) of every generate / generate_batch call distill makes."""
    calls = []

    def spy(name):
        real = getattr(distill_module, name)

        def wrapper(model, prompts, max_new_tokens, *args, **kw):
            calls.append((name, len(prompts) if name == "generate_batch" else 1, max_new_tokens))
            return real(model, prompts, max_new_tokens, *args, **kw)
        return wrapper

    monkeypatch.setattr(distill_module, "generate", spy("generate"))
    monkeypatch.setattr(distill_module, "generate_batch", spy("generate_batch"))
    return calls


def test_batched_distill_answers_as_one_at_a_time(setup, tmp_path, decode_calls):
    root, ckpt, _ = setup
    prompts = write_mixed_prompts(tmp_path / "prompts.jsonl")

    def run(name, **kw):
        decode_calls.clear()
        cfg = DistillConfig(model=ckpt, data=str(prompts), out=str(tmp_path / name), max_new_tokens=8, device="cpu", **kw)
        return distill(cfg), distilled(cfg.out)

    written, single = run("single.jsonl", batch_size=1)
    # Longest first, each prompt alone, capped by the context it leaves (256 - 55 - characters).
    assert written == 11 and decode_calls == [("generate", 1, n) for n in (4, 5, 5, 6, 8, 8, 8, 8, 8, 8, 8)]
    assert set(single) == {f"m{i}" for i in range(11)}
    assert single["m2"][0] == {"from": "human", "value": json.loads(prompts.read_text().splitlines()[2])["prompt"]}
    assert single["m2"][1]["from"] == "gpt" and len({turns[1]["value"] for turns in single.values()}) > 1
    written, batched = run("batched.jsonl", batch_size=3)
    assert written == 11 and batched == single
    # Near-context prompts share a batch only with prompts of the same cap; leftovers of one go alone.
    assert decode_calls == [("generate", 1, 4), ("generate_batch", 2, 5), ("generate", 1, 6),
                            ("generate_batch", 3, 8), ("generate_batch", 3, 8), ("generate", 1, 8)]
    decode_calls.clear()  # the command line's --distill-batch-size (training's --batch-size is refused there)
    assert train_cli.main(["--stage", "distill", "--model", ckpt, "--data", str(prompts), "--out", str(tmp_path / "cli.jsonl"),
                           "--max-new-tokens", "8", "--device", "cpu", "--distill-batch-size", "3"]) == 0
    assert [rows for _, rows, _ in decode_calls] == [1, 2, 1, 3, 3, 1] and distilled(tmp_path / "cli.jsonl") == single
    sampled_one = run("sampled1.jsonl", batch_size=1, temperature=1.0, seed=4)[1]
    assert run("sampled3.jsonl", batch_size=3, temperature=1.0, seed=4)[1] == sampled_one
    assert len(decode_calls) == 11 and all(name == "generate" for name, _, _ in decode_calls)  # one at a time
    assert sampled_one != single
    with pytest.raises(NanoMedusaError, match="--distill-batch-size 0 is below 1"):
        run("zero.jsonl", batch_size=0)


def test_batched_distill_resumes_without_duplicates(setup, tmp_path, decode_calls, monkeypatch):
    root, ckpt, _ = setup
    prompts = write_mixed_prompts(tmp_path / "prompts.jsonl")
    single = DistillConfig(model=ckpt, data=str(prompts), out=str(tmp_path / "single.jsonl"), max_new_tokens=8,
                           device="cpu", batch_size=1)
    distill(single)
    spy = distill_module.generate_batch

    def second_batch_dies(*args, **kw):
        if sum(name == "generate_batch" for name, _, _ in decode_calls) == 1:
            raise Interrupted
        return spy(*args, **kw)

    monkeypatch.setattr(distill_module, "generate_batch", second_batch_dies)
    cfg = DistillConfig(model=ckpt, data=str(prompts), out=str(tmp_path / "cut.jsonl"), max_new_tokens=8,
                        device="cpu", batch_size=3)
    with pytest.raises(Interrupted):
        distill(cfg)
    # Written as each batch finished: the prompts 197 (alone), 196 and 196 (batched) and 195 (alone) long.
    assert set(distilled(cfg.out)) == {"m7", "m8", "m9", "m10"}
    monkeypatch.setattr(distill_module, "generate_batch", spy)
    decode_calls.clear()
    assert distill(cfg) == 7
    assert decode_calls == [("generate_batch", 3, 8), ("generate_batch", 3, 8), ("generate", 1, 8)]
    assert distilled(cfg.out) == distilled(single.out)
    assert distill(cfg) == 0


# ----- command line -------------------------------------------------------------------------------


def test_cli_errors(setup, tmp_path, capsys):
    ckpt = setup[1]

    def run(data, *extra):
        code = train_cli.main(["--model", ckpt, "--data", str(data), "--out", str(tmp_path / "o"), *extra])
        return code, capsys.readouterr().err.strip()

    assert run(tmp_path / "none.jsonl") == (2, f"error: --data {tmp_path / 'none.jsonl'} does not exist; check the path.")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n\n{"prompt": oops}\n')
    code, err = run(bad)
    assert code == 2 and err.startswith(f"error: {bad} line 3 is not valid JSON")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "a"}\n')
    code, err = run(prompts)
    assert code == 2 and "no conversation with an assistant answer" in err and "--stage distill" in err
    code, err = run(prompts, "--stage", "joint")
    assert code == 2 and "--heads" in err


def test_warmup_from_adapted_heads_trains_on_their_backbone_and_keeps_the_adapter(setup, adapted):
    # Medusa-2 heads read the backbone their adapter makes: heads grown from them (here: to read their path) must
    # train on that backbone, frozen, and ship the same adapter (it was lost before: warm-up exported an empty one).
    grown = Trainer(config(setup, "path-on-adapted", heads=str(adapted), reads_path=True, max_steps=2))
    backbone = adapted_backbone(setup, adapted).state_dict()
    trained_on = grown.module.model.state_dict()
    assert all(torch.allclose(trained_on[k], v, atol=1e-6) for k, v in backbone.items())
    grown.run()
    out = grown.out / "heads"
    assert (out / ADAPTER_FILE).read_bytes() == (adapted / ADAPTER_FILE).read_bytes()
    base = load_model(setup[1], "cpu", "float32")[0]
    heads = load_heads_and_adapter(out, base, say=lambda _: None)  # merges the adapter into `base`
    assert heads.config.reads_path and heads.config.lora
    assert all(torch.allclose(base.state_dict()[k], v, atol=1e-6) for k, v in backbone.items())


def test_examples_are_cut_at_the_models_context(setup, tmp_path, capsys):
    # --max-len past the context would train on positions decoding never reaches (its cache stops there)
    root, ckpt, _ = setup
    turns = [{"from": "human", "value": "count"}, {"from": "gpt", "value": "abc " * 150}]  # 600 characters: 600 tokens
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"id": f"l{i}", "conversations": turns}) + "\n" for i in range(16)))
    trainer = Trainer(config(setup, tmp_path / "out", data=str(data), max_len=1000))
    context = trainer.module.model.config.max_position_embeddings
    assert max(len(example.input_ids) for example in trainer.train_set) == context < 1000
    assert f"[note] examples are cut at the model's context of {context} tokens, not --max-len 1000" \
        in capsys.readouterr().out


def test_cli_refuses_paths_that_would_fail_after_the_run(setup, tmp_path, capsys):
    def run(*args):
        code = train_cli.main(["--model", setup[1], "--data", setup[2], *args])
        return code, capsys.readouterr().err.strip()

    # Distillation writes JSON lines, which a .json file would be read back as one JSON array.
    assert run("--stage", "distill", "--out", str(tmp_path / "answers.json")) == (
        2, f"error: --out {tmp_path / 'answers.json'} would hold JSON lines, one answer per line; name it .jsonl.")
    assert not (tmp_path / "answers.json").exists()
    assert run("--data-weights", "-1", "--out", str(tmp_path / "w")) == (
        2, "error: --data-weights must be above 0, not -1.0; pass a positive number.")
    for name, make in (("heads", lambda p: p.write_text("")), ("log.jsonl", lambda p: p.mkdir())):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        make(out / name)
        code, err = run("--out", str(out), "--max-steps", "1")
        assert code == 2 and err.startswith(f"error: --out {out} holds a ") and err.endswith("choose another --out.")
        assert not (out / "train_config.json").exists()  # refused before training


@pytest.mark.parametrize("meta", ["not JSON", "[1]", None])
def test_damaged_hidden_cache_is_one_sentence(tmp_path, meta):
    cache = tmp_path / "cache"
    cache.mkdir()
    if meta is None:
        (cache / "meta.json").mkdir()
    else:
        (cache / "meta.json").write_text(meta)
    with pytest.raises(NanoMedusaError, match=r"is damaged or was made for another model, dtype or data \(or by an older nanomedusa\); delete it"):
        HiddenCache(cache, "fingerprint")


def test_hidden_cache_knows_a_backbone_replaced_in_place(tmp_path, monkeypatch):
    # Keyed by the checkpoint's path, a cache served a model retrained into that path its predecessor's hidden states;
    # keyed by its files' contents, the same path spelled another way, or a copy (another node's), still shares it.
    ckpt, heads = tmp_path / "ckpt", tmp_path / "heads"
    make_chat_checkpoint(ckpt, seed=0)
    heads.mkdir()
    (heads / "config.json").write_text(json.dumps({"lora": {"rank": 4, "alpha": 8}}))
    (heads / ADAPTER_FILE).write_bytes(b"adapter one")
    examples = [Example([1, 2, 3], [IGNORE, 2, 3])]

    def key(ckpt_dir, adapter_dir=heads):
        return fingerprint(backbone_key(ckpt_dir, adapter_dir), torch.float32, examples)

    first = key(ckpt)
    HiddenCache(tmp_path / "cache", first)
    monkeypatch.chdir(tmp_path)
    assert key(Path("ckpt")) == first
    shutil.copytree(ckpt, tmp_path / "copy")  # (new modification times)
    assert key(tmp_path / "copy") == first
    assert key(ckpt, None) != first

    make_chat_checkpoint(ckpt, seed=1)  # retrained in place
    assert key(ckpt) != first
    with pytest.raises(NanoMedusaError, match="made for another model"):
        HiddenCache(tmp_path / "cache", key(ckpt))
    retrained = key(ckpt)
    (heads / ADAPTER_FILE).write_bytes(b"adapter two")
    assert key(ckpt) != retrained
    adapter_two = key(ckpt)
    (heads / "config.json").write_text(json.dumps({"lora": {"rank": 4, "alpha": 16}}))
    assert key(ckpt) != adapter_two


def test_a_weights_file_is_keyed_by_slices_spread_over_it(tmp_path, monkeypatch):
    # A 7B's weights are not read whole at each start: 64 slices spread over each file, the first and last among them.
    monkeypatch.setattr(hidden_cache, "SAMPLE_BYTES", 4)
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    data = (bytearray(range(256)) * 8)[: 63 * 32 + 4]  # 64 slices of 4 bytes, one every 32 bytes, the last at the end
    weights.write_bytes(data)
    before = backbone_key(tmp_path, None)
    for offset, seen in ((0, True), (len(data) - 1, True), (32 * 10 + 2, True), (32 * 10 + 5, False)):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        weights.write_bytes(changed)
        assert (backbone_key(tmp_path, None) != before) == seen, offset


def test_tools_measure_on_the_examples_training_held_out(setup, warmed, tmp_path, monkeypatch):
    # train.py holds out a share of a file's answered conversations, cut at the model's context (256 tokens here):
    # tree_tuning.py and calibration.py must measure on exactly those, whatever unanswered prompts the file holds.
    data = tmp_path / "mixed.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            s = i % 26
            turns = [{"from": "human", "value": f"count from {LOWER[s]}"}, {"from": "gpt", "value": LOWER[s:] * 12}]
            record = {"id": f"p{i}", "prompt": "count"} if i % 5 == 0 else {"id": f"c{i}", "conversations": turns}
            f.write(json.dumps(record) + "\n")
    held_out = [e.input_ids for e in Trainer(config(setup, tmp_path / "out", data=str(data), max_len=1000,
                                                    eval_fraction=0.25)).eval_set]
    assert len(held_out) >= 3 and max(map(len, held_out)) == 256
    seen = {}
    for module, name in ((tree_tuning, "rank_hits"), (calibration, "calibrate")):
        def spy(model, heads, examples, *args, name=name, real=getattr(module, name)):
            seen[name] = [e.input_ids for e in examples]
            return real(model, heads, examples, *args)
        monkeypatch.setattr(module, name, spy)
    flags = ["--model", setup[1], "--heads", str(warmed[0].out / "heads"), "--data", str(data), "--device", "cpu",
             "--eval-fraction", "0.25", "--seed", "3", "--max-len", "1000"]
    assert tree_tuning.main(flags + ["--nodes", "4"]) == 0 and calibration.main(flags) == 0
    assert seen == {"rank_hits": held_out, "calibrate": held_out}
    # and without --eval-fraction and --seed, from heads that record the ones this split was made with
    shutil.copytree(warmed[0].out / "heads", tmp_path / "heads")
    raw = json.loads((tmp_path / "heads" / "config.json").read_text())
    raw["held_out"] |= {"eval_fraction": 0.25, "seed": 3}
    (tmp_path / "heads" / "config.json").write_text(json.dumps(raw))
    seen.clear()
    flags = ["--model", setup[1], "--heads", str(tmp_path / "heads"), "--data", str(data), "--device", "cpu",
             "--max-len", "1000"]
    assert tree_tuning.main(flags + ["--nodes", "4"]) == 0 and calibration.main(flags) == 0
    assert seen == {"rank_hits": held_out, "calibrate": held_out}


def test_the_tools_say_when_they_would_measure_on_another_split_than_training_held_out(setup, warmed, capsys):
    # The heads record how train.py split and rendered their data; measuring with another --seed, --eval-fraction or
    # chat format would count conversations they were trained on as held out, silently before.
    from nanomedusa.training.data import held_out_split_notes

    heads_dir = warmed[0].out / "heads"
    held_out = json.loads((heads_dir / "config.json").read_text())["held_out"]
    assert held_out == {"eval_fraction": 0.125, "seed": 3, "chat_format": "chatml", "split": "id"}
    flags = ["--model", setup[1], "--heads", str(heads_dir), "--data", setup[2], "--device", "cpu", "--nodes", "4",
             "--max-len", "160"]
    capsys.readouterr()
    assert tree_tuning.main(flags + ["--eval-fraction", "0.125", "--seed", "3"]) == 0
    assert "[note] the heads were trained" not in capsys.readouterr().err
    # left out, the three are the heads' own: the examples training held out
    assert tree_tuning.main(flags + ["--json", str(heads_dir.parent / "tuned.json")]) == 0
    assert "[note] the heads were trained" not in capsys.readouterr().err
    tuned = json.loads((heads_dir.parent / "tuned.json").read_text())
    assert tuned[setup[2]]["conversations"] == len(warmed[0].eval_set)
    assert tree_tuning.main(flags + ["--eval-fraction", "0.125", "--seed", "0"]) == 0
    assert ("[note] the heads were trained with --seed 3 and this run has 0: if --data are the files the heads were "
            "trained on, this run measures conversations they were trained on; pass --seed 3." in capsys.readouterr().err)
    assert tree_tuning.main(flags + ["--eval-fraction", "0.125", "--seed", "3", "--split", "position"]) == 0
    assert "the heads were trained with --split id and this run has position" in capsys.readouterr().err
    assert held_out_split_notes(held_out, 0.1, 3, "chatml", "id") == []  # a smaller share of that split: none seen
    assert "pass --eval-fraction 0.125 or less" in held_out_split_notes(held_out, 0.2, 3, "chatml", "id")[0]
    assert held_out_split_notes({**held_out, "eval_fraction": 0}, 0.02, 0, "chatml", "id")[0].startswith(
        "the heads were trained with --eval-fraction 0, on every conversation")
    assert held_out_split_notes(held_out, 0.125, 3, "zephyr", None) == [
        "the heads were trained on prompts in the chatml format and this run renders them as zephyr, so what it "
        "measures describes another format; pass --chat-format chatml"]
    assert held_out_split_notes(None, 0.02, 0, "chatml", "id") == []  # heads from before it was recorded
    # a record from before the split could be chosen: by position
    older = {k: v for k, v in held_out.items() if k != "split"}
    assert "--split position and this run has id" in held_out_split_notes(older, 0.125, 3, "chatml", "id")[0]
    # and training that continues from them says so too, on another split; it splits as they were split by default
    trainer = Trainer(config(setup, "continued-other-seed", heads=str(heads_dir), seed=4, max_steps=1))
    assert "[note] the heads were trained with --seed 3 and this run has 4" in capsys.readouterr().out
    assert trainer.start_step == 0 and trainer.cfg.split == "id"
    # left out, the split's settings are the heads' own: training on from them holds out what they held out
    same = Trainer(config(setup, "continued-same", heads=str(heads_dir), seed=None, eval_fraction=None, max_steps=1))
    assert (same.cfg.eval_fraction, same.cfg.seed, same.cfg.split) == (0.125, 3, "id")
    assert [e.input_ids for e in same.eval_set] == [e.input_ids for e in warmed[0].eval_set]
    assert "[note] the heads were trained" not in capsys.readouterr().out
    older_heads = heads_dir.parent / "older-heads"
    shutil.copytree(heads_dir, older_heads)
    raw = json.loads((older_heads / "config.json").read_text())
    (older_heads / "config.json").write_text(json.dumps({**raw, "held_out": older}))
    assert Trainer(config(setup, "continued-older", heads=str(older_heads), max_steps=1)).cfg.split == "position"
    assert "--split" not in capsys.readouterr().out


def test_heads_with_nothing_to_train_are_refused_before_ddp(setup, tmp_path):
    # (DDP refuses a module without trainable parameters with a traceback on every rank; fresh heads of this kind are
    # refused by TrainConfig.check, tests/test_errors.py)
    model = load_model(setup[1], device="cpu")[0]
    MedusaHeads.from_base(model, num_heads=2, num_layers=0, shared_lm_head=True).save(tmp_path / "bare")
    with pytest.raises(NanoMedusaError, match=f"the heads in {tmp_path / 'bare'} have no ResBlocks and share the "
                                              f"lm_head, so warm-up has nothing of theirs to train; add --reads-path"):
        Trainer(config(setup, tmp_path / "out", heads=str(tmp_path / "bare"), max_steps=1))


def test_conversations_left_out_are_counted(setup, tmp_path, capsys):
    # Prompts not answered yet and answers that start past --max-len train on nothing; the run says how many, per file.
    data = tmp_path / "mixed.jsonl"
    shutil.copy(write_counting_data(tmp_path / "answered.jsonl", 8, 1), data)
    with open(data, "a") as f:
        for i in range(2):
            f.write(json.dumps({"id": f"p{i}", "prompt": "count from c"}) + "\n")
        long = [{"from": "human", "value": "count from a " * 100}, {"from": "gpt", "value": counting_answer(0)}]
        f.write(json.dumps({"id": "long", "conversations": long}) + "\n")
    capsys.readouterr()
    trainer = Trainer(config(setup, tmp_path / "out", data=str(data), eval_fraction=0.0, max_steps=1))
    assert (f"[note] {data}: of its 11 conversations, 2 have no answer yet (answer them with --stage distill) and 1 "
            f"has no answer token within the first 160 tokens (--max-len); they are left out."
            in capsys.readouterr().out)
    assert len(trainer.train_set) == 8
    Trainer(config(setup, tmp_path / "out2", data=str(tmp_path / "answered.jsonl"), eval_fraction=0.0, max_steps=1))
    assert "left out" not in capsys.readouterr().out


class MergingTokenizer:
    """Characters as tokens, except that two newlines are one (as BPE merges them): "assistant\n" followed by an
    answer opening with a blank line tokenizes across the boundary, as SmolLM2's tokenizer does. `answer_tag`: the
    tag a conversation renders before an answer, where a generation prompt ends in <assistant> (another one is a
    template that does not render a conversation as a prefix of its continuation)."""

    def __init__(self, answer_tag="assistant"):
        self.answer_tag = answer_tag

    def apply_chat_template(self, messages, add_generation_prompt):
        tags = {"assistant": self.answer_tag}
        text = "".join(f"<{tags.get(m['role'], m['role'])}>\n{m['content']}<end>\n" for m in messages)
        return text + ("<assistant>\n" if add_generation_prompt else "")

    def encode(self, text, add_bos=False):
        return [1000 if piece == "\n\n" else ord(piece) for piece in re.findall(r"\n\n|.", text, re.S)]

    def encode_chat(self, messages):
        return self.encode(self.apply_chat_template(messages, True))


def test_an_answer_merged_with_the_template_is_left_out_not_the_run():
    tok = MergingTokenizer()
    conversations = [Conversation(str(i), [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}])
                     for i, answer in enumerate(["Hello", "\n\nHello", " Hello", "\nHello"])]
    with pytest.raises(NanoMedusaError, match="an answer whose first token merges with the chat template's last"):
        tokenize_conversation(tok, conversations[1].messages, max_len=100)  # (this stopped the run)
    left_out = Counter()
    examples = tokenize_all(tok, conversations, max_len=100, left_out=left_out)
    assert left_out == Counter({"merged": 2})  # "\nHello" merges too, in this tokenizer
    answers = ["".join("\n\n" if t == 1000 else chr(t) for t in e.labels if t != IGNORE) for e in examples]
    assert answers == ["Hello<end>\n", " Hello<end>\n"]
    assert tokenize_all(tok, conversations[1:2], max_len=100) == []  # (a held-out share of one is no template's fault)
    said = []  # the tools that measure on held-out conversations say so
    assert len(tokenize_held_out(tok, conversations, 100, "f.jsonl's held-out conversations", say=said.append)) == 2
    assert said == ["[note] 2 of f.jsonl's held-out conversations have an answer whose first token merges with the "
                    "chat template's last when tokenized, as one opening with a blank line can; they are left out."]
    # a template whose conversation is not its prompt continued is still the run's error
    with pytest.raises(NanoMedusaError, match="train with a ChatML-style model"):
        tokenize_all(MergingTokenizer(answer_tag="bot"), conversations[:1], max_len=100)
    # the run's note counts them with the other conversations left out
    printed = []
    Trainer._note_dropped(SimpleNamespace(_print=printed.append), "f.jsonl", 10, 1, Counter(cut=2, merged=1), 160)
    assert printed == ["[note] f.jsonl: of its 10 conversations, 1 has no answer yet (answer them with --stage distill), "
                       "2 have no answer token within the first 160 tokens (--max-len) and 1 has an answer whose "
                       "first token merges with the chat template's last when tokenized, as one opening with a blank "
                       "line can; they are left out."]


def test_every_train_flag_belongs_to_the_stages_that_read_it():
    # train.py refuses a flag the chosen stage would ignore; a new flag must be listed as distillation's or training's
    # (or be one both read), or it would be ignored silently again.
    shared = {"model", "data", "out", "device", "dtype", "seed", "chat_format"}
    assert shared <= DistillConfig.__dataclass_fields__.keys() & TrainConfig.__dataclass_fields__.keys()
    staged = train_cli.DISTILL_FLAGS + train_cli.TRAINING_FLAGS
    dests = {action.dest for action in train_cli.make_parser()._actions} - {"help", "stage"}
    assert len(set(staged)) == len(staged) and dests == shared | set(staged)
    # and each list holds only what its stage's config reads (--distill-batch-size is distillation's batch_size)
    assert set(train_cli.TRAINING_FLAGS) <= TrainConfig.__dataclass_fields__.keys()
    assert set(train_cli.DISTILL_FLAGS) - {"distill_batch_size"} <= DistillConfig.__dataclass_fields__.keys()

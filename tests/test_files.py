"""No torn files, nothing lost: heads and configs replaced whole, distillation and training logs cut in place."""

import json
import os

import pytest
import torch

import nanomedusa.heads
from nanomedusa.config import ModelConfig
from nanomedusa.errors import NanoMedusaError
from nanomedusa.files import read_utf8, write_text_atomically
from nanomedusa.heads import MedusaHeads, HeadsConfig
from nanomedusa.training.checkpoint import truncate_log
from nanomedusa.training.distill import finished_ids

TINY = ModelConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=16)


def tiny_heads(num_heads: int, seed: int = 0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadsConfig(num_heads, 1, TINY.dim, TINY.vocab_size))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    return heads


class Killed(Exception):
    pass


def test_a_save_killed_midway_keeps_the_previous_heads(tmp_path, monkeypatch):
    old = tiny_heads(2, seed=0)
    old.save(tmp_path)
    original = nanomedusa.heads.save_file

    def write_half_then_die(state, filename, metadata=None):
        original(state, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise Killed

    monkeypatch.setattr(nanomedusa.heads, "save_file", write_half_then_die)
    with pytest.raises(Killed):
        tiny_heads(2, seed=1).save(tmp_path)
    loaded = MedusaHeads.load(tmp_path, TINY)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))
    # and the half-written file is gone: its name is the process's own, so no later save would replace it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "medusa_lm_head.safetensors"]


def test_heads_load_what_the_file_holds_whatever_the_config_says(tmp_path, capsys):
    # Published reference checkpoints do this: Vicuna-7B's config says 2 heads, its file holds 4.
    tiny_heads(4).save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 2}))
    heads = MedusaHeads.load(tmp_path, TINY)
    assert heads.config.num_heads == 4 and len(heads.medusa_head) == 4
    assert capsys.readouterr().err.splitlines() == [
        f"[note] {tmp_path}/config.json says medusa_num_heads 2 but medusa_lm_head.safetensors holds 4 heads; "
        f"loading the 4 heads the file holds."]


def test_heads_config_that_is_not_an_object(tmp_path):
    tiny_heads(1).save(tmp_path)
    (tmp_path / "config.json").write_text("[2]")
    with pytest.raises(NanoMedusaError, match="config.json is missing or not a JSON object"):
        MedusaHeads.load(tmp_path, TINY)


def test_distill_cuts_a_torn_answer_in_place(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "conv')
    inode = out.stat().st_ino
    assert finished_ids(out) == {"a", "b"}
    assert out.read_text() == '{"id": "a"}\n{"id": "b"}\n' and out.stat().st_ino == inode


def test_training_log_is_cut_back_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)) + '{"step": 2')
    truncate_log(log, 10)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [5, 10]
    truncate_log(tmp_path / "missing.jsonl", 10)  # a run that never logged: nothing to cut


def test_text_is_replaced_whole_and_read_as_utf8(tmp_path):
    path = tmp_path / "config.json"
    write_text_atomically(path, "café\n")
    assert read_utf8(path) == "café\n" and os.listdir(tmp_path) == ["config.json"]
    path.write_bytes(b"caf\xe9")
    with pytest.raises(NanoMedusaError, match=r"config.json is not UTF-8 text \(byte 0xe9 at offset 3\); re-save it"):
        read_utf8(path)

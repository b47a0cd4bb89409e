"""Data-parallel warm-up: 2 processes under torchrun (gloo, CPU) train the same heads as 1 process.

The global batch is the same in all three runs (2 x 4, 1 x 8, and 1 x 4 with 2 accumulation steps),
and losses are normalised by the global batch's token counts, so the heads agree up to float rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from nanomedusa.training import TrainConfig, Trainer
from tests.test_training import write_counting_data
from tests.tiny_tokenizer import make_chat_checkpoint

REPO = Path(__file__).resolve().parents[1]


def heads_of(out: Path) -> dict:
    return load_file(out / "heads" / "medusa_lm_head.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_match_one(tmp_path):
    seed = int(torch.randint(1000, ()))
    make_chat_checkpoint(tmp_path / "ckpt", seed=seed)
    data = write_counting_data(tmp_path / "data.jsonl", 40, seed)
    common = dict(model=str(tmp_path / "ckpt"), data=str(data), max_steps=4, warmup_steps=2, lr=1e-2,
                  eval_fraction=0.2, max_len=90, log_every=2, save_every=0, seed=seed, device="cpu")
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "train.py", "--stage", "warmup", "--batch-size", "4", "--out", str(tmp_path / "ddp"), *cli],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 x cpu" in run.stderr + run.stdout  # really ran as two processes

    one = Trainer(TrainConfig(**common, batch_size=8, out=str(tmp_path / "one"))).run()
    accum = Trainer(TrainConfig(**common, batch_size=4, grad_accum=2, out=str(tmp_path / "accum"))).run()

    reference = heads_of(tmp_path / "one")
    print("DIFFS", max_diff(heads_of(tmp_path / "ddp"), reference), max_diff(heads_of(tmp_path / "accum"), reference))
    assert max_diff(heads_of(tmp_path / "ddp"), reference) <= 1e-5
    assert max_diff(heads_of(tmp_path / "accum"), reference) <= 1e-5
    assert reference["medusa_head.0.0.linear.weight"].abs().max() > 1e-3  # the heads did move from their zero start
    ddp = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    for got in (ddp, accum):
        assert got["heads"][0]["tokens"] == one["heads"][0]["tokens"]  # eval covers the same split on 2 ranks
        assert abs(got["heads"][0]["loss"] - one["heads"][0]["loss"]) <= 1e-4

"""Training under torchrun on CPU (gloo): 2 processes give the same result as 1 with the same global batch.

Warm-up runs DDP, joint training FSDP. Losses are normalised by the global batch's token counts and
every example is cut to the same length (so padding, hence every matmul shape, is the same), so the
runs agree up to float rounding. A run that diverges stops on every rank alike.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nanomedusa.training import TrainConfig, Trainer
from tests.test_training import one_thread, write_counting_data  # noqa: F401 (one_thread: autouse fixture)
from tests.tiny_tokenizer import make_chat_checkpoint

REPO = Path(__file__).resolve().parents[1]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def torchrun(out: Path, common: dict, *args: str, fails: bool = False) -> str:
    """train.py on two processes -> what they printed; it must end well, or with `fails`, in an error."""
    cli = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "train.py", "--out", str(out), *cli, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert (run.returncode != 0) == fails, run.stderr[-3000:]
    assert "on 2 x cpu" in run.stderr + run.stdout  # really ran as two processes
    return run.stderr + run.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # A fixed seed: with some random draws the 1-process and 2-process runs differed by 1.8e-5 in float
    # rounding (summation order), past the 1e-5 below; a test must not pass or fail by lottery.
    seed = 123
    make_chat_checkpoint(root / "ckpt", seed=seed)
    data = write_counting_data(root / "data.jsonl", 40, seed)
    # max_len 90 cuts every example (prompt ~60 tokens, answer >= 40) to the same length.
    common = dict(model=str(root / "ckpt"), data=str(data), max_steps=4, warmup_steps=2, lr=1e-2, eval_fraction=0.125,
                  max_len=90, log_every=2, save_every=0, seed=seed, device="cpu")
    return root, common


@pytest.fixture(scope="module")
def warm_heads(setup):
    root, common = setup
    Trainer(TrainConfig(**common, out=str(root / "warm"), batch_size=4)).run()
    return str(root / "warm" / "heads")


def test_ddp_warmup_matches_one_process(setup):
    root, common = setup
    torchrun(root / "ddp", common, "--stage", "warmup", "--batch-size", "4")
    one = Trainer(TrainConfig(**common, batch_size=8, out=str(root / "one"))).run()
    accum = Trainer(TrainConfig(**common, batch_size=4, grad_accum=2, out=str(root / "accum"))).run()

    heads = {name: load_file(root / name / "heads" / "medusa_lm_head.safetensors") for name in ("ddp", "one", "accum")}
    assert heads["one"]["0.0.linear.weight"].abs().max() > 1e-3  # the heads did move from their zero start
    assert max_diff(heads["ddp"], heads["one"]) <= 1e-5
    assert max_diff(heads["accum"], heads["one"]) <= 1e-5
    ddp = json.loads((root / "ddp" / "eval.json").read_text())
    for got in (ddp, accum):
        assert got["heads"][0]["tokens"] == one["heads"][0]["tokens"]  # eval covers the same split on 2 ranks
        assert abs(got["heads"][0]["loss"] - one["heads"][0]["loss"]) <= 1e-4


def test_fsdp_joint_matches_one_process(setup, warm_heads):
    root, common = setup
    joint = dict(common, stage="joint", heads=warm_heads, backbone_lr=1e-3, medusa_weight_warmup=0)
    # batch 2 per rank: 5 eval examples leave one rank an empty last eval batch, which must not hang FSDP.
    torchrun(root / "fsdp", joint, "--batch-size", "2")
    one = Trainer(TrainConfig(**joint, batch_size=4, out=str(root / "joint1"))).run()

    models = {name: load_file(root / name / "model" / "model.safetensors") for name in ("fsdp", "joint1")}
    original = load_file(root / "ckpt" / "model.safetensors")
    assert max_diff(models["joint1"], original) > 1e-4  # the backbone did change
    assert max_diff(models["fsdp"], models["joint1"]) <= 1e-5
    heads = [load_file(root / name / "heads" / "medusa_lm_head.safetensors") for name in ("fsdp", "joint1")]
    assert max_diff(*heads) <= 1e-5
    fsdp = json.loads((root / "fsdp" / "eval.json").read_text())
    assert fsdp["lm"]["tokens"] == one["lm"]["tokens"] and abs(fsdp["lm"]["loss"] - one["lm"]["loss"]) <= 1e-4


def test_fsdp_joint_that_diverges_stops_every_rank(setup, warm_heads):
    # The first step's update (~lr) blows the heads up. Each rank decides on the all-reduced loss, so both stop at the
    # same step and say why (a rank left behind would wait in FSDP's next all-gather until torchrun killed it).
    root, common = setup
    joint = dict(common, stage="joint", heads=warm_heads, lr=1e30, warmup_steps=0, medusa_weight_warmup=0, log_every=1)
    printed = torchrun(root / "diverged", joint, "--batch-size", "2", fails=True)
    assert printed.count("error: the loss is not finite at step 2 (training diverged)") == 2
    assert not (root / "diverged" / "heads").exists()

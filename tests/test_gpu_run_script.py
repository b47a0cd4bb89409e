"""bench/gpu_run.sh, the script that produces every GPU number we report, runs end to end.

Device time is scarce, so a broken flag must show up here, not on the GPU: each stage (distill, warmup,
joint, bench) runs on a tiny chat checkpoint on the CPU, the way the GPU session would call it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_tokenizer import make_chat_checkpoint

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is two plus three?", "Name a color.", "Say hello.", "Count to five.", "Why is the sky blue?",
           "Write a short poem.", "What is a cat?", "List three fruits."] * 8


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_every_stage_runs_on_a_tiny_model(tmp_path):
    model = tmp_path / "model"
    make_chat_checkpoint(model, max_position_embeddings=512)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    env = {**os.environ, "MODEL": str(model), "PROMPTS": str(prompts), "WORK": str(tmp_path / "work"),
           "NUM_PROMPTS": "2", "BENCH_FLAGS": "--device cpu --dtype float32 --skip-7b --no-hf --max-new-tokens 8 "
                                              "--quick-warmup --tree own"}
    for stage in ("distill", "warmup", "joint", "bench"):
        proc = subprocess.run(["bash", "bench/gpu_run.sh", stage], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    work = tmp_path / "work"
    assert len((work / "answers.jsonl").read_text().splitlines()) == len(PROMPTS)
    for stage in ("warmup", "joint"):
        config = json.loads((work / stage / "heads" / "config.json").read_text())
        assert len(config["medusa_choices"]) == 63  # the tree tuned from the heads' measured accuracies
        assert (work / "out" / f"{stage}_eval.json").is_file()
    results = json.loads((work / "out" / "results.json").read_text())
    assert {m["heads"] for m in results["medusa"]} == {"m1", "m2"}

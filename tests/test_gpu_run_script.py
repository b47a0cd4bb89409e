"""bench/gpu_run.sh, the script that produces every GPU number we report, runs end to end.

Device time is scarce, so a broken flag must show up here, not on the GPU: each stage (distill, warmup,
joint, bench, path, path-bench, draft-probe) runs on a tiny chat checkpoint on the CPU, the way the GPU session would
call it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanomedusa.config import ModelConfig
from nanomedusa.heads import MedusaHeads
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
    env = {**os.environ, "MODEL": str(model), "PROMPTS_CHAT": str(prompts), "PROMPTS_MATH": str(prompts),
           "WORK": str(tmp_path / "work"), "NUM_PROMPTS": "2", "JOINT_STEPS": "4", "EPOCHS": "2",
           "CHAT_TOKENS": "24", "MATH_TOKENS": "16",
           "BENCH_FLAGS": "--device cpu --dtype float32 --skip-7b --no-hf --max-new-tokens 8 --quick-warmup --tree own"}
    for stage in ("distill", "warmup", "sizes", "joint", "bench"):
        proc = subprocess.run(["bash", "bench/gpu_run.sh", stage], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    work = tmp_path / "work"
    for answers in ("answers-chat.jsonl", "answers-math.jsonl"):
        assert len((work / answers).read_text().splitlines()) == len(PROMPTS)
    step_times = json.loads((work / "out" / "step-times.json").read_text())
    sizes = [t["nodes"] for t in step_times["trees"]]
    assert sizes == [16, 32, 48, 64, 96, 128, 192, 256]
    for stage in ("warmup", "joint"):
        config = json.loads((work / stage / "heads" / "config.json").read_text())
        # the tree tuned from the heads' measured accuracies, at one of the timed sizes
        assert len(config["medusa_choices"]) + 1 in sizes
        # --trim kept the heads the tree reaches, in the config and in the weights file
        depth = max(len(path) for path in config["medusa_choices"])
        assert config["num_heads"] == len(config["rank_accuracy"]) == depth
        assert MedusaHeads.load(work / stage / "heads", ModelConfig.from_json(model / "config.json")).config.num_heads == depth
        assert (work / "out" / f"{stage}_eval.json").is_file()
    assert json.loads((work / "joint" / "heads" / "config.json").read_text())["lora"] == {"rank": 16, "alpha": 32.0}
    assert (work / "joint" / "heads" / "adapter.safetensors").is_file()
    for prompt_set in ("chat-heldout", "chat", "train-mix"):
        results = json.loads((work / "out" / f"results-{prompt_set}.json").read_text())
        assert {m["heads"] for m in results["medusa"]} == {"m1", "m2"}
    heldout = json.loads((work / "out" / "results-chat-heldout.json").read_text())
    assert set(heldout["medusa"][0]["by_category"]) == {"writing"}  # the first two prompts are writing prompts
    # heads that read their path, grown from the warm-up's, and their benchmark against those
    env |= {"HEADS_FROM": str(work / "warmup" / "heads"), "PATH_NODES": "3", "PATH_DEPTH": "1", "BUDGETS": "4,8", "DYNAMIC_FLAGS": "--device cpu --dtype float32 --num-prompts 2 --max-new-tokens 8 --choice-reps 2"}
    for stage in ("path", "path-bench"):
        proc = subprocess.run(["bash", "bench/gpu_run.sh", stage], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    path_heads = MedusaHeads.load(work / "path" / "heads", ModelConfig.from_json(model / "config.json"))
    config = json.loads((work / "path" / "heads" / "config.json").read_text())
    # a tree of 3 paths one head deep (the root's top 3), the other heads dropped, the one left calibrated
    assert path_heads.config.reads_path and config["medusa_choices"] == [[0], [1], [2]]
    assert path_heads.config.num_heads == len(config["medusa_temperatures"]) == 1
    for name in ("from", "path"):
        for prompt_set in ("chat-heldout", "train-mix"):
            result = json.loads((work / "out" / f"dynamic-{name}-{prompt_set}.json").read_text())
            assert [(r["nodes"], r["tree"]) for r in result["rows"]] == [(4, "static"), (4, "dynamic"), (8, "static"),
                                                                        (8, "dynamic")]
            assert result["chat_format"] == "chatml"  # (the prompts' format, found in the checkpoint's template)
    results = json.loads((work / "out" / "results-path.json").read_text())
    assert {m["heads"] for m in results["medusa"]} == {"from", "path"}
    # the EAGLE-style draft probe, against the warm-up's heads, on answers to the held-out sets' first 2 prompts
    env |= {"DRAFT_HEADS": str(work / "warmup" / "heads"), "EVAL_TOKENS": "12",
            "DRAFT_FLAGS": "--device cpu --depth 2 --topk 5 --paths 3 --batch 8 --limit-train 16 "
                           "--sim-answers 2 --tree-answers 4 --sim-paths 2,3"}
    proc = subprocess.run(["bash", "bench/gpu_run.sh", "draft-probe"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"stage draft-probe failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert all(len((work / f"eval-{s}.jsonl").read_text().splitlines()) == 2 for s in ("chat-heldout", "train-mix"))
    probe = json.loads((work / "out" / "feature-draft-probe.json").read_text())
    assert len(probe["draft_acc"]) == 2 and len(probe["heads_acc"]) >= 1 and len(probe["losses"]) == 2
    assert probe["chat_format"] == "chatml"
    assert [r["paths"] for r in probe["trees"]] == [2, 3]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_kernel_tests_run_from_a_queue_and_a_failing_file_fails_the_stage(tmp_path):
    # KERNEL_JOBS pytest processes at a time, one file each, a slot taking the next file when its file ends. With 2
    # jobs over a, b, c: a and b start; c starts when b ends, while a still runs. a and c each wait for the other's
    # mark, so they pass only so: not with the files dealt to the slots beforehand ([a, c] and [b]), nor one by one.
    meet = "import pathlib, time\n\ndef test_{me}():\n    pathlib.Path(r'{dir}', '{me}').touch()\n" \
           "    deadline = time.time() + 60\n    while not pathlib.Path(r'{dir}', '{other}').exists():\n" \
           "        assert time.time() < deadline\n        time.sleep(0.05)\n"
    tests = {"a": meet.format(me="a", other="c", dir=tmp_path), "c": meet.format(me="c", other="a", dir=tmp_path),
             "b": "import pytest\n\n@pytest.mark.parametrize('i', range(3))\ndef test_b(i):\n    pass\n",
             "d": "def test_d():\n    assert False\n"}
    for name, text in tests.items():
        (tmp_path / f"test_{name}.py").write_text(text)
    log = tmp_path / "work" / "out" / "kernel_tests.log"

    def stage(*names, jobs="2"):
        files = " ".join(str(tmp_path / f"test_{n}.py") for n in names)
        for mark in "ac":
            (tmp_path / mark).unlink(missing_ok=True)
        env = {**os.environ, "WORK": str(tmp_path / "work"), "KERNEL_JOBS": jobs, "KERNEL_TESTS": files}
        proc = subprocess.run(["bash", "bench/gpu_run.sh", "kernel-tests"], cwd=REPO, env=env, capture_output=True,
                              text=True)
        summaries = [line.split(" in ")[0] for line in log.read_text().splitlines() if " in " in line]
        return proc.returncode, summaries, proc.stdout + proc.stderr

    rc, summaries, output = stage("a", "b", "c")
    assert (rc, summaries) == (0, ["1 passed", "3 passed", "1 passed"]), output  # each file's log, in their order
    rc, summaries, output = stage("a", "b", "c", "d")
    # d failed, so did the stage
    assert rc != 0 and summaries == ["1 passed", "3 passed", "1 passed", "1 failed"], output
    rc, summaries, output = stage("b", jobs="0")
    assert rc != 0 and summaries == [] and "KERNEL_JOBS must be 1 or more" in log.read_text(), output


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_an_unknown_stage_is_refused_before_anything_is_made(tmp_path):
    for stage in ("nope", "sizes joint", ""):  # (two stages in one word must not pass for one)
        proc = subprocess.run(["bash", "bench/gpu_run.sh", stage], cwd=REPO, env={**os.environ, "WORK": str(tmp_path)},
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("usage: bash bench/gpu_run.sh STAGE"), proc.stderr
        assert list(tmp_path.iterdir()) == []  # no WORK/out left by a typo


def test_the_exact_stage_checks_every_shipped_heads():
    script = (REPO / "bench" / "gpu_run.sh").read_text()
    exact = script[script.index("\n  exact)"):script.index("\n  path)")]
    shipped = [p.parent.name for p in (REPO / "weights").glob("*/config.json") if p.parent.name != "cache"]
    assert len(shipped) == 3 and all(f"=weights/{name}" in exact for name in shipped)

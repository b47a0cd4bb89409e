"""Bad input gets one clear sentence naming the fix, never a traceback from deep inside torch."""

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernels
from nanomedusa.cli import run_reporting_errors
from nanomedusa.errors import NanoMedusaError
from nanomedusa.decoder import Decoder
from nanomedusa.generation import generate
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model, resolve_checkpoint
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.tree import TreeBuffers, chain
from tests.helpers import make_hf_checkpoint
from tests.tiny_tokenizer import make_chat_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def ckpt(tmp_path):
    make_hf_checkpoint(tmp_path)
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(NanoMedusaError, match="checkpoint directory .*nope does not exist; pass an existing directory"):
        load_model(tmp_path / "nope", device="cpu")


def test_missing_config(tmp_path):
    with pytest.raises(NanoMedusaError, match="no config.json at"):
        load_model(tmp_path, device="cpu")


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(NanoMedusaError, match="model.safetensors is missing; the checkpoint in .* is incomplete"):
        load_model(ckpt, device="cpu")


def test_pickled_weights_only(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")  # (the name is all the check reads)
    with pytest.raises(NanoMedusaError, match="holds its weights as pytorch_model.bin, a pickle, where nanomedusa reads "
                                              "safetensors; download the model's safetensors files, or convert"):
        load_model(ckpt, device="cpu")


def test_a_damaged_conversion_is_converted_again_not_downloaded(tmp_path, monkeypatch):
    import weights.gguf_to_hf

    monkeypatch.setattr(weights.gguf_to_hf, "CACHE_ROOT", tmp_path)  # where converted checkpoints live
    converted = tmp_path / "model-abc"
    make_hf_checkpoint(converted)
    (converted / "model.safetensors").write_bytes(b"torn")
    with pytest.raises(NanoMedusaError, match=f"not a readable safetensors file .*; delete {converted} to have it "
                                              f"converted again\\.$"):
        load_model(converted, device="cpu")


def test_model_paths_that_look_like_something_else(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "fine-tune.gguf")  # a checkpoint directory, whatever its name
    load_model(tmp_path / "fine-tune.gguf", device="cpu")
    with pytest.raises(NanoMedusaError, match="GGUF file .*MODEL.GGUF does not exist; check the --model path"):
        load_model(tmp_path / "MODEL.GGUF", device="cpu")
    for spec in ("a..b/c", "org/name--x"):  # shaped like hub ids, but none can exist
        with pytest.raises(NanoMedusaError, match=f"^{re.escape(spec)} is neither a local path nor a valid hub id; "):
            load_model(spec, device="cpu")


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(NanoMedusaError, match="is not a readable safetensors file"):
        load_model(ckpt, device="cpu")


def test_weights_that_do_not_fit_the_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanoMedusaError, match=r"tensor model.layers.0.mlp.\w+_proj.weight has shape \(\d+, \d+\) but config.json implies"):
        load_model(ckpt, device="cpu")


def test_missing_tensor(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(NanoMedusaError, match="lacks 1 tensors \\(first: model.norm.weight\\)"):
        load_model(ckpt, device="cpu")


def test_unsupported_architecture(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanoMedusaError, match="architecture 'GPT2LMHeadModel' is not supported; nanomedusa runs LlamaForCausalLM"):
        load_model(ckpt, device="cpu")


def test_unknown_dtype_and_device(ckpt):
    with pytest.raises(NanoMedusaError, match="unknown dtype 'float8'; use one of auto"):
        load_model(ckpt, device="cpu", dtype="float8")
    with pytest.raises(NanoMedusaError, match="unknown device 'tpu0'"):
        load_model(ckpt, device="tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(NanoMedusaError, match="this machine has no CUDA GPU; use --device cpu"):
            load_model(ckpt, device="cuda")


@pytest.mark.parametrize("count,fix", [(1, "1 CUDA GPU; use cuda:0."), (2, "2 CUDA GPUs; use cuda:0 to cuda:1.")])
def test_a_gpu_past_the_last_one(ckpt, monkeypatch, count, fix):
    # (a CPU machine stands in for one with `count` GPUs: the check comes before anything touches one)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(NanoMedusaError, match=re.escape(f"device 'cuda:{count}' was asked for but this machine has "
                                                        f"{fix}")):
        load_model(ckpt, device=f"cuda:{count}")


def test_prompt_longer_than_the_context(ckpt):
    model, _ = load_model(ckpt, device="cpu")  # max_position_embeddings = 256
    with pytest.raises(NanoMedusaError, match=r"prompt \(250 tokens\) \+ --max-new-tokens 10 = 260 exceeds the model's context of 256"):
        generate(Decoder(model), [5] * 250, max_new_tokens=10)  # (ids of its 97-token vocabulary)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "generate.py", "--model", str(tmp_path / "missing"), "--prompt", "hi",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint directory {tmp_path / 'missing'} does not exist; "
                                                 f"pass an existing directory, a .gguf file or a hub id."]


def test_another_kernels_package_first_on_the_path(tmp_path):
    # Hugging Face's `kernels` (installed by transformers >= 5.25) shares our kernels/' import name: where it comes
    # first, importing nanomedusa says so and how to fix it, instead of failing inside a module's imports.
    other = tmp_path / "site-packages" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(other.parent), str(REPO)]))
    run = subprocess.run([sys.executable, "-c", "import nanomedusa.model"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert (f"ImportError: `import kernels` finds {other.resolve() / '__init__.py'} instead of "
            f"nanomedusa's kernels/ ({REPO / 'kernels'})") in run.stderr, run.stderr
    assert "pip uninstall kernels" in run.stderr
    env["PYTHONPATH"] = str(REPO)  # ours first: the same import works
    assert subprocess.run([sys.executable, "-c", "import nanomedusa.model"], cwd=tmp_path, env=env).returncode == 0


def test_another_kernels_package_installed_over_ours(tmp_path):
    # Both installed from wheels into one site-packages: one kernels/ folder, whose __init__.py is the other one's.
    site = tmp_path / "site-packages"
    (site / "nanomedusa").mkdir(parents=True)
    shutil.copy(REPO / "nanomedusa" / "__init__.py", site / "nanomedusa")
    shutil.copytree(REPO / "kernels", site / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "kernels" / "__init__.py").write_text("from .utils import get_kernel\n")
    run = subprocess.run([sys.executable, "-c", "import nanomedusa"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(site)))
    assert run.returncode == 1
    assert (f"ImportError: {(site / 'kernels' / '__init__.py').resolve()} is not nanomedusa's kernels/__init__.py "
            f"(Hugging Face's `kernels` package") in run.stderr, run.stderr
    assert "`pip uninstall kernels`, then reinstall nanomedusa" in run.stderr


def test_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(NanoMedusaError, match="could not download 'nobody/no-such-model' from the Hugging Face hub "
                                              "and it is not in the local cache"):
        load_model("nobody/no-such-model", device="cpu")


def test_a_hub_download_takes_what_loading_reads(monkeypatch, tmp_path):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(kw) or str(tmp_path))
    assert resolve_checkpoint("mistralai/Mistral-7B-Instruct-v0.3") == tmp_path
    # not consolidated.safetensors, Mistral's own layout of the same weights (14.5 GB more for this one)
    assert asked == [dict(allow_patterns=["*.json", "*.safetensors", "tokenizer.model"],
                          ignore_patterns=["consolidated*"])]


def test_config_with_fewer_layers_than_the_weights(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanoMedusaError, match=r"tensor model.layers.1.\S+ has no place in the 1-layer model config.json "
                                              r"describes; .* \(check num_hidden_layers\)"):
        load_model(ckpt, device="cpu")


def test_config_that_is_not_utf8_or_not_an_object(ckpt):
    (ckpt / "config.json").write_bytes(b'{"caf\xe9": 1}')
    with pytest.raises(NanoMedusaError, match=r"config.json is not UTF-8 text \(byte 0xe9 at offset 5\)"):
        load_model(ckpt, device="cpu")
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(NanoMedusaError, match="config.json holds a JSON list, not an object"):
        load_model(ckpt, device="cpu")


def test_zero_new_tokens_emit_nothing(ckpt):
    model, _ = load_model(ckpt, device="cpu")
    heads = MedusaHeads.from_base(model, num_heads=2).eval()
    streamed = []
    assert generate(Decoder(model), [5, 6, 7], 0, on_tokens=streamed.append).tokens == []
    assert generate_medusa(Decoder(model), heads, TreeBuffers.from_choices(chain(2)), [5, 6, 7], 0,
                           on_tokens=streamed.append).tokens == []
    assert streamed == []


# ----- the command lines: every bad input is one `error: ...` line and exit status 2, before anything loads ------

GENERATE = ["generate.py", "--model", "{root}/model", "--device", "cpu", "--quiet", "--prompt", "hi"]
TRAIN = ["train.py", "--model", "{root}/model", "--device", "cpu"]
WARMUP = TRAIN + ["--data", "{root}/answers.jsonl", "--batch-size", "1", "--eval-fraction", "0"]
DISTILL = TRAIN + ["--stage", "distill", "--data", "{root}/prompts.jsonl"]
# The cases of issue 13, each run as a subprocess. name -> (command line, the one error line it must print)
CLI_ERRORS = {
    "tree rank beyond the heads kernel": (GENERATE + ["--medusa", "{root}/heads", "--tree", "[[400]]"],
                                          "Tree path [400] uses rank 400 but the heads give at most their top-16 "
                                          "guesses (ranks 0 to 15); use smaller ranks."),
    "negative new tokens": (GENERATE + ["--max-new-tokens", "-5"],
                            "--max-new-tokens must be at least 0, not -5; pass 0 or more."),
    "negative new tokens with Medusa": (GENERATE + ["--medusa", "{root}/heads", "--max-new-tokens", "-1"],
                                        "--max-new-tokens must be at least 0, not -1; pass 0 or more."),
    "infinite temperature": (GENERATE + ["--temperature", "inf"],
                             "--temperature must be a finite number of at least 0, not inf; pass 0 or more."),
    "negative temperature": (GENERATE + ["--temperature", "-1"],
                             "--temperature must be at least 0, not -1.0; pass 0 or more."),
    "top-p 0": (GENERATE + ["--temperature", "0.7", "--top-p", "0"],
                "--top-p must be in (0, 1] (1 = off), not 0.0; pass e.g. 0.9."),
    "top-p above 1": (GENERATE + ["--top-p", "1.5"], "--top-p must be in (0, 1] (1 = off), not 1.5; pass e.g. 0.9."),
    "negative top-k": (GENERATE + ["--top-k", "-3"], "--top-k must be at least 0, not -3; pass 0 or more."),
    "prompt not UTF-8": (GENERATE[:-1] + [b"caf\xe9 \xff"],
                         "--prompt is not valid UTF-8 (byte 0xe9 at character 3); pass UTF-8 text."),
    "triton kernels on a CPU without the interpreter": (
        GENERATE + ["--kernels", "triton"] + (["--device", "cuda"] if torch.cuda.is_available() else []),
        "--kernels triton needs a CUDA GPU, or on a CPU Triton's interpreter: set TRITON_INTERPRET=1 (slow, for "
        "checking kernels), or use --kernels torch or auto."),
    "warm-up --out is a file": (WARMUP + ["--out", "{root}/answers.jsonl"],
                                "--out {root}/answers.jsonl is a file; pass a directory (it is created if missing)."),
    "distill --out is a directory": (DISTILL + ["--out", "{root}"],
                                     "--out {root} is a directory; pass a file path, e.g. {root}/answers.jsonl."),
    "distill negative new tokens": (DISTILL + ["--out", "{root}/o.jsonl", "--max-new-tokens", "-3"],
                                    "--max-new-tokens must be at least 1, not -3; pass 1 or more."),
    "negative max steps": (WARMUP + ["--out", "{root}/o", "--max-steps", "-3"],
                           "--max-steps must be at least 1, not -3; pass 1 or more."),
    "negative learning rate": (WARMUP + ["--out", "{root}/o", "--lr", "-1"],
                               "--lr must be above 0, not -1.0; pass a positive number."),
    "--data is a directory": (TRAIN + ["--data", "{root}", "--out", "{root}/o"],
                              "--data {root} is a directory; pass a file."),
    "training data not UTF-8": (TRAIN + ["--data", "{root}/latin1.jsonl", "--out", "{root}/o"],
                                "{root}/latin1.jsonl is not UTF-8 text (byte 0xe9 at offset 26); re-save it as UTF-8."),
    "default model with an argument": (["-m", "weights.default_model", "--bogus"],
                                       "unrecognized arguments: --bogus; see --help."),
    "corrupt state.pt": (WARMUP + ["--out", "{root}/corrupt", "--resume"],
                         "{root}/corrupt/checkpoint/state.pt is damaged or not a training checkpoint; delete it to "
                         "start over, or choose another --out."),
}
# More of the same kind, called in-process (a subprocess costs seconds of `import torch` each).
# name -> (module, arguments, the one error line it must print)
MORE_ERRORS = {
    "not-a-number temperature": ("generate", GENERATE[1:] + ["--temperature", "nan"],
                                 "--temperature must be a finite number of at least 0, not nan; pass 0 or more."),
    "seed out of range": ("generate", GENERATE[1:] + ["--seed", "-1"], "--seed must be in 0 .. 4294967295, not -1."),
    "posterior threshold 0": ("generate", GENERATE[1:] + ["--accept", "typical", "--posterior-threshold", "0"],
                              "--posterior-threshold must be above 0, not 0.0; pass a positive number."),
    "typical acceptance at temperature 0": ("generate", GENERATE[1:] + ["--medusa", "{root}/heads", "--accept",
                                                                       "typical"],
                                            "--accept typical accepts by the probabilities of the tempered "
                                            "distribution, so at --temperature 0 it is --accept greedy; pass "
                                            "--temperature > 0 (e.g. 0.7), or --accept greedy."),
    "tree that is not JSON": ("generate", GENERATE[1:] + ["--tree", "[[0]"],
                              "Tree '[[0]' is not valid JSON (Expecting ',' delimiter at char 4); pass a preset name"),
    "--context without a chat": ("generate", GENERATE[1:] + ["--context", "512"],
                                 "--context sets how much of a chat is kept; pass it with --interactive, or drop it."),
    "--medusa is not a directory": ("generate", GENERATE[1:] + ["--medusa", "{root}/answers.jsonl"],
                                    "--medusa {root}/answers.jsonl is not a directory; check the path."),
    "empty --medusa": ("generate", GENERATE[1:] + ["--medusa", ""], "--medusa is empty; pass a directory."),
    "tree tuning --trim of .pt heads": ("nanomedusa.tree_tuning", ["--heads", "{root}/pt-heads", "--data",
                                                                   "{root}/answers.jsonl", "--write", "--trim"],
                                        "--trim rewrites medusa_lm_head.safetensors, which {root}/pt-heads lacks; "
                                        "drop --trim."),
    "tree tuning --nodes beyond its tree, before measuring": (
        "nanomedusa.tree_tuning", ["--heads", "{root}/heads", "--data", "{root}/answers.jsonl", "--model",
                                   "{root}/model", "--device", "cpu", "--max-depth", "1", "--topk", "4", "--nodes", "63"],
        "--nodes 63 is more than a tree 1 deep of top-4 guesses holds (4); pass a smaller --nodes, or a larger --topk "
        "or --max-depth."),
    "--accept greedy with a temperature": ("generate", GENERATE[1:] + ["--medusa", "{root}/heads", "--accept", "greedy",
                                                                    "--temperature", "0.7"],
                                           "--accept greedy keeps the model's argmax, so --temperature would do "
                                           "nothing; use --accept sample (lossless) or --accept typical to sample"),
    "--accept sample at temperature 0": ("generate", GENERATE[1:] + ["--medusa", "{root}/heads", "--accept", "sample"],
                                         "--accept sample needs --temperature > 0; use --accept greedy"),
    "temperature too small to divide by": ("generate", GENERATE[1:] + ["--temperature", "1e-45"],
                                           "--temperature 1e-45 is too small to divide logits by; pass 0 for greedy "
                                           "decoding, or at least 1e-05."),
    "--quiet chat": ("generate", GENERATE[1:-2] + ["--interactive"],  # (GENERATE[5] is --quiet)
                     "--interactive streams its answers, which --quiet would silence; drop --quiet."),
    "--raw with --system": ("generate", GENERATE[1:] + ["--raw", "--system", "Be terse."],
                            "--raw feeds the prompt without the chat template, which is where --system goes; drop "
                            "one of them."),
    "--raw with --chat-format": ("generate", GENERATE[1:] + ["--raw", "--chat-format", "vicuna"],
                                 "--raw feeds the prompt without the chat template, which is where --chat-format "
                                 "goes; drop one of them."),
    "a tree deeper than the heads, before a chat starts": (
        "generate", GENERATE[1:5] + ["--interactive", "--medusa", "{root}/heads",
                                     "--tree", "[[0], [0, 0], [0, 0, 0]]"],  # (a preset is cut to the heads)
        "the tree is 3 deep but there are only 2 Medusa heads; pick a tree at most 2 deep."),
    "a chat's --prompt too long": (  # (the chat's error ends the run, exit status 2, where it went on to exit 0)
        "generate", GENERATE[1:5] + ["--interactive", "--max-new-tokens", "5", "--prompt", "a" * 250],
        "this message takes 305 tokens with the chat template and the model's default system prompt, which leaves too "
        "little of the 256-token context for an answer of 5 tokens; send a shorter one."),
    "argparse's own error": ("generate", GENERATE[1:] + ["--max-new-tokens", "abc"],
                             "argument --max-new-tokens: invalid int value: 'abc'; see --help."),
    "warm-up heads with nothing to train": ("train", WARMUP[1:] + ["--shared-lm-head", "--num-layers", "0"],
                                            "heads without ResBlocks that share the lm_head have no weights of their "
                                            "own to train; pass --num-layers 1 or more, or drop --shared-lm-head."),
    "a data weight that keeps nothing": ("train", TRAIN[1:] + ["--data", "{root}/answers.jsonl", "{root}/answers.jsonl",
                                                               "--data-weights", "1", "0.01", "--eval-fraction", "0"],
                                         "--data-weights 0.01 keeps none of the 4 training examples of "
                                         "{root}/answers.jsonl; give it a weight of 0.25 or more, or drop the file."),
    "--out under a file": ("train", WARMUP[1:] + ["--out", "{root}/answers.jsonl/o"],
                           "--out {root}/answers.jsonl/o lies under {root}/answers.jsonl, which is a file; pass a path "
                           "under a directory."),
    "negative distill limit": ("train", DISTILL[1:] + ["--out", "{root}/o.jsonl", "--limit", "-1"],
                               "--limit must be at least 1, not -1; pass 1 or more."),
    "distill top-p 0": ("train", DISTILL[1:] + ["--out", "{root}/o.jsonl", "--temperature", "1", "--top-p", "0"],
                        "--top-p must be in (0, 1] (1 = off), not 0.0; pass e.g. 0.9."),
    "a distill flag in training": ("train", WARMUP[1:] + ["--out", "{root}/o", "--temperature", "0.7"],
                                   "--temperature applies to --stage distill only; drop it."),
    "a training flag in distillation": ("train", DISTILL[1:] + ["--out", "{root}/o.jsonl", "--batch-size", "4"],
                                        "--batch-size applies to --stage warmup and joint, not distill (it decodes "
                                        "--distill-batch-size prompts at a time); drop it."),
    "--resume in distillation": ("train", DISTILL[1:] + ["--out", "{root}/o.jsonl", "--resume"],
                                 "--resume applies to --stage warmup and joint, not distill (it always continues where "
                                 "its --out stopped); drop it."),
    "a joint flag in warm-up": ("train", WARMUP[1:] + ["--out", "{root}/o", "--backbone-lr", "1e-4"],
                                "--backbone-lr only applies to --stage joint (warm-up trains the heads alone, on a "
                                "frozen backbone); drop it."),
    "--lora-alpha in full joint training": ("train", WARMUP[1:] + ["--out", "{root}/o", "--stage", "joint", "--heads",
                                                                   "{root}/heads", "--lora-alpha", "8"],
                                            "--lora-alpha scales a LoRA adapter, and full joint training has none; add "
                                            "--lora-rank, or drop it."),
    "new heads' shape with --heads": ("train", WARMUP[1:] + ["--out", "{root}/o", "--heads", "{root}/heads",
                                                             "--num-heads", "3"],
                                      "--num-heads shapes new heads, and the heads in {root}/heads keep their own; "
                                      "drop it, or drop --heads to train new heads."),
    "--resume with --overwrite": ("train", WARMUP[1:] + ["--out", "{root}/o", "--resume", "--overwrite"],
                                  "--resume continues the run in --out and --overwrite starts it again; pass one."),
    "missing heads to start from": ("train", WARMUP[1:] + ["--out", "{root}/o", "--heads", "{root}/none"],
                                    "--heads {root}/none is not a directory; check the path."),
    "both --epochs and --max-steps": ("train", WARMUP[1:] + ["--out", "{root}/o", "--epochs", "2", "--max-steps", "5"],
                                      "--epochs and --max-steps both say how long to train; pass one."),
    "negative grad clip": ("train", WARMUP[1:] + ["--out", "{root}/o", "--grad-clip", "-1"],
                           "--grad-clip must be at least 0, not -1.0; pass 0 or more."),
    "tree tuning top-k beyond the kernel": ("nanomedusa.tree_tuning", ["--heads", "{root}/heads", "--data",
                                                                       "{root}/answers.jsonl", "--topk", "40"],
                                            "--topk must be at most 16 (the deepest rank a tree may use), not 40."),
    "tree tuning without a held-out split": ("nanomedusa.tree_tuning", ["--heads", "{root}/heads", "--data",
                                                                        "{root}/answers.jsonl", "--eval-fraction", "0"],
                                             "--eval-fraction must be in (0, 1), not 0.0; pass the one the heads were "
                                             "trained with, or leave it out to take theirs."),
    "tree tuning --trim without --write": ("nanomedusa.tree_tuning", ["--heads", "{root}/heads", "--data",
                                                                     "{root}/answers.jsonl", "--trim"],
                                           "--trim drops heads from the files --write rewrites; add --write, or drop "
                                           "--trim."),
    "calibration's held-out prompts of an empty file": ("nanomedusa.calibration", [
        "--model", "{root}/model", "--held-out-prompts", "{root}/empty.jsonl", "--out", "{root}/held.jsonl", "--split",
        "id"],
        "{root}/empty.jsonl holds no prompt to hold out; pass the prompts file the heads' answers came from."),
    "calibration's held-out prompts without the heads' split": ("nanomedusa.calibration", [
        "--held-out-prompts", "{root}/prompts.jsonl", "--out", "{root}/held.jsonl"],
        "--held-out-prompts must split the prompts as the heads' training split their answers; pass --heads DIR (its "
        "config.json says how) or --split id|position."),
    "offline trees without their tuning sets": ("bench.dynamic_trees_offline", [
        "--heads", "{root}/heads", "--eval", "{root}/prompts.jsonl:1", "--tune", "{root}/held.jsonl:3"],
        "--tune {root}/held.jsonl does not exist; make the tuning sets first with python -m nanomedusa.calibration "
        "--held-out-prompts (this module's docstring shows how)."),
    "path-tree simulator without prompts": ("bench.path_trees_offline", [
        "--heads", "{root}/heads", "--prompts", "{root}/none.jsonl"], "--prompts {root}/none.jsonl does not exist; "
                                                                        "check the path."),
    "heads probe without training answers": ("bench.conditioned_heads_probe", [
        "--train", "{root}/none.jsonl", "--eval", "{root}/answers.jsonl"], "--train {root}/none.jsonl does not exist; "
                                                                           "check the path."),
    "bench without new tokens": ("bench.decode", ["--device", "cpu", "--max-new-tokens", "0"],
                                 "--max-new-tokens must be at least 1, not 0; pass 1 or more."),
    "bench tree sizes that are not numbers": ("bench.decode", ["--device", "cpu", "--tree-sizes", "16,x"],
                                              "--tree-sizes '16,x' is not a comma-separated list of node counts; "
                                              "pass e.g. 16,32,64."),
    "bench --json is a directory": ("bench.decode", ["--device", "cpu", "--json", "{root}"],
                                    "--json {root} is a directory; pass a file path, e.g. {root}/answers.jsonl."),
}


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_chat_checkpoint(root / "model")
    MedusaHeads.from_base(load_model(root / "model", device="cpu")[0], num_heads=2).save(root / "heads")
    (root / "pt-heads").mkdir()  # the same heads as the reference implementation's .pt file
    shutil.copy(root / "heads" / "config.json", root / "pt-heads" / "config.json")
    torch.save(load_file(str(root / "heads" / "medusa_lm_head.safetensors")), root / "pt-heads" / "medusa_lm_head.pt")
    (root / "prompts.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]
    (root / "answers.jsonl").write_text("".join(json.dumps({"id": i, "conversations": turns}) + "\n" for i in range(4)))
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes(b'{"id": "a", "prompt": "caf\xe9"}\n')
    (root / "corrupt" / "checkpoint").mkdir(parents=True)
    (root / "corrupt" / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    return root


def with_root(argv: list, root: Path) -> list:
    return [a.format(root=root) if isinstance(a, str) else a for a in argv]


def assert_one_error_line(returncode: int, stderr: str, expected: str) -> None:
    """Exit status 2, and of stderr's lines (progress bars aside) exactly one error and no traceback."""
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    errors = [line.strip() for line in stderr.splitlines() if "error:" in line]  # splitlines also cuts tqdm's \r
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}"), stderr


@pytest.mark.parametrize("name", CLI_ERRORS)
def test_cli_error(name, cli_root):
    argv, expected = CLI_ERRORS[name]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, *with_root(argv, cli_root)], cwd=REPO, capture_output=True, env=env)
    assert_one_error_line(proc.returncode, proc.stderr.decode(), expected.format(root=cli_root))


@pytest.mark.parametrize("name", MORE_ERRORS)
def test_more_cli_errors(name, cli_root, capsys):
    module, argv, expected = MORE_ERRORS[name]
    try:
        code = importlib.import_module(module).main(with_root(argv, cli_root))
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code = e.code
    assert_one_error_line(code, capsys.readouterr().err, expected.format(root=cli_root))


def test_help_gives_each_flags_default_once(capsys, monkeypatch):
    import train

    monkeypatch.setenv("COLUMNS", "1000")  # (argparse's lines as wide as that: no word cut at a hyphen)

    text = " ".join(train.make_parser().format_help().split())
    assert "--stage {distill,warmup,joint} (default: warmup)" in text  # a flag without help has its default too
    assert "--lora-alpha LORA_ALPHA (default: 16.0)" in text and text.count("(default: 16.0)") == 1
    assert "--heads HEADS heads directory to start from" in text  # (default None: the help says what happens)
    assert "default: None" not in text and "default: False" not in text
    with pytest.raises(SystemExit):
        importlib.import_module("nanomedusa.tree_tuning").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-len MAX_LEN (default: 1024)" in text and "--device DEVICE (default: auto)" in text
    assert "default: None" not in text and "default: False" not in text
    with pytest.raises(SystemExit):  # a list as the flag takes it, not as Python prints it
        importlib.import_module("bench.path_trees_offline").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: bench/prompts-chat-heldout.jsonl bench/prompts-train-mix.jsonl)" in text and "['" not in text


def test_a_reader_that_goes_away_ends_the_run_quietly(cli_root):
    # `generate.py ... | head -c 3`: the pipe is closed before the first token is written
    argv = [a for a in with_root(GENERATE, cli_root) if a != "--quiet"]
    proc = subprocess.Popen([sys.executable, *argv, "--max-new-tokens", "8"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 128 + 13 and "Traceback" not in stderr, stderr  # as SIGPIPE ends a Unix tool


def test_the_prompt_takes_an_empty_system_message_as_the_chat_does(cli_root):
    import generate
    from nanomedusa.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(cli_root / "model")
    user = {"role": "user", "content": "hi"}
    for system, messages in ((None, [user]), ("", [{"role": "system", "content": ""}, user])):
        args = generate.parse_args(["--prompt", "hi"] + ([] if system is None else ["--system", system]))
        assert generate.encode_prompt(args, tokenizer) == tokenizer.encode_chat(messages)
    assert tokenizer.encode_chat([user]) != tokenizer.encode_chat([{"role": "system", "content": ""}, user])


def test_a_checkpoint_without_a_known_template_says_so_and_takes_chat_format(cli_root, tmp_path, capsys):
    """A template nanomedusa has no preset for, or none, puts messages in as plain text: a note says which, and
    --chat-format picks the format the model was tuned on."""
    import generate
    from nanomedusa.chat_template import ChatFormat
    from nanomedusa.tokenizer import Tokenizer, load_tokenizer

    shutil.copytree(cli_root / "model", tmp_path / "model")
    user = [{"role": "user", "content": "hi"}]
    gemma = "{% for m in messages %}{{ '<start_of_turn>' + m['content'] }}{% endfor %}"
    edit_json(tmp_path / "model" / "tokenizer_config.json", chat_template=gemma)
    for flags, preset, note in (([], "plain", True), (["--chat-format", "vicuna"], "vicuna", False),
                                (["--raw"], "plain", False)):
        args = generate.parse_args(["--prompt", "hi", *flags])
        tokenizer = load_tokenizer(tmp_path / "model", args.chat_format, note=not args.raw)
        assert tokenizer.chat.preset == preset
        err = capsys.readouterr().err
        assert ("[note] the checkpoint has a chat template of a format nanomedusa has no preset for, so messages go "
                "in as plain text, without role markers; if the model was tuned on one of these formats, pass "
                "--chat-format chatml|llama2|mistral|llama3|vicuna|zephyr." in err) is note
        if not args.raw:
            expected = Tokenizer.from_dir(tmp_path / "model", chat_preset=preset).encode_chat(user)
            assert generate.encode_prompt(args, tokenizer) == expected
    # No template: ChatML's tokens in the vocabulary say enough (this tokenizer has them); without them, a note.
    assert ChatFormat.from_checkpoint(None, ["<|im_start|>"]).plain_text_note() is None
    assert ChatFormat.from_checkpoint(None, ["<s>"]).plain_text_note().startswith("the checkpoint has no chat template")
    load_tokenizer(cli_root / "model")  # ChatML: no note
    assert capsys.readouterr().err == ""


def test_heads_trained_on_another_local_model_say_which_to_load(cli_root, tmp_path, capsys):
    import generate

    shutil.copytree(cli_root / "model", tmp_path / "tuned")  # as train.py's OUT/model after full joint training
    shutil.copytree(cli_root / "heads", tmp_path / "heads")
    edit_json(tmp_path / "heads" / "config.json", base_model_name_or_path=str(tmp_path / "tuned"))
    argv = with_root(GENERATE[1:], cli_root) + ["--medusa", str(tmp_path / "heads"), "--max-new-tokens", "2"]
    assert generate.main(argv) == 0
    assert (f"[note] the heads in {tmp_path / 'heads'} were trained on the model in {tmp_path / 'tuned'}, and this run "
            f"loads {cli_root / 'model'};" in capsys.readouterr().err)
    assert generate.main(argv + ["--model", str(tmp_path / "tuned")]) == 0
    assert "were trained on the model in" not in capsys.readouterr().err


def test_every_tool_that_renders_conversations_takes_chat_format(cli_root, tmp_path, monkeypatch):
    # Heads are distilled, trained, tuned and calibrated on prompts of one format, the one they are served with.
    from nanomedusa.tokenizer import Tokenizer

    asked = []

    def from_dir(cls, path, chat_preset=None):
        asked.append(chat_preset)
        raise NanoMedusaError("enough")

    monkeypatch.setattr(Tokenizer, "from_dir", classmethod(from_dir))
    common = ["--model", "{root}/model", "--device", "cpu", "--chat-format", "vicuna"]
    heads = ["--heads", "{root}/heads", "--data", "{root}/answers.jsonl"]
    runs = [("generate", GENERATE[1:] + ["--chat-format", "vicuna"]),
            ("train", ["--data", "{root}/answers.jsonl", "--out", str(tmp_path / "train"), *common]),
            ("train", ["--stage", "distill", "--data", "{root}/prompts.jsonl", "--out", str(tmp_path / "a.jsonl"),
                       *common]),
            ("nanomedusa.tree_tuning", heads + common),
            ("nanomedusa.calibration", heads + common)]
    for module, argv in runs:
        assert importlib.import_module(module).main(with_root(argv, cli_root)) == 2
    assert asked == ["vicuna"] * len(runs)


def test_kernel_errors_are_reported_like_ours(capsys):
    # kernels/ has its own error type (it imports nothing from nanomedusa); the CLIs report it the same way.
    code = run_reporting_errors(lambda: kernels.set_backend("cuda"))
    assert_one_error_line(code, capsys.readouterr().err,
                          "unknown kernel backend 'cuda'; use one of auto, torch, triton.")


def test_running_out_of_gpu_memory_is_one_line(capsys):
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB. GPU 0 has a total capacity "
                                     "of 23.55 GiB of which 2.1 GiB is free. Including non-PyTorch memory, ...")
    assert_one_error_line(run_reporting_errors(oom), capsys.readouterr().err,
                          "CUDA out of memory. Tried to allocate 16.00 GiB; ask for less memory (a shorter context or "
                          "sequence, fewer new tokens, a smaller batch or tree), or use a smaller model or dtype.")


def test_ctrl_c_ends_a_run_without_a_traceback(capsys):
    def interrupted():
        sys.stdout.write("a partial answer")
        raise KeyboardInterrupt
    assert run_reporting_errors(interrupted) == 130  # as a shell reports a tool that SIGINT ended
    captured = capsys.readouterr()
    assert captured.out == "a partial answer" and captured.err == "\n"  # the shell's prompt on a line of its own


def test_every_cli_that_reports_errors_ends_through_exit_with():
    # run_reporting_errors turns Ctrl-C into a status; only exit_with then ends the process by SIGINT (below)
    scripts = [REPO / "generate.py", REPO / "train.py", *(REPO / "nanomedusa").glob("*.py"),
               *(REPO / "weights").glob("*.py"), *(REPO / "bench").glob("*.py")]
    ends = {path.name: path.read_text().partition('if __name__ == "__main__":')[2] for path in scripts
            if "run_reporting_errors(" in path.read_text()}
    assert len(ends) > 15 and "decode.py" in ends
    assert [name for name, end in ends.items() if end and "exit_with(" not in end] == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_after_ctrl_c_a_cli_ends_by_sigint_so_that_a_shell_loop_stops():
    # bash goes on with a loop or a list of commands after a process that exited with 130; it stops only after one
    # that SIGINT ended
    # and, as Python does before it ends so, runs the exit handlers and flushes what stdout still buffers (a
    # training log redirected to a file)
    script = ("import atexit, sys; from nanomedusa.cli import exit_with; print('step 100 | loss 2.3'); "
              "atexit.register(lambda: print('exit handler ran', file=sys.stderr)); exit_with(int(sys.argv[1]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for status, code in ((130, -signal.SIGINT), (2, 2)):
        proc = subprocess.run([sys.executable, "-c", script, str(status)], cwd=REPO, capture_output=True, text=True,
                              env=env)
        assert (proc.returncode, proc.stdout, proc.stderr) == (code, "step 100 | loss 2.3\n", "exit handler ran\n")


def test_cli_zero_new_tokens_prints_nothing(cli_root):
    argv = with_root(GENERATE + ["--medusa", "{root}/heads", "--max-new-tokens", "0"], cli_root)
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "" and "[medusa] 0 tokens in" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is the CPU path")
def test_cli_runs_triton_kernels_in_the_interpreter(cli_root, capsys):
    import generate as generate_cli  # in-process: this test session already runs Triton in its interpreter

    assert generate_cli.main(with_root(GENERATE[1:] + ["--kernels", "triton", "--max-new-tokens", "2"], cli_root)) == 0
    assert "[plain] 2 tokens in" in capsys.readouterr().err


# ----- damaged or hand-edited files, and settings no input could satisfy: one sentence, not a traceback ------------

def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", "64", "config.json's hidden_size is '64'; it must be an integer of at least 1: fix the config."),
    ("num_hidden_layers", 0, "config.json's num_hidden_layers is 0; it must be an integer of at least 1"),
    ("max_position_embeddings", None, "config.json's max_position_embeddings is None; it must be an integer"),
    ("rms_norm_eps", "x", "config.json's rms_norm_eps is 'x'; it must be a positive number: fix the config."),
    ("rope_theta", -10000.0, "config.json's rope_theta is -10000.0; it must be a positive number"),
    ("rope_theta", 0, "config.json's rope_theta is 0; it must be a positive number"),
    ("rope_scaling", "linear", "config.json's rope_scaling is 'linear'; it must be an object such as"),
    ("rope_scaling", {"rope_type": "linear"},
     "config.json's linear rope_scaling needs factor as a positive number, not None; add it from the model's"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0},
     "config.json's llama3 rope_scaling needs original_max_position_embeddings as a positive number, not None"),
    ("hidden_act", "gelu", "config.json's hidden_act is 'gelu'; nanomedusa's SwiGLU computes silu, so this "
                           "checkpoint would run wrong: use a model whose hidden_act is silu."),
])
def test_config_values_of_the_wrong_kind(ckpt, field, value, expected):
    edit_json(ckpt / "config.json", **{field: value})
    with pytest.raises(NanoMedusaError, match="^" + re.escape(expected)):
        load_model(ckpt, device="cpu")


def test_config_numbers_load_as_numbers(ckpt):
    # integers where floats go (rope_theta 10000, as many configs write it) are fine, and stored as floats
    edit_json(ckpt / "config.json", rope_theta=10000, rms_norm_eps=1, hidden_act="swish")
    config = load_model(ckpt, device="cpu")[0].config
    assert (type(config.rope_theta), type(config.rms_norm_eps)) == (float, float)


def test_sharded_index_whose_weight_map_is_not_an_object(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(NanoMedusaError, match="model.safetensors.index.json is not a valid safetensors index"):
        load_model(ckpt, device="cpu")


def test_cpu_0_is_the_cpu(ckpt):  # torch accepts the name, safetensors does not
    assert load_model(ckpt, device="cpu:0")[0].device == torch.device("cpu")


@pytest.mark.parametrize("name, content, expected", [
    ("tokenizer.json", b"not json", "tokenizer.json is not a tokenizer the tokenizers library can read"),
    ("tokenizer.json", b"[]", "tokenizer.json is not a tokenizer the tokenizers library can read"),
    ("tokenizer.model", b"\x00junk", "tokenizer.model is not a sentencepiece model; restore it"),
    ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json holds a JSON list, not an object; restore it"),
])
def test_damaged_tokenizer_files(tmp_path, name, content, expected):
    from nanomedusa.tokenizer import Tokenizer

    make_chat_checkpoint(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(NanoMedusaError, match=re.escape(expected)):
        Tokenizer.from_dir(tmp_path)


@pytest.fixture()
def heads_dir(ckpt, tmp_path):
    model = load_model(ckpt, device="cpu")[0]
    MedusaHeads.from_base(model, num_heads=2, num_layers=1).save(tmp_path / "heads")
    return tmp_path / "heads"


@pytest.mark.parametrize("changes, expected", [
    ({"medusa_num_layers": "1"}, "config.json's medusa_num_layers is '1'; it must be an integer of at least 0"),
    ({"medusa_num_heads": 0}, "config.json's medusa_num_heads is 0; it must be an integer of at least 1"),
    ({"rank_accuracy": "x"}, "config.json's rank_accuracy must be 2 rows, one per head, of 1 to 16 numbers from 0 to "
                             "1 each, all rows as long; remove it from config.json, then measure it again with "
                             "python -m nanomedusa.tree_tuning --write."),
    ({"rank_accuracy": [[0.5, 0.2]]}, "config.json's rank_accuracy must be 2 rows, one per head"),
    ({"rank_accuracy": [[0.5, 0.2], [0.4, -0.1]]}, "config.json's rank_accuracy must be 2 rows, one per head"),
])
def test_heads_config_values_of_the_wrong_kind(ckpt, heads_dir, changes, expected):
    edit_json(heads_dir / "config.json", **changes)
    with pytest.raises(NanoMedusaError, match=re.escape(expected)):
        MedusaHeads.load(heads_dir, load_model(ckpt, device="cpu")[0].config)


def test_heads_files_that_hold_the_wrong_things(ckpt, heads_dir):
    config = load_model(ckpt, device="cpu")[0].config
    state = load_file(str(heads_dir / "medusa_lm_head.safetensors"))
    save_file(state | {"medusa_head.0.0.linear.weight": torch.zeros(4)}, str(heads_dir / "medusa_lm_head.safetensors"))
    with pytest.raises(NanoMedusaError, match=r"0.0.linear.weight has shape \[4\], not \[hidden, hidden\]"):
        MedusaHeads.load(heads_dir, config)
    (heads_dir / "medusa_lm_head.safetensors").unlink()
    torch.save([torch.zeros(2)], heads_dir / "medusa_lm_head.pt")  # the reference's file name, but a list
    with pytest.raises(NanoMedusaError, match=r"medusa_lm_head.pt does not hold named tensors \(a state dict\)"):
        MedusaHeads.load(heads_dir, config)


@pytest.mark.parametrize("lora, shapes, expected", [
    ({"rank": 0, "alpha": 8}, None, "config.json lacks a valid \"lora\": {\"rank\": a positive integer, \"alpha\"}"),
    ({"rank": 4, "alpha": 8}, ((4, 64), (64, 3)),
     "the adapter's layers.0.attention.wo tensors are [4, 64] and [64, 3], not [4, in] and [out, 4] for "
     "config.json's rank 4; re-export the heads from joint training."),
])
def test_lora_adapters_that_do_not_add_up(ckpt, heads_dir, lora, shapes, expected):
    from nanomedusa.adapter import apply_adapter, save_adapter

    model = load_model(ckpt, device="cpu")[0]
    a_shape, b_shape = shapes or ((4, model.config.dim), (model.config.dim, 4))
    save_adapter({"layers.0.attention.wo.lora_a": torch.zeros(a_shape),
                  "layers.0.attention.wo.lora_b": torch.zeros(b_shape)}, heads_dir)
    edit_json(heads_dir / "config.json", lora=lora)
    with pytest.raises(NanoMedusaError, match=re.escape(expected)):
        apply_adapter(model, heads_dir)


def test_chat_whose_answer_leaves_no_room_for_a_message(tmp_path):
    from nanomedusa.chat import ChatSession
    from nanomedusa.tokenizer import Tokenizer

    make_chat_checkpoint(tmp_path)
    model, tokenizer = load_model(tmp_path, device="cpu")[0], Tokenizer.from_dir(tmp_path)
    context = model.config.max_position_embeddings
    expected = (f"an answer of {context} tokens and a tree of 7 nodes leaves no room for a message in a chat context "
                f"of {context} tokens; lower --max-new-tokens or use a smaller tree.")
    with pytest.raises(NanoMedusaError, match=re.escape(expected)):
        ChatSession(model, tokenizer, decode=None, max_new_tokens=context, extra=7)
    ChatSession(model, tokenizer, decode=None, max_new_tokens=context // 2)  # room to spare: no error


def test_distill_of_an_empty_prompts_file_and_of_prompts_it_cannot_answer(tmp_path, capsys):
    from nanomedusa.training import DistillConfig, distill

    make_chat_checkpoint(tmp_path / "model")
    (tmp_path / "empty.jsonl").write_text("")
    cfg = DistillConfig(model=str(tmp_path / "model"), data=str(tmp_path / "empty.jsonl"),
                        out=str(tmp_path / "o.jsonl"), device="cpu")
    with pytest.raises(NanoMedusaError, match="empty.jsonl holds no prompts; pass a JSON-lines file of conversations"):
        distill(cfg)
    prompts = [{"id": "long", "prompt": "word " * 400}, {"id": "a", "prompt": "hi"}, {"id": "a", "prompt": "hello"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cfg.data = str(tmp_path / "p.jsonl")
    assert distill(cfg) == 1
    assert "distill: skipped 2 of 3 prompts: 1 with a repeated id, 1 with no room to answer in the context (the " \
           "model's context is 256 tokens)" in capsys.readouterr().out


def test_medusa_flags_without_heads_say_they_do_nothing(cli_root, capsys):
    import generate as generate_cli

    argv = GENERATE[1:] + ["--max-new-tokens", "2", "--tree", "dynamic", "--accept", "typical"]
    assert generate_cli.main(with_root(argv, cli_root)) == 0
    err = capsys.readouterr().err
    assert "[note] --tree and --accept apply to Medusa decoding; this run decodes plainly (no heads), so they do " \
           "nothing here." in err and "[plain] 2 tokens in" in err
    # not even --accept greedy at a temperature (which Medusa refuses): a Medusa command line with --no-medusa added
    argv = GENERATE[1:] + ["--medusa", "{root}/heads", "--no-medusa", "--max-new-tokens", "2", "--accept", "greedy",
                           "--temperature", "0.7"]
    assert generate_cli.main(with_root(argv, cli_root)) == 0
    assert "[note] --medusa and --accept apply to Medusa decoding" in capsys.readouterr().err
    argv = GENERATE[1:] + ["--medusa", "{root}/heads", "--no-medusa", "--max-new-tokens", "2"]
    assert generate_cli.main(with_root(argv, cli_root)) == 0
    assert "[note] --medusa applies to Medusa decoding; this run decodes plainly (no heads), so it does nothing " \
           "here." in capsys.readouterr().err


def test_flags_that_need_no_model_are_refused_before_it_loads(cli_root, capsys, monkeypatch):
    # --compare without heads, and a --dtype of no use, were refused only after the model (and for training the data)
    # had loaded
    import generate as generate_cli
    import train as train_cli

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model loaded before the flags were checked")

    monkeypatch.setattr(generate_cli, "load_model", must_not_load)
    for module, argv, expected in (
            (generate_cli, GENERATE[1:] + ["--compare"], "--compare needs Medusa heads for this model; pass --medusa "
                                                        "HEADS_DIR."),
            (generate_cli, GENERATE[1:] + ["--dtype", "float64"], "unknown dtype 'float64'; use one of auto, float32, "
                                                                 "fp32, bfloat16, bf16, float16, fp16."),
            (train_cli, WARMUP[1:] + ["--dtype", "float64"], "unknown dtype 'float64'; use one of auto, float32, fp32, "
                                                            "bfloat16, bf16, float16, fp16.")):
        assert module.main(with_root(argv, cli_root)) == 2
        assert capsys.readouterr().err.strip() == f"error: {expected}"


# ----- the library, called from Python with the mistakes a caller makes (a read-only audit of the API) -------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, its Decoder, 2 heads of its own and a 3-node tree; another model's heads (other width and
    vocabulary)."""
    root = tmp_path_factory.mktemp("api")
    make_hf_checkpoint(root / "model")
    make_hf_checkpoint(root / "other", hidden_size=32, vocab_size=300)
    model, other = load_model(root / "model", device="cpu")[0], load_model(root / "other", device="cpu")[0]
    return (model, Decoder(model), MedusaHeads.from_base(model, num_heads=2).eval(),
            TreeBuffers.from_choices([[0], [1], [0, 0]]), MedusaHeads.from_base(other, num_heads=2).eval())


def test_medusa_with_heads_or_a_tree_that_are_not_this_models(tiny):
    model, decoder, heads, tree, others = tiny
    with pytest.raises(NanoMedusaError, match=re.escape("the heads read 32-wide hidden states and guess among 300 "
                                                        f"tokens, but the model's are {model.config.dim} and "
                                                        f"{model.config.vocab_size}; use heads made for this model.")):
        generate_medusa(decoder, others, tree, [5, 6, 7], 4)
    with pytest.raises(NanoMedusaError, match=re.escape("the heads are torch.float16 on cpu but the model is "
                                                        "torch.float32 on cpu; move them with heads.to(")):
        generate_medusa(decoder, MedusaHeads.from_base(model, num_heads=2).half(), tree, [5, 6, 7], 4)
    with pytest.raises(NanoMedusaError, match=re.escape("the tree must be a TreeBuffers or a DynamicTree, not a list; "
                                                        "build one with TreeBuffers.from_choices(paths)")):
        generate_medusa(decoder, heads, [[0], [1], [0, 0]], [5, 6, 7], 4)


@pytest.mark.parametrize("prompt, expected", [
    ([5, 500, 7], "the prompt holds 500, not a token id of the model's vocabulary (0 to 96); encode the prompt with "
                  "this model's tokenizer."),
    ([5, -1], "the prompt holds -1, not a token id of the model's vocabulary"),
    (torch.tensor([5, 6]), "the prompt must be a list of token ids, not a Tensor; pass tokenizer.encode(text)"),
])
def test_prompts_that_are_not_token_ids(tiny, prompt, expected):
    model, decoder, heads, tree, _ = tiny
    for run in (lambda: generate(decoder, prompt, 4), lambda: generate_medusa(decoder, heads, tree, prompt, 4)):
        with pytest.raises(NanoMedusaError, match=re.escape(expected)):
            run()


def test_negative_new_tokens_and_sampling_settings_from_python(tiny):
    from kernels.errors import KernelInputError
    from kernels.sample_token import sample_token
    from nanomedusa.sampling import Sampling

    _, decoder, heads, tree, _ = tiny
    for run in (lambda: generate(decoder, [5] * 300, -100), lambda: generate_medusa(decoder, heads, tree, [5], -3)):
        with pytest.raises(NanoMedusaError, match="max_new_tokens must be a whole number of at least 0, not -"):
            run()
    needs = ("needs temperature 0 (greedy) or at least 1e-05, a whole number top_k >= 0 (0: off) and top_p in (0, 1] "
             "(1: off).")
    with pytest.raises(NanoMedusaError, match=re.escape(f"Sampling(temperature=1.0, top_k=0, top_p=0.0) {needs}")):
        Sampling(1.0, 0, 0.0)
    with pytest.raises(NanoMedusaError, match=re.escape(needs)):  # it would divide the logits into infinities
        Sampling(1e-45)
    with pytest.raises(KernelInputError, match=re.escape("sample_token needs temperature > 0, top_k >= 0 and top_p in "
                                                         "(0, 1], not 1.0, 0 and 0.0")):
        sample_token(torch.randn(1, 37), 1.0, 0, 0.0, torch.rand(1, 5))


def test_library_arguments_of_the_wrong_kind(tiny, tmp_path):
    # Each was taken and failed later inside torch, or ran on: an empty prompt in a batch decoded from padding, and
    # 3.5 new tokens gave 4.
    from nanomedusa.generation import generate_batch
    from nanomedusa.heads import HeadsConfig
    from nanomedusa.sampling import Sampling

    model, decoder, heads, tree, _ = tiny
    with pytest.raises(NanoMedusaError, match=re.escape("the prompt is empty; pass some text")):
        generate_batch(model, [[5, 9, 17], []], 5)
    with pytest.raises(NanoMedusaError, match=re.escape("generate_batch takes a non-empty list of prompts (lists of "
                                                        "token ids), not [].")):
        generate_batch(model, [], 5)
    for run in (lambda eos: generate(decoder, [5, 6], 4, eos_ids=eos),
                lambda eos: generate_medusa(decoder, heads, tree, [5, 6], 4, eos_ids=eos),
                lambda eos: generate_batch(model, [[5, 6]], 4, eos_ids=eos)):
        with pytest.raises(NanoMedusaError, match=re.escape("eos_ids must be a list of token ids, not 2; pass e.g. "
                                                            "tokenizer.eos_ids, or [id] for one id.")):
            run(2)
        with pytest.raises(NanoMedusaError, match=re.escape("eos_ids must be a list of token ids, not <generator")):
            run(i for i in [2])  # (`in` would consume it)
        run({2, 3})  # any collection of ids
    for run in (lambda: generate(decoder, [5, 6], 3.5), lambda: generate_medusa(decoder, heads, tree, [5, 6], True)):
        with pytest.raises(NanoMedusaError, match=r"max_new_tokens must be a whole number of at least 0, not "
                                                  r"(3\.5|True);"):
            run()
    for top_k in (2.5, True, "2"):
        with pytest.raises(NanoMedusaError, match=re.escape("a whole number top_k >= 0")):
            Sampling(1.0, top_k)
    with pytest.raises(NanoMedusaError, match=re.escape("Medusa heads need num_heads to be a whole number of at least "
                                                        "1, not 0.")):
        MedusaHeads.from_base(model, num_heads=0)
    with pytest.raises(NanoMedusaError, match="Medusa heads need num_layers to be a whole number of at least 0, "
                                              "not -1"):
        MedusaHeads.from_base(model, num_layers=-1)
    with pytest.raises(NanoMedusaError, match=re.escape("medusa_temperatures must be 2 positive numbers, one per head, "
                                                        "not [1.0, 0.0]")):
        HeadsConfig(2, 1, 64, 97, medusa_temperatures=[1.0, 0.0])
    shared = MedusaHeads.from_base(model, num_heads=2, shared_lm_head=True)
    for run in (lambda: shared.topk(torch.randn(1, 64), 3), lambda: shared(torch.randn(1, 64))):
        with pytest.raises(NanoMedusaError, match=re.escape("these heads share the base model's lm_head "
                                                            "(shared_lm_head): pass its weight, model.lm_head.weight, "
                                                            "as lm_head_weight.")):
            run()
    with pytest.raises(NanoMedusaError, match="the model to load is an empty string; pass a checkpoint directory"):
        load_model("", device="cpu")
    # Heads sharing the lm_head without ResBlocks save an empty file and load; heads whose config says they have
    # their own vocabulary projections must not load from an empty one.
    MedusaHeads.from_base(model, num_heads=2, num_layers=0, shared_lm_head=True).save(tmp_path)
    assert MedusaHeads.load(tmp_path, model.config).config.num_heads == 2
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "shared_lm_head": False}))
    with pytest.raises(NanoMedusaError, match="medusa_lm_head.safetensors holds no tensors; re-download or re-train"):
        MedusaHeads.load(tmp_path, model.config)


def test_trees_that_rank_more_guesses_than_the_vocabulary_holds(tmp_path):
    from nanomedusa.dynamic_tree import DynamicTree
    from nanomedusa.tree import PRESETS

    make_hf_checkpoint(tmp_path, vocab_size=8)
    model = load_model(tmp_path, device="cpu")[0]
    heads = MedusaHeads.from_base(model, num_heads=5).eval()
    with pytest.raises(NanoMedusaError, match=re.escape("the tree takes each head's top 10 guesses but the vocabulary "
                                                        "has only 8 tokens; use a tree whose ranks stay below 8.")):
        generate_medusa(Decoder(model), heads, TreeBuffers.from_choices(PRESETS["mc_sim_7b_63"]), [5, 6], 4)
    # Without measured accuracies the heads' dynamic tree assumed 10 ranks (torch's topk failed): the vocabulary's 8
    tree = DynamicTree.for_heads(heads.config, 12)
    assert tree.topk <= 8
    expected = generate(Decoder(model), [5, 6], 12).tokens
    assert generate_medusa(Decoder(model), heads, tree, [5, 6], 12).tokens == expected


def test_checkpoints_whose_config_and_weights_disagree_on_biases_and_ties(tmp_path, capsys):
    from safetensors.torch import load_file as read, save_file as write

    make_hf_checkpoint(tmp_path / "bias", attention_bias=True)
    config = json.loads((tmp_path / "bias" / "config.json").read_text())
    (tmp_path / "bias" / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    with pytest.raises(NanoMedusaError, match=re.escape("model.safetensors holds a bias, model.layers.0.self_attn."
                                                        "k_proj.bias, that the model config.json describes has none "
                                                        "of; set attention_bias (or mlp_bias) true in config.json.")):
        load_model(tmp_path / "bias", device="cpu")
    make_hf_checkpoint(tmp_path / "tied")  # untied: its lm_head differs from the embeddings
    capsys.readouterr()
    model = load_model(tmp_path / "tied", device="cpu")[0]
    assert capsys.readouterr().err == ""
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tied = load_model(tmp_path / "tied", device="cpu")[0]
    assert "sets tie_word_embeddings but the weights hold an lm_head.weight unlike the embeddings; using the " \
           "embeddings, as the config says" in capsys.readouterr().err
    assert torch.equal(tied.lm_head.weight, model.tok_embeddings.weight)
    weights = read(str(tmp_path / "tied" / "model.safetensors"))  # one saved with both, equal: nothing to say
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    write(weights, str(tmp_path / "tied" / "model.safetensors"))
    load_model(tmp_path / "tied", device="cpu")
    assert capsys.readouterr().err == ""
    # one saved with the tied matrix under lm_head.weight only (as some exporters do) was refused as incomplete
    weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    write(weights, str(tmp_path / "tied" / "model.safetensors"))
    assert torch.equal(load_model(tmp_path / "tied", device="cpu")[0].tok_embeddings.weight, tied.tok_embeddings.weight)


def test_load_model_checks_torch_devices_and_dtypes_as_it_checks_their_names(ckpt):
    if not torch.cuda.is_available():
        with pytest.raises(NanoMedusaError, match="device 'cuda' was asked for but this machine has no CUDA GPU"):
            load_model(ckpt, device=torch.device("cuda"))
    with pytest.raises(NanoMedusaError, match="unknown dtype 'torch.int8'; use one of auto, float32"):
        load_model(ckpt, device="cpu", dtype=torch.int8)
    assert load_model(ckpt, device=torch.device("cpu"), dtype=torch.float16)[0].dtype == torch.float16


@pytest.mark.parametrize("budget", [0, 8.5, "8"])
def test_dynamic_tree_budgets_that_are_not_node_counts(tiny, budget):
    from nanomedusa.dynamic_tree import DynamicTree

    heads = tiny[2]
    expected = (f"a dynamic tree's node budget is a whole number of at least 1, not {budget!r}; pass a node "
                f"budget (--tree-nodes) of 1 or more")
    with pytest.raises(NanoMedusaError, match=re.escape(expected)):
        DynamicTree.for_heads(heads.config, budget)


def test_tree_attention_of_queries_that_are_not_four_dimensional():
    from kernels.errors import KernelInputError
    from kernels.tree_attention import tree_attention_triton

    k = v = torch.randn(1, 2, 12, 16)
    with pytest.raises(KernelInputError, match=re.escape("tree attention takes q [B, Hq, T, D] and caches "
                                                         "[B, Hkv, S, D], not (4, 3, 16) and (1, 2, 12, 16)")):
        tree_attention_triton(torch.randn(4, 3, 16), k, v, 5, None)

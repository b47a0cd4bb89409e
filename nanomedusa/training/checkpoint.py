"""What training writes: a resumable state, and the outputs the engine loads.

    OUT/checkpoint/state.pt  trainable weights (frozen ones are re-read from --model), AdamW state,
                             step, RNG states and the settings a resumed run must share
    OUT/heads/               the heads, in `MedusaHeads.save` format (generate.py --medusa OUT/heads);
                             after joint training with LoRA (or warm-up from heads that had one) also
                             the adapter (`nanomedusa/adapter.py`), which loading the heads merges into
                             the base model
    OUT/model/               full joint training only: the fine-tuned base model as a full Hugging Face
                             checkpoint directory (config, model.safetensors, tokenizer files)
    OUT/eval.json, log.jsonl, train_config.json   the held-out evaluation, the training log, the settings

The checkpoint is for a run that stops before its last step; one that ends well removes it, as its outputs are
OUT/heads (and OUT/model), and training on from them starts a new run (--heads OUT/heads). A new run refuses an
--out that holds an earlier run's results unless told to replace them (--overwrite), so no heads are mixed with an
older run's model or evaluation.

State dicts go through `torch.distributed.checkpoint.state_dict`, which gives full (unsharded,
un-prefixed) tensors whether the module is plain, DDP-wrapped or FSDP-sharded; every process takes
part in gathering them and only rank 0 writes. The learning rate is a function of the step, and the
data order a function of (seed, step), so the step is all the scheduler and data loader need.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..adapter import ADAPTER_FILE, save_adapter
from ..errors import NanoMedusaError
from ..files import write_atomically
from ..heads import HeadsConfig, MedusaHeads
from ..loading import save_hf_weights
from ..model import Transformer
from .lora import adapter_state, merge_lora_state

TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# What training writes into OUT (True: a directory), and of those the results an earlier run leaves.
OUTPUTS = {"checkpoint": True, "heads": True, "model": True, "eval.json": False, "log.jsonl": False,
           "train_config.json": False}
RESULTS = ("heads", "model", "eval.json")

# Settings that checkpoints from before they were recorded lack: compared only where a checkpoint has them; and
# those whose value then is known (before the split could be chosen, it was by position).
OPTIMIZATION = ("lr", "weight_decay", "warmup_steps", "grad_clip", "head_decay")
JOINT_OPTIMIZATION = ("backbone_lr", "medusa_weight", "medusa_weight_warmup")
RECORDED_LATER = ("lora_alpha", "chat_format", *OPTIMIZATION, *JOINT_OPTIMIZATION)
RECORDED_LATER_AS = {"split": "position"}


def state_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoint" / "state.pt"


def earlier_results(out_dir: str | Path) -> list[str]:
    """The results of an earlier run in OUT (its heads, model, evaluation), as names to show."""
    return [name + "/" * OUTPUTS[name] for name in RESULTS if (Path(out_dir) / name).exists()]


def output_holding(out_dir: str | Path, path: str | Path) -> Path | None:
    """The output folder of OUT (heads, model, checkpoint) that `path` is or lies in, if any."""
    path = Path(path).resolve()
    for name, is_dir in OUTPUTS.items():
        folder = (Path(out_dir) / name).resolve()
        if is_dir and (path == folder or folder in path.parents):
            return Path(out_dir) / name
    return None


def clear_outputs(out_dir: str | Path) -> None:
    """Remove what an earlier run wrote into OUT (only that: OUT may hold other files, --cache-hidden's folder)."""
    for name, is_dir in OUTPUTS.items():
        path = Path(out_dir) / name
        if is_dir and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:  # a file, or a link (to a folder of someone else's: the link goes, not what it points to)
            path.unlink(missing_ok=True)


def remove_state(out_dir: str | Path) -> None:
    """Drop OUT/checkpoint once a run has ended well: resuming it could only redo the steps after it."""
    shutil.rmtree(state_path(out_dir).parent, ignore_errors=True)


def save_state(out_dir, wrapped: nn.Module, optimizer, step: int, settings: dict, is_main: bool) -> None:
    model_state, optim_state = get_state_dict(wrapped, optimizer, options=TRAINABLE)
    if not is_main:
        return
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    path = state_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model_state, "optim": optim_state, "rng": rng, "settings": settings}
    write_atomically(path, lambda tmp: torch.save(state, tmp))  # an interruption keeps the previous checkpoint


def load_state(out_dir, wrapped: nn.Module, optimizer, settings: dict) -> int:
    """Restore weights, optimizer and RNG from OUT/checkpoint; returns the step to continue from."""
    path = state_path(out_dir)
    if not path.is_file() and (Path(out_dir) / "heads" / "config.json").is_file():
        raise NanoMedusaError(f"the run in {out_dir} has finished (its heads are {Path(out_dir) / 'heads'}), so there "
                              f"is nothing to resume; train on from them with --heads {Path(out_dir) / 'heads'} and "
                              f"another --out, or replace --resume with --overwrite to train again.")
    if not path.is_file():
        raise NanoMedusaError(f"there is no checkpoint at {path} to resume from; drop --resume to start a new run.")
    state = _read_state(path)
    saved = state["settings"]
    # Over both runs' keys: a setting recorded only when it is on (reads_path) must not be dropped unnoticed.
    for key in sorted(saved.keys() | settings.keys()):
        if key in RECORDED_LATER and key not in saved:
            continue
        if (theirs := saved.get(key, RECORDED_LATER_AS.get(key))) != settings.get(key):
            flag = f" (--split {theirs})" if key == "split" else ""  # (the one a run may not know it must pass)
            raise NanoMedusaError(f"the checkpoint in {out_dir} was made with {key}={theirs!r} but this run "
                                  f"has {settings.get(key)!r}; resume with the same settings{flag} or choose another "
                                  f"--out.")
    set_state_dict(wrapped, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["step"]


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if {"step", "model", "optim", "rng", "settings"} - set(state):
            raise KeyError
    except Exception:  # torch.load raises many kinds of errors on a damaged file
        raise NanoMedusaError(f"{path} is damaged or not a training checkpoint; delete it to start over, "
                              f"or choose another --out.") from None
    return state


def truncate_log(path: Path, step: int) -> None:
    """Cut OUT/log.jsonl back to the records of steps <= step (and any torn last line), in place:
    a run resumed from the checkpoint of `step` logs the later steps again, a new run (step 0) starts afresh."""
    if not path.is_file():
        return
    keep = 0  # bytes of whole records up to `step`
    with open(path, "rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n") or json.loads(line)["step"] > step:
                    break
            except (ValueError, KeyError, TypeError):
                break
            keep += len(line)
    os.truncate(path, keep)


def export(out_dir, wrapped: nn.Module, heads_config: HeadsConfig, ckpt_dir: Path, with_model: bool,
           lora_scale: float, is_main: bool, adapter_from: Path | None = None) -> None:
    """Write OUT/heads (with the LoRA adapter if `heads_config.lora`: the one trained, or, from a warm-up on a
    backbone adapted by `adapter_from`'s adapter, that one unchanged), and OUT/model if `with_model` and the whole
    backbone was trained, from the live, maybe sharded, module."""
    with_model = with_model and not heads_config.lora  # an adapter ships in OUT/heads, not as a model copy
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not with_model)
    state = get_model_state_dict(wrapped, options=options)
    if not is_main:
        return
    out_dir = Path(out_dir)
    heads = MedusaHeads(heads_config)
    heads.load_state_dict(_strip(state, "heads."))
    heads.save(out_dir / "heads")
    if adapter_from is not None:
        shutil.copy(Path(adapter_from) / ADAPTER_FILE, out_dir / "heads" / ADAPTER_FILE)
    elif heads_config.lora:
        save_adapter(adapter_state(_strip(state, "model.")), out_dir / "heads")
    else:  # an earlier run's adapter left in OUT/heads would be merged into a backbone these heads never read
        (out_dir / "heads" / ADAPTER_FILE).unlink(missing_ok=True)
    if with_model:
        model_state = merge_lora_state(_strip(state, "model."), lora_scale)
        save_model_dir(model_state, ckpt_dir, out_dir / "model")


def save_model_dir(model_state: dict[str, torch.Tensor], ckpt_dir: Path, out: Path) -> None:
    """A full checkpoint directory: our weights as model.safetensors plus the original's other files."""
    from ..config import ModelConfig

    config = ModelConfig.from_json(ckpt_dir / "config.json")
    if config.tie_word_embeddings:
        model_state.setdefault("lm_head.weight", model_state["tok_embeddings.weight"])
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(model_state, assign=True)
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt_dir.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    save_hf_weights(model, out)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

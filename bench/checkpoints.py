"""What the decoding benchmarks run: the --heads checkpoints, the backbone each goes with, and their trees.

A --heads argument is `[LABEL=]HEADS_DIR[@MODEL_DIR]`. Heads from joint training (Medusa-2) go with their
fine-tuned backbone: MODEL_DIR, or else, for heads in a folder named `heads`, a `model/` directory beside it
(train.py writes OUT/heads and OUT/model) unless that is --model itself, or the base model with the LoRA adapter
HEADS_DIR ships (`nanomedusa/adapter.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanomedusa.adapter import apply_adapter, has_adapter
from nanomedusa.errors import NanoMedusaError
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.model import Transformer
from nanomedusa.tokenizer import Tokenizer, load_tokenizer
from nanomedusa.tree import PRESETS, cut_to_depth, parse_tree
from weights import SHIPPED_HEADS

from .report import say

DEFAULT_TREES = ("own", "chain4", "mc_sim_7b_63")  # "own": the heads' config.json medusa_choices
BASE = "base"  # label of the --model backbone


@dataclass
class HeadsSpec:
    label: str
    heads_dir: Path
    model_dir: Path | None  # the backbone these heads go with (Medusa-2); None: --model


def parse_heads_spec(text: str) -> HeadsSpec:
    """`[LABEL=]HEADS_DIR[@MODEL_DIR]`; without @MODEL_DIR, heads in train.py's OUT/heads go with a model in
    OUT/model where there is one (full joint training's backbone)."""
    label, has_label, rest = text.partition("=")
    if not has_label:
        label, rest = "", text
    heads, has_model, model = rest.partition("@")
    heads_dir = Path(heads).expanduser()
    if not heads or (has_model and not model) or (has_label and not label):
        raise NanoMedusaError(f"--heads {text!r} is malformed; write [LABEL=]HEADS_DIR[@MODEL_DIR].")
    resolved = heads_dir.resolve()
    if has_model:
        model_dir = Path(model).expanduser()
    else:
        sibling = resolved.parent / "model"  # train.py's OUT/model beside OUT/heads
        model_dir = sibling if resolved.name == "heads" and (sibling / "config.json").is_file() else None
    default_label = resolved.parent.name if resolved.name == "heads" else resolved.name  # train.py's OUT/heads: OUT
    return HeadsSpec(label or default_label, heads_dir, model_dir)


def heads_specs(args) -> list[HeadsSpec]:
    """The --heads to run (default: the shipped heads of the default model), checked before anything slow
    starts, and the --tree arguments with them."""
    specs = [parse_heads_spec(h) for h in args.heads]
    if args.model is not None:  # a backbone that is --model itself is no backbone of the heads' own
        model = Path(args.model).expanduser().resolve()
        specs = [replace(s, model_dir=None) if s.model_dir and s.model_dir.resolve() == model else s for s in specs]
    if not specs and args.model is None and (SHIPPED_HEADS / "config.json").is_file():
        specs = [HeadsSpec("shipped", SHIPPED_HEADS, None)]
    labels = [s.label for s in specs]
    for spec in specs:
        if labels.count(spec.label) > 1:
            raise NanoMedusaError(f"two --heads are both labelled {spec.label!r}; "
                                  f"name them apart with LABEL=HEADS_DIR.")
        for kind, path in (("heads", spec.heads_dir), ("model", spec.model_dir)):
            if path is not None and not path.is_dir():
                raise NanoMedusaError(f"{kind} directory {path} of --heads {spec.label} does not exist; fix the path.")
    for spec in args.tree:
        if spec != "own":
            parse_tree(spec)  # a typo fails now, not after the first backbone's runs
    return specs


def trees_for(heads: MedusaHeads, tree_args: list[str]) -> list[tuple[str, list[list[int]]]]:
    """(label, paths) of each tree to run with these heads, paths deeper than the heads cut off."""
    depth = heads.config.num_heads
    out, seen = [], set()
    for i, spec in enumerate(tree_args or DEFAULT_TREES):
        if spec == "own":
            if not heads.config.medusa_choices:
                continue
            label, paths = "own", parse_tree(heads.config.medusa_choices)
        else:
            paths = parse_tree(spec)
            label = spec if spec in PRESETS else Path(spec).stem if spec.endswith(".json") else f"tree{i}"
        cut = cut_to_depth(paths, depth)
        if len(cut) < len(paths):
            label = f"{label}<={depth}"
        key = tree_key(cut)
        if cut and key not in seen:  # the heads' own tree may well be one of the others
            seen.add(key)
            out.append((label, cut))
    return out


def tree_key(paths) -> tuple:
    """The same tree, whatever the order of its paths."""
    return tuple(sorted(tuple(p) for p in paths))


def spec_backbone(spec: HeadsSpec) -> str:
    """The label of the backbone a heads checkpoint runs on."""
    if spec.model_dir is None:
        return f"{BASE}+{spec.label} adapter" if has_adapter(spec.heads_dir) else BASE
    path = spec.model_dir.resolve()
    return f"{path.parent.name}/{path.name}"


def load_backbone(label: str, owner: HeadsSpec | None, args, device, dtype):
    """-> (model, checkpoint dir): --model, or the backbone the heads `owner` were trained with."""
    model_dir = owner.model_dir if owner else None
    say(f"[load] {label}: {model_dir or args.model or 'the default model'} on {device} in {dtype}")
    model, ckpt = load_model(model_dir if model_dir is not None else args.model, device, dtype)
    if owner and model_dir is None and has_adapter(owner.heads_dir):
        say(f"[load] {apply_adapter(model, owner.heads_dir)}")
    return model, ckpt


def first_heads(args, device, dtype, why: str) -> tuple[HeadsSpec, Transformer, MedusaHeads, Tokenizer]:
    """The first --heads on its backbone, for a part of bench.decode that needs heads (`why` it does, for the
    error), with the tokenizer in --chat-format's format."""
    specs = heads_specs(args)
    if not specs:
        raise NanoMedusaError(f"{why}; pass --heads HEADS_DIR.")
    spec = specs[0]
    model, ckpt = load_backbone(spec_backbone(spec), spec, args, device, dtype)
    heads = MedusaHeads.load(spec.heads_dir, model.config, device=model.device, dtype=model.dtype)
    return spec, model, heads, load_tokenizer(ckpt, args.chat_format)


def free_memory(device: torch.device) -> None:
    """Give a dropped model's memory back to the device, for the next part's model."""
    if device.type == "cuda":
        torch.cuda.empty_cache()

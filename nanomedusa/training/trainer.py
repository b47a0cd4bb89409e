"""The training loop for Medusa heads: warm-up (Medusa-1) and joint training (Medusa-2).

    trainer = Trainer(TrainConfig(stage="warmup", model=None, data="answers.jsonl", out="out"))
    results = trainer.run()   # -> the eval dict also written to OUT/eval.json

* warmup: the backbone is frozen (no gradients, run under no_grad, bf16 on GPU); only the heads learn,
  on loss = sum_k head_decay^k * CE(head_k(h_t), token_{t+k+2}). Heads that read their path (--reads-path)
  get the answer's own tokens t+1 .. t+k+1 (teacher forcing: what a tree's accepted path holds). From --heads that
  ship a backbone adapter (Medusa-2's), the frozen backbone is the adapted one they read, and the adapter ships on.
* joint: backbone and heads learn together on loss = L_lm + w * L_medusa, with w ramped from 0 to
  --medusa-weight, the backbone at a much smaller learning rate than the heads (two AdamW groups),
  and optionally through LoRA adapters instead of all weights. This changes the base model: the
  result is OUT/model, which must then be served together with OUT/heads (with LoRA: the adapter in
  OUT/heads). From heads that ship an adapter, full joint training starts from the adapted backbone and
  OUT/model has it merged in; LoRA joint training is refused there (it would stack a second adapter).
  Its trained weights are never float16 (AdamW's state underflows there: NaN after a step).

Each optimizer step: grad_accum micro-batches per process, bf16 autocast on GPU, grad clipping,
cosine learning rate with linear warm-up. Logs (rank 0) go to the terminal and OUT/log.jsonl, which a run
that does not resume starts afresh; a logged loss that is not finite stops the run on every rank (a window is
also logged at each checkpoint, so none is written before the loss that led to it was checked). The checkpoint
(every save_every steps) lets an interrupted run continue (resume); a run that ends well removes it. An OUT that
holds an earlier run's results is refused unless `overwrite` replaces them (checkpoint.py).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import kernels

from ..adapter import apply_adapter, has_adapter
from ..config import ModelConfig
from ..errors import NanoMedusaError
from ..heads import MedusaHeads, base_model_note, recorded_held_out
from ..loading import DTYPES, load_model, resolve_checkpoint
from ..tokenizer import load_tokenizer
from . import checkpoint
from .data import (IGNORE, MERGED_REASON, SPLITS, StepSampler, collate, eval_batches, example_length, held_out_split,
                   held_out_split_notes, load_conversations, mix_examples, tokenize_all, train_eval_split)
from .distributed import all_reduce_sum, gradient_sync, init_distributed, wrap
from .hidden_cache import HiddenCache, backbone_key, fingerprint
from .lora import add_lora
from .losses import row_weights, shifted_targets, summarize, token_stats, weighted_loss
from .medusa_lm import MedusaLM

STAGES = ("warmup", "joint")


@contextmanager
def kernel_backend(name: str):
    previous = kernels.get_backend()
    kernels.set_backend(name)
    try:
        yield
    finally:
        kernels.set_backend(previous)


@dataclass
class TrainConfig:
    stage: str = "warmup"
    model: str | None = None  # None: the project's default model
    data: str | list[str] = ""  # one file, or several trained as a mix weighted by data_weights
    data_weights: list[float] | None = None  # per data file (default 1 each): repeat (> 1) or thin (< 1)
    out: str = "out"
    heads: str | None = None  # heads to start from (required for joint: the warm-up's OUT/heads)
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = False
    reads_path: bool = False  # heads also read the tokens before their target (heads.py); adds them to --heads
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-3  # heads
    backbone_lr: float = 2e-5  # joint only
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    head_decay: float = 0.8
    medusa_weight: float = 0.2  # joint: weight of the heads' loss next to the LM loss
    medusa_weight_warmup: int = 100  # joint: steps over which that weight ramps up from 0
    lora_rank: int = 0  # joint: 0 = full fine-tuning
    lora_alpha: float = 16.0
    max_len: int = 1024
    cache_hidden: str | None = None  # warmup: directory for the frozen backbone's hidden states
    eval_fraction: float | None = None  # held-out share; None: --heads' own, else data.EVAL_FRACTION
    split: str | None = None  # how each file's held-out share is chosen (data.py SPLITS); None: --heads' own, else id
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 0  # 0: evaluate only at the end
    seed: int | None = None  # the held-out split, data order and new weights; None: --heads' own, else 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 frozen backbone on GPU for warm-up, float32 weights otherwise
    chat_format: str = "auto"  # a chat_template.PRESETS name, or auto: the one the checkpoint's template matches
    resume: bool = False
    overwrite: bool = False  # replace an earlier run's outputs in OUT (otherwise refused)

    def check(self) -> None:
        if self.stage not in STAGES:
            raise NanoMedusaError(f"unknown stage {self.stage!r}; use one of warmup, joint, distill.")
        if self.resume and self.overwrite:
            raise NanoMedusaError("--resume continues the run in --out and --overwrite starts it again; pass one.")
        if self.stage == "joint" and not self.heads:
            raise NanoMedusaError("joint training starts from warm-up heads; pass --heads OUT/heads from a --stage "
                                  "warmup run.")
        if self.stage == "warmup" and (given := self._changed(JOINT_ONLY)):
            raise NanoMedusaError(f"{given[0]} only applies to --stage joint (warm-up trains the heads alone, on a "
                                  f"frozen backbone); drop it.")
        if self.stage == "joint" and not self.lora_rank and (given := self._changed(("lora_alpha",))):
            raise NanoMedusaError(f"{given[0]} scales a LoRA adapter, and full joint training has none; add "
                                  f"--lora-rank, or drop it.")
        if self.heads and (given := self._changed(NEW_HEADS_ONLY)):
            raise NanoMedusaError(f"{given[0]} shapes new heads, and the heads in {self.heads} keep their own; drop "
                                  f"it, or drop --heads to train new heads.")
        if self.stage == "joint" and self.lora_rank and self.heads and has_adapter(self.heads):
            raise NanoMedusaError(f"the heads in {self.heads} already carry a LoRA adapter; continue with full joint "
                                  f"training (drop --lora-rank) or start LoRA joint training from warm-up heads.")
        # AdamW updates the weights in their own dtype, with no float32 copy: float16 turns to NaN in a step, and
        # bfloat16 rounds most updates at --backbone-lr away (a weight of 0.02 moves in steps of 1e-4), so the
        # backbone barely trains. A LoRA adapter is float32 whatever the backbone's dtype.
        half = DTYPES.get(self.dtype, self.dtype)
        if self.stage == "joint" and not self.lora_rank and half in (torch.float16, torch.bfloat16):
            name = str(half).removeprefix("torch.")
            raise NanoMedusaError(f"full joint training would update {name} weights, which AdamW turns to NaN "
                                  f"(float16) or rounds most updates of (bfloat16) away; pass --dtype float32, or "
                                  f"add --lora-rank to train a float32 adapter on the {name} backbone.")
        if self.stage == "joint" and self.cache_hidden:
            raise NanoMedusaError("--cache-hidden only applies to --stage warmup (joint training changes the hidden "
                                  "states); drop it.")
        positive = {"--num-heads": self.num_heads, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                    "--max-len": self.max_len, "--epochs": self.epochs, "--log-every": self.log_every}
        for flag, value in positive.items():
            if value < 1:
                raise NanoMedusaError(f"{flag} must be at least 1, got {value}.")
        if self.split not in (None, *SPLITS):
            raise NanoMedusaError(f"unknown split {self.split!r}; use one of {', '.join(SPLITS)}.")
        if self.eval_fraction is not None and not 0 <= self.eval_fraction < 1:
            raise NanoMedusaError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.data_weights is not None and len(self.data_weights) != len(self.data_files):
            raise NanoMedusaError(f"--data-weights gives {len(self.data_weights)} weights for {len(self.data_files)} "
                                  f"--data files; give one weight per file.")
        if self.data_weights is not None and not all(w > 0 for w in self.data_weights):
            raise NanoMedusaError(f"--data-weights must all be positive, got {self.data_weights}.")
        if self.stage == "warmup" and not self.heads and self.shared_lm_head and self.num_layers == 0 \
                and not self.reads_path:
            raise NanoMedusaError(NOTHING_TO_TRAIN)

    def _changed(self, names: tuple[str, ...]) -> list[str]:
        """The settings among `names` that differ from their defaults, spelled as train.py's flags."""
        fields = self.__dataclass_fields__
        return ["--" + name.replace("_", "-") for name in names if getattr(self, name) != fields[name].default]

    @property
    def data_files(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)


# Settings that only joint training reads, and those that only shape new heads (not --heads given).
JOINT_ONLY = ("lora_rank", "lora_alpha", "backbone_lr", "medusa_weight", "medusa_weight_warmup")
NEW_HEADS_ONLY = ("num_heads", "num_layers", "shared_lm_head")
NOTHING_TO_TRAIN = ("heads without ResBlocks that share the lm_head have no weights of their own to train; pass "
                    "--num-layers 1 or more, or drop --shared-lm-head.")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.check()
        # Heads trained on further hold out what they held out before (their record), unless told otherwise.
        recorded = recorded_held_out(cfg.heads) if cfg.heads else None
        eval_fraction, seed, split = held_out_split(recorded, cfg.eval_fraction, cfg.seed, cfg.split,
                                                    reads_heads=bool(cfg.heads))
        self.cfg = cfg = replace(cfg, eval_fraction=eval_fraction, seed=seed, split=split)
        self.joint = cfg.stage == "joint"
        self.dist = init_distributed(cfg.device)
        self.device = self.dist.device
        self.out = Path(cfg.out)
        if checkpoint.state_path(self.out).exists() and not (cfg.resume or cfg.overwrite):
            raise NanoMedusaError(f"{self.out} already holds a training checkpoint; pass --resume to continue it, "
                                  f"--overwrite to start again, or choose another --out.")
        if (earlier := checkpoint.earlier_results(self.out)) and not (cfg.resume or cfg.overwrite):
            raise NanoMedusaError(f"{self.out} holds an earlier run's {', '.join(earlier)}; pass --overwrite to "
                                  f"replace them or choose another --out.")
        torch.manual_seed(cfg.seed)  # same on every rank: fresh heads and LoRA start identical everywhere

        sources = [load_conversations(path) for path in cfg.data_files]  # bad data fails before the model is loaded
        self.ckpt_dir = resolve_checkpoint(cfg.model)
        if cfg.overwrite:  # (which removes OUT's heads, model and checkpoint before anything is read from them)
            inputs = {"--heads": cfg.heads, "--model": self.ckpt_dir, "--cache-hidden": cfg.cache_hidden}
            for flag, path in inputs.items():
                if path and (inside := checkpoint.output_holding(self.out, path)):
                    raise NanoMedusaError(f"{flag} {path} is or lies in {inside}, which --overwrite removes before "
                                          f"this run reads it; move it out of --out, or choose another --out.")
        self.tokenizer = load_tokenizer(self.ckpt_dir, cfg.chat_format, note=self.dist.is_main)
        self.train_set, self.eval_set = self._tokenize(sources)
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" and not self.joint else "float32"
        model, _ = load_model(self.ckpt_dir, self.device, dtype)
        # Heads that ship a backbone adapter (Medusa-2's) read the adapted backbone, so it is what they train on.
        # Warm-up keeps it frozen and ships the adapter on with the heads; full joint training trains it whole and
        # exports it as OUT/model (LoRA joint training from such heads is refused by TrainConfig.check).
        adapted = cfg.heads and has_adapter(cfg.heads)
        if adapted:
            self._print(apply_adapter(model, cfg.heads))
        self.adapter_from = Path(cfg.heads) if adapted and not self.joint else None
        self.hidden_cache = None
        if cfg.cache_hidden:
            backbone = backbone_key(self.ckpt_dir, self.adapter_from)
            self.hidden_cache = HiddenCache(cfg.cache_hidden, fingerprint(backbone, model.dtype, self.train_set))

        heads = self._make_heads(model)
        model.requires_grad_(self.joint and not cfg.lora_rank)
        if cfg.lora_rank:
            add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        self.module = MedusaLM(model, heads, train_backbone=self.joint)
        if not any(p.requires_grad for p in self.module.parameters()):  # (before DDP, which would refuse it with a
            # traceback on every rank; TrainConfig.check refused fresh heads of this kind before the model loaded)
            raise NanoMedusaError(f"the heads in {cfg.heads} have no ResBlocks and share the lm_head, so warm-up has "
                                  f"nothing of theirs to train; add --reads-path, or train new heads without --heads.")
        self.wrapped = wrap(self.module, self.dist, shard=self.joint)
        self.optimizer, self.base_lrs = self._make_optimizer()
        self.autocast = self.device.type == "cuda" or model.dtype != torch.float32
        # Autocast over float32 weights mixes dtypes inside a block (bf16 matmul outputs, float32
        # residual stream); the Triton kernels (used under no_grad) refuse that, the references do not.
        self.kernel_backend = "torch" if self.autocast and model.dtype == torch.float32 else kernels.get_backend()
        self.sampler = StepSampler(len(self.train_set), cfg.batch_size, cfg.grad_accum, self.dist.world, self.dist.rank,
                                   cfg.seed)
        self.total_steps = cfg.max_steps or cfg.epochs * self.sampler.steps_per_epoch
        # (flag, its steps, the step (from 0) whose value is the full one: lr_scale's and weights')
        ramps = [("--warmup-steps", cfg.warmup_steps, cfg.warmup_steps - 1, "the learning rate never reaches --lr")]
        if self.joint:
            ramps.append(("--medusa-weight-warmup", cfg.medusa_weight_warmup, cfg.medusa_weight_warmup,
                          "the heads' loss never gets its full --medusa-weight"))
        for flag, steps, full_at, effect in ramps:
            if full_at >= self.total_steps:
                self._print(f"[note] {flag} {steps} is longer than this run of {self.total_steps} steps, so {effect}; "
                            f"lower it.")
        self.start_step = (checkpoint.load_state(self.out, self.wrapped, self.optimizer, self._settings())
                           if cfg.resume else 0)
        if self.dist.is_main and cfg.overwrite:
            checkpoint.clear_outputs(self.out)
        if self.dist.is_main:  # a resumed run logs its later steps again, a new one starts the log afresh (step 0)
            checkpoint.truncate_log(self.out / "log.jsonl", self.start_step)

    # ----- setup -------------------------------------------------------------------------------

    def _tokenize(self, sources):
        """-> (training examples of the weighted mix, held-out examples of every file)."""
        cfg = self.cfg
        trains, held_out = [], []
        context = ModelConfig.from_json(self.ckpt_dir / "config.json").max_position_embeddings
        max_len = example_length(cfg.max_len, context, self._print)
        for path, conversations in zip(cfg.data_files, sources):
            # Each file split on its own, as tree_tuning.py splits it, so its held-out part stays unseen.
            train_c, eval_c = train_eval_split(conversations, cfg.eval_fraction, cfg.seed, cfg.split)
            if not train_c:
                raise NanoMedusaError(f"{path} has no conversation with an assistant answer to train on; "
                                      f"answer its prompts first with --stage distill.")
            left_out = Counter()
            train = tokenize_all(self.tokenizer, train_c, max_len, progress=self.dist.is_main, left_out=left_out)
            if not train and not left_out["cut"]:  # every one merged (a template whose answers always do)
                raise NanoMedusaError(f"no training conversation of {path} can be used: each has {MERGED_REASON}; "
                                      f"train with a ChatML-style model.")
            if not train:
                raise NanoMedusaError(f"no training example of {path} keeps an answer token within its first {max_len} "
                                      f"tokens; raise --max-len (at most the model's context).")
            weight = cfg.data_weights[len(trains)] if cfg.data_weights else 1.0
            if weight < 1 and round(weight * len(train)) == 0:  # (mix_examples would keep none of them)
                raise NanoMedusaError(f"--data-weights {weight:g} keeps none of the {len(train)} training examples of "
                                      f"{path}; give it a weight of {1 / len(train):.2g} or more, or drop the file.")
            trains.append(train)
            held_out += tokenize_all(self.tokenizer, eval_c, max_len, left_out=left_out)
            unanswered = len(conversations) - len(train_c) - len(eval_c)
            self._note_dropped(path, len(conversations), unanswered, left_out, max_len)
        return mix_examples(trains, cfg.data_weights or [1.0] * len(trains), cfg.seed), held_out

    def _note_dropped(self, path: str, total: int, unanswered: int, left_out: Counter, max_len: int) -> None:
        """Say how many of a file's conversations neither train nor count in the evaluation, and why."""
        def have(n: int) -> str:
            return f"{n} {'has' if n == 1 else 'have'}"

        reasons = [f"{have(unanswered)} no answer yet (answer them with --stage distill)"] if unanswered else []
        if cut := left_out["cut"]:
            reasons.append(f"{have(cut)} no answer token within the first {max_len} tokens (--max-len)")
        if merged := left_out["merged"]:
            reasons.append(f"{have(merged)} {MERGED_REASON}")
        if reasons:
            listed = ", ".join(reasons[:-1]) + " and " + reasons[-1] if len(reasons) > 1 else reasons[0]
            self._print(f"[note] {path}: of its {total} conversations, {listed}; they are left out.")

    def _make_heads(self, model) -> MedusaHeads:
        cfg = self.cfg
        if cfg.heads:  # joint training always, warm-up when it continues from earlier heads
            heads = MedusaHeads.load(cfg.heads, model.config, self.device, torch.float32)
            if note := base_model_note(cfg.heads, heads.config.base_model, self.ckpt_dir):
                self._print(f"[note] {note}.")
            # Trained before on another split of these files, they were trained on some of this run's held-out ones
            # (the heads exported here record this run's split only).
            for note in held_out_split_notes(heads.config.held_out, cfg.eval_fraction, cfg.seed,
                                             self.tokenizer.chat.preset, cfg.split):
                self._print(f"[note] {note}.")
            # Measured on the loaded weights, they would not describe the trained ones: refit after training.
            heads.config = replace(heads.config, rank_accuracy=None, medusa_temperatures=None)
            if cfg.reads_path:
                heads = heads.with_path_reading().to(self.device)
        else:
            heads = MedusaHeads.from_base(model, cfg.num_heads, cfg.num_layers, cfg.shared_lm_head,
                                          base_model=self._base_model_name(), reads_path=cfg.reads_path).float()
        return heads.train()

    def _base_model_name(self) -> str:
        """The --model new heads are for, as their config names it: a local one by its absolute path, so that
        heads.base_model_note finds it from any directory; a hub id as it is."""
        model = Path(self.cfg.model or self.ckpt_dir).expanduser()
        return str(model.resolve()) if model.exists() else str(self.cfg.model)

    def _make_optimizer(self):
        # Parameters as the wrapped module holds them (FSDP swaps in sharded ones), grouped by owner.
        head_params = [p for p in self.module.heads.parameters() if p.requires_grad]
        backbone_params = [p for p in self.module.model.parameters() if p.requires_grad]
        groups = [(head_params, self.cfg.lr), (backbone_params, self.cfg.backbone_lr)]
        groups = [(params, lr) for params, lr in groups if params]
        optimizer = torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups], weight_decay=self.cfg.weight_decay)
        return optimizer, [lr for _, lr in groups]

    def _settings(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        cfg = self.cfg
        heads = self.module.heads.config
        return {"stage": cfg.stage, "model": cfg.model, "data": cfg.data_files, "data_weights": cfg.data_weights,
                "heads": cfg.heads, "num_heads": heads.num_heads, "num_layers": heads.num_layers,
                "shared_lm_head": heads.shared_lm_head, "lora_rank": cfg.lora_rank,
                "global_batch": self.sampler.global_batch, "max_len": cfg.max_len, "seed": cfg.seed,
                "eval_fraction": cfg.eval_fraction, "split": cfg.split, "total_steps": self.total_steps,
                "chat_format": self.tokenizer.chat.preset,  # the prompts' format, given or found: the heads learn it
                # the schedule and the loss (the optimizer's own state would bring back the old weight decay alone)
                **{key: getattr(cfg, key) for key in checkpoint.OPTIMIZATION + (checkpoint.JOINT_OPTIMIZATION
                                                                                 if self.joint else ())},
                # only when they matter, so that checkpoints of runs without them still resume (and see
                # checkpoint.RECORDED_LATER for checkpoints from before lora_alpha was recorded)
                **({"reads_path": True} if heads.reads_path else {}),
                **({"lora_alpha": cfg.lora_alpha} if cfg.lora_rank else {})}

    @property
    def num_heads(self) -> int:
        return self.module.heads.config.num_heads

    # ----- schedules ---------------------------------------------------------------------------

    def lr_scale(self, step: int) -> float:
        """Linear warm-up to 1, then cosine decay toward 0, which the step after the last would reach."""
        warmup = self.cfg.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def weights(self, step: int) -> torch.Tensor:
        """[1 + K] loss weight of the lm_head and each head at `step`."""
        cfg = self.cfg
        if not self.joint:
            return row_weights(self.num_heads, cfg.head_decay, lm_weight=0.0, medusa_weight=1.0)
        ramp = min(1.0, step / cfg.medusa_weight_warmup) if cfg.medusa_weight_warmup > 0 else 1.0
        return row_weights(self.num_heads, cfg.head_decay, lm_weight=1.0, medusa_weight=cfg.medusa_weight * ramp)

    # ----- one forward -------------------------------------------------------------------------

    def forward_stats(self, batch, with_lm: bool, indices: list[int] | None = None):
        """-> summed cross-entropy [1 + K] (differentiable) and stats [1 + K, 4] for one micro-batch
        (`indices`: its training examples, which lets a hidden-state cache serve it)."""
        tokens = batch.tokens.to(self.device)
        targets = shifted_targets(batch.labels.to(self.device), self.num_heads)  # [1 + K, B, T]
        head_targets = targets[1:]
        head_mask = (head_targets != IGNORE).any(0)  # [B, T]
        lm_mask = targets[0] != IGNORE if with_lm else None
        with (torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),
              kernel_backend(self.kernel_backend)):
            hidden = None
            if self.hidden_cache is not None and indices is not None:
                lengths = [len(self.train_set[i].input_ids) for i in indices]
                hidden = self.hidden_cache.batch_hidden(indices, lengths, tokens, self.module.model.forward_hidden)
            head_logits, lm_logits = self.wrapped(tokens, head_mask, lm_mask, hidden)
        ce_heads, stats_heads = token_stats(head_logits, head_targets[:, head_mask])
        if lm_logits is None:
            ce_lm, stats_lm = ce_heads.new_zeros(1), stats_heads.new_zeros(1, 4)
        else:
            ce_lm, stats_lm = token_stats(lm_logits[None], targets[0][lm_mask][None])
        return torch.cat([ce_lm, ce_heads]), torch.cat([stats_lm, stats_heads])

    # ----- training ----------------------------------------------------------------------------

    def train_step(self, step: int) -> tuple[torch.Tensor, int]:
        """One optimizer step -> (stats [1 + K, 4] of this rank, input tokens this rank processed)."""
        cfg = self.cfg
        indices = self.sampler.micro_batches(step)
        micro = [[self.train_set[i] for i in idx] for idx in indices]
        batches = [collate(examples) for examples in micro]
        # Target counts over the global batch, so every micro-batch's loss is scaled the same way.
        counts = sum((shifted_targets(b.labels, self.num_heads) != IGNORE).flatten(1).sum(1) for b in batches)
        counts = all_reduce_sum(counts.to(self.device), self.dist)
        weights = self.weights(step).to(self.device)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.lr_scale(step)
        stats = torch.zeros(self.num_heads + 1, 4, device=self.device)
        for j, batch in enumerate(batches):
            with gradient_sync(self.wrapped, enabled=j == len(batches) - 1):
                ce, s = self.forward_stats(batch, with_lm=self.joint, indices=indices[j])
                # DDP/FSDP average gradients over processes; scaling by the world size turns that into
                # the sum over the global batch that `counts` normalises.
                (weighted_loss(ce, counts, weights) * self.dist.world).backward()
            stats += s
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, sum(len(e.input_ids) for examples in micro for e in examples)

    def run(self) -> dict:
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            self._print(f"{cfg.stage}: {len(self.train_set)} train / {len(self.eval_set)} eval examples, "
                        f"{self.total_steps} steps of {self.sampler.global_batch} examples, {self.num_heads} heads, "
                        f"{sum(p.numel() for g in self.optimizer.param_groups for p in g['params']):,} "
                        f"trainable parameters on {self.dist.world} x {self.device.type}")
        # Window sums since the last log line; `seconds` counts training steps only (not saving or eval).
        window, tokens, seconds = torch.zeros(self.num_heads + 1, 4, device=self.device), 0, 0.0
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=cfg.stage, disable=not main,
                   dynamic_ncols=True)
        for step in range(self.start_step, self.total_steps):
            started = time.perf_counter()
            stats, n = self.train_step(step)
            window, tokens, done = window + stats, tokens + n, step + 1
            seconds += time.perf_counter() - started
            bar.update(1)
            saving = cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps
            if done % cfg.log_every == 0 or done == self.total_steps or saving:  # (logging checks the loss first)
                self._log_window(done, window, tokens, seconds)
                window, tokens, seconds = torch.zeros_like(window), 0, 0.0
            if saving:
                self.save(done)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < self.total_steps:
                self._log_eval(done, self.evaluate())
        bar.close()
        results = self.evaluate()
        self._log_eval(self.total_steps, results)
        if main and self.eval_set:
            (self.out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        self.export()
        if main:
            checkpoint.remove_state(self.out)
        return results

    def save(self, step: int) -> None:
        checkpoint.save_state(self.out, self.wrapped, self.optimizer, step, self._settings(), self.dist.is_main)
        self.export(heads_only=True)

    def export(self, heads_only: bool = False) -> None:
        cfg = self.cfg
        heads_config = replace(self.module.heads.config, held_out={  # what tree tuning and calibration must match
            "eval_fraction": cfg.eval_fraction, "seed": cfg.seed, "chat_format": self.tokenizer.chat.preset,
            "split": cfg.split})
        if self.joint and self.cfg.lora_rank:  # the heads carry the backbone's adapter (nanomedusa/adapter.py)
            heads_config = replace(heads_config, lora={"rank": self.cfg.lora_rank, "alpha": self.cfg.lora_alpha})
        elif self.joint:  # the heads now belong to the fine-tuned model (any adapter merged in), not the original
            heads_config = replace(heads_config, base_model=str((self.out / "model").resolve()), lora=None)
        checkpoint.export(self.out, self.wrapped, heads_config, self.ckpt_dir, self.joint and not heads_only,
                          self.cfg.lora_alpha / max(1, self.cfg.lora_rank), self.dist.is_main, self.adapter_from)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Per-head (and lm_head) loss, top-1 and top-5 accuracy on the held-out split, over all ranks."""
        stats = torch.zeros(self.num_heads + 1, 4, device=self.device)
        batches = eval_batches(len(self.eval_set), self.cfg.batch_size, self.dist.world, self.dist.rank)
        for idx in tqdm(batches, desc="evaluation", unit="batch", leave=False, disable=not self.dist.is_main):
            stats += self.forward_stats(collate([self.eval_set[i] for i in idx]), with_lm=True)[1]
        return summarize(all_reduce_sum(stats, self.dist))

    # ----- logging -----------------------------------------------------------------------------

    def _log_window(self, step: int, stats: torch.Tensor, tokens: int, seconds: float) -> None:
        totals = all_reduce_sum(torch.cat([stats.flatten(), stats.new_tensor([tokens])]), self.dist)
        summary = summarize(totals[:-1].view_as(stats), self.weights(step - 1))
        self._stop_if_diverged(step, [summary["loss"]])
        if not self.dist.is_main:
            return
        record = {"step": step, "loss": summary["loss"], "lr": self.optimizer.param_groups[0]["lr"],
                  "tokens_per_s": totals[-1].item() / max(seconds, 1e-9), "heads": summary["heads"]}
        if self.joint:
            record["lm"] = summary["lm"]
        parts = [f"step {step}/{self.total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        if self.joint:
            parts.append(f"lm {summary['lm']['loss']:.3f}")
        parts += [f"h{k} {h['loss']:.3f} {h['top1']:.2f}/{h['top5']:.2f}" for k, h in enumerate(summary["heads"])]
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        self._print(" | ".join(parts))
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _log_eval(self, step: int, results: dict) -> None:
        self._stop_if_diverged(step, [r["loss"] for r in [results["lm"], *results["heads"]]])
        if not self.dist.is_main or not results["lm"]["tokens"]:
            return
        rows = [("lm_head", results["lm"])] + [(f"head {k}", h) for k, h in enumerate(results["heads"])]
        lines = [f"eval at step {step} ({results['lm']['tokens']} tokens): predictor  loss  top-1  top-5"]
        lines += [f"  {name:>8}  {r['loss']:.3f}  {r['top1']:.3f}  {r['top5']:.3f}" for name, r in rows]
        self._print("\n".join(lines))

    def _stop_if_diverged(self, step: int, losses: list[float]) -> None:
        """Stop before a diverged model is saved. `losses` are all-reduced, the same on every rank: all stop
        together, and none is left waiting in a collective."""
        if not all(math.isfinite(loss) for loss in losses):
            raise NanoMedusaError(f"the loss is not finite at step {step} (training diverged); lower --lr (and in "
                                  f"joint training --backbone-lr), or train in float32 (--dtype float32).")

    def _print(self, text: str) -> None:
        if self.dist.is_main:
            tqdm.write(text)

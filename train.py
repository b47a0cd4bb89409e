"""Train Medusa heads for a model: self-distillation, warm-up (Medusa-1), joint training (Medusa-2).

Usage:

    # 1. Self-distillation: the model answers the prompts (resumable; rerun to continue).
    #    Greedy answers are decoded --distill-batch-size prompts at a time (default 64; lower it if the GPU
    #    runs out of memory); with --temperature > 0 prompts are answered one at a time (seeded per prompt).
    python train.py --stage distill --data ../shared/data/prompts-train.jsonl --out data/answers.jsonl

    #    Several GPUs: one process per GPU on disjoint shards, then concatenate them.
    for i in 0 1 2 3; do
      CUDA_VISIBLE_DEVICES=$i python train.py --stage distill --data ... --shard $i/4 --out data/answers.$i.jsonl &
    done; wait
    cat data/answers.?.jsonl > data/answers.jsonl

    # 2. Warm-up (Medusa-1): backbone frozen, heads trained. -> out/warmup/heads, out/warmup/eval.json
    python train.py --stage warmup --data data/answers.jsonl --out out/warmup
    python generate.py --medusa out/warmup/heads --prompt "..."
    #    Several answer files train as a mix; --data-weights repeats (> 1) or thins (< 1) each file's examples.
    python train.py --stage warmup --data data/chat.jsonl data/math.jsonl --data-weights 1 0.5 --out out/mix
    #    Heads that read the tokens before their target (children guessed from their parent's token):
    python train.py --stage warmup --reads-path --data data/answers.jsonl --out out/path
    #    --cache-hidden DIR keeps the frozen backbone's hidden states on disk for epochs after the first.

    # 3. Joint (Medusa-2, optional): backbone and heads together, from the warm-up heads.
    #    This CHANGES THE BASE MODEL: serve out/joint/model together with out/joint/heads.
    python train.py --stage joint --heads out/warmup/heads --data data/answers.jsonl --out out/joint
    python generate.py --model out/joint/model --medusa out/joint/heads --prompt "..."
    #    With LoRA the backbone's change ships as a small adapter inside out/joint/heads (no out/joint/model);
    #    --medusa out/joint/heads merges it into the base model when it loads. From such heads (Medusa-2's) only full
    #    joint training continues: their adapter is merged into the backbone it trains, which becomes out/joint/model.
    python train.py --stage joint --heads out/warmup/heads --lora-rank 16 --backbone-lr 2e-4 ...

    # Several GPUs: the same commands under torchrun (DDP for warm-up, FSDP for joint training).
    torchrun --nproc-per-node 8 train.py --stage warmup --data data/answers.jsonl --out out/warmup

    # An interrupted run continues from its last checkpoint (every --save-every steps):
    python train.py --stage warmup --data data/answers.jsonl --out out/warmup --resume
    # A run that ends well removes its checkpoint; a new run into an --out holding an earlier run's results (heads,
    # model, eval.json) is refused unless --overwrite replaces them.

`--model` takes a checkpoint directory, a .gguf file or a hub id; left out, the project's default model.
Data: ShareGPT (`conversations`), OpenAI (`messages`) or prompt (`prompt`) records as .json or .jsonl;
only assistant tokens are trained on. The global batch is --batch-size x --grad-accum x processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanomedusa.cli import (USAGE_ERROR, ArgumentParser, add_chat_format_flag, check_at_least, check_input_dir,
                            check_input_file, check_output_dir, check_output_file, check_positive, check_sampling,
                            check_seed, exit_with, run_reporting_errors)
from nanomedusa.errors import NanoMedusaError


def make_parser() -> argparse.ArgumentParser:
    from nanomedusa.training import DistillConfig, TrainConfig
    from nanomedusa.training.data import EVAL_FRACTION, add_split_flag

    t, d = TrainConfig(), DistillConfig()
    p = ArgumentParser(description="Train Medusa heads (examples: the docstring at the top of train.py).")
    p.add_argument("--stage", choices=["distill", "warmup", "joint"], default="warmup")
    p.add_argument("--model", default=None, help="checkpoint dir, .gguf file or hub id (default: the project default)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="training conversations (several files train as a mix), or one prompts file for --stage "
                        "distill")
    p.add_argument("--data-weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per --data file: its training examples are repeated (W > 1) or thinned (W < 1)")
    p.add_argument("--out", default=None, help="output dir (warmup/joint, default out) or .jsonl file (distill)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto",
                   help="the backbone's: auto is bfloat16 for warm-up and distillation on a GPU, else float32; full "
                        "joint training (no --lora-rank) takes float32 only")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds distillation's sampling; in training, the held-out split, the data order and new "
                        "weights (default: --heads' own, else 0)")
    add_chat_format_flag(p)

    g = p.add_argument_group("distill")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--limit", type=int, default=None, help="answer only the first N prompts")
    g.add_argument("--shard", default=d.shard, metavar="I/N", help="answer only prompts I, I+N, I+2N, ...")
    # Not --batch-size: that flag is the training micro-batch below, a different size with a different default.
    g.add_argument("--distill-batch-size", type=int, default=d.batch_size,
                   help="prompts decoded together (greedy only; --temperature > 0 answers one at a time)")

    g = p.add_argument_group("heads")
    g.add_argument("--heads", default=None, help="heads directory to start from (joint: the warm-up's OUT/heads)")
    g.add_argument("--num-heads", type=int, default=t.num_heads)
    g.add_argument("--num-layers", type=int, default=t.num_layers, help="ResBlocks per head")
    g.add_argument("--shared-lm-head", action="store_true", help="heads reuse the base lm_head (fewer parameters)")
    g.add_argument("--reads-path", action="store_true",
                   help="head k also reads the tokens t+1 .. t+k+1 before its target, so a tree's children depend on "
                        "their parent (nanomedusa/path_tree.py); with --heads, adds that to the heads given")
    g.add_argument("--head-decay", type=float, default=t.head_decay, help="loss weight of head k is decay^k")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help=f"passes over the data (default {t.epochs})")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps, instead of --epochs")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="per process and micro-batch")
    g.add_argument("--grad-accum", type=int, default=t.grad_accum)
    g.add_argument("--lr", type=float, default=t.lr, help="heads' learning rate")
    g.add_argument("--backbone-lr", type=float, default=t.backbone_lr, help="joint: backbone learning rate")
    g.add_argument("--weight-decay", type=float, default=t.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=t.warmup_steps, help="linear learning-rate warm-up")
    g.add_argument("--grad-clip", type=float, default=t.grad_clip, help="0 = off")
    g.add_argument("--max-len", type=int, default=t.max_len, help="tokens per example (longer ones are cut)")
    g.add_argument("--cache-hidden", default=None, metavar="DIR",
                   help="warmup: keep the frozen backbone's hidden states in DIR for later epochs")
    g.add_argument("--eval-fraction", type=float, default=None,
                   help=f"held-out share of each --data file (default: --heads' own, else {EVAL_FRACTION})")
    add_split_flag(g)
    g.add_argument("--medusa-weight", type=float, default=t.medusa_weight, help="joint: weight of the heads' loss")
    g.add_argument("--medusa-weight-warmup", type=int, default=t.medusa_weight_warmup,
                   help="joint: steps over which that weight ramps up from 0")
    g.add_argument("--lora-rank", type=int, default=t.lora_rank, help="joint: LoRA rank (0 = full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=t.lora_alpha)
    g.add_argument("--log-every", type=int, default=t.log_every)
    g.add_argument("--save-every", type=int, default=t.save_every, help="checkpoint interval in steps (0 = never)")
    g.add_argument("--eval-every", type=int, default=t.eval_every, help="0 = only at the end")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier run left in --out (its heads, model, evaluation, checkpoint)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


# The flags of one kind of stage (argparse dests): the other kind would ignore them, so they are refused there.
DISTILL_FLAGS = ("max_new_tokens", "temperature", "top_p", "limit", "shard", "distill_batch_size")
TRAINING_FLAGS = ("data_weights", "heads", "num_heads", "num_layers", "shared_lm_head", "reads_path", "head_decay",
                  "epochs", "max_steps", "batch_size", "grad_accum", "lr", "backbone_lr", "weight_decay",
                  "warmup_steps", "grad_clip", "max_len", "cache_hidden", "eval_fraction", "split", "medusa_weight",
                  "medusa_weight_warmup", "lora_rank", "lora_alpha", "log_every", "save_every", "eval_every", "resume",
                  "overwrite")
DISTILL_HINTS = {"batch_size": " (it decodes --distill-batch-size prompts at a time)",
                 "resume": " (it always continues where its --out stopped)",
                 "overwrite": " (it appends to its --out: remove the file to start again)"}


def check_stage_flags(args) -> None:
    """Refuse a flag given a value that the chosen stage never reads, rather than ignore it."""
    parser = make_parser()
    distill = args.stage == "distill"
    for dest in TRAINING_FLAGS if distill else DISTILL_FLAGS:
        if getattr(args, dest) != parser.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            where = f"--stage warmup and joint, not distill{DISTILL_HINTS.get(dest, '')}" if distill else \
                "--stage distill only"
            raise NanoMedusaError(f"{flag} applies to {where}; drop it.")


def check_args(args) -> None:
    """Every flag's value and path, before anything loads (a NanoMedusaError naming the fix). TrainConfig.check
    adds the checks of how training flags combine."""
    from nanomedusa.loading import check_dtype
    from nanomedusa.training import DistillConfig, TrainConfig
    from nanomedusa.training.checkpoint import OUTPUTS

    check_stage_flags(args)
    check_dtype(args.dtype)
    for data in args.data:
        check_input_file("--data", data)
    if args.seed is not None:
        check_seed(args.seed)
    if args.stage == "distill":
        check_output_file("--out", args.out or DistillConfig.out)
        if Path(args.out or DistillConfig.out).suffix == ".json":  # read back as one JSON array, it would not parse
            raise NanoMedusaError(f"--out {args.out} would hold JSON lines, one answer per line; name it .jsonl.")
        check_at_least(1, {"--max-new-tokens": args.max_new_tokens, "--limit": args.limit})
        check_sampling(args.temperature, args.top_p)
        return
    out = Path(args.out or TrainConfig.out)
    check_output_dir("--out", out)
    # What training writes into OUT: a file or directory in the way would fail only once training is done.
    for name, is_dir in OUTPUTS.items():
        if (out / name).exists() and (out / name).is_dir() != is_dir:
            found, needed = ("file", "directory") if is_dir else ("directory", "file")
            raise NanoMedusaError(f"--out {out} holds a {found} {name} where training writes a {needed}; remove it "
                                  f"or choose another --out.")
    check_input_dir("--heads", args.heads)
    if args.cache_hidden:
        check_output_dir("--cache-hidden", args.cache_hidden)
    check_at_least(1, {"--max-steps": args.max_steps, "--epochs": args.epochs})
    if args.epochs is not None and args.max_steps is not None:
        raise NanoMedusaError("--epochs and --max-steps both say how long to train; pass one.")
    check_at_least(0, {"--num-layers": args.num_layers, "--weight-decay": args.weight_decay,
                       "--warmup-steps": args.warmup_steps, "--grad-clip": args.grad_clip,
                       "--medusa-weight": args.medusa_weight, "--medusa-weight-warmup": args.medusa_weight_warmup,
                       "--lora-rank": args.lora_rank, "--save-every": args.save_every, "--eval-every": args.eval_every})
    check_positive({"--lr": args.lr, "--backbone-lr": args.backbone_lr, "--head-decay": args.head_decay,
                    "--lora-alpha": args.lora_alpha,
                    "--data-weights": min(args.data_weights) if args.data_weights else None})


def run(args) -> None:
    from nanomedusa.training import DistillConfig, TrainConfig, Trainer, distill

    check_args(args)
    if args.stage == "distill":
        fields = DistillConfig.__dataclass_fields__
        values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
        values["batch_size"] = args.distill_batch_size  # not --batch-size, the training micro-batch
        if len(args.data) > 1:
            raise NanoMedusaError("--stage distill answers one prompts file at a time; run it once per --data file.")
        values["data"] = args.data[0]
        cfg = DistillConfig(**values)
        written = distill(cfg)
        print(f"wrote {written} answers to {cfg.out}")
    else:
        fields = TrainConfig.__dataclass_fields__
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
        Trainer(cfg).run()


def main(argv=None) -> int:
    args = parse_args(argv)
    from nanomedusa.training.distributed import shutdown

    status = USAGE_ERROR  # unless the run ends well, no rank waits for the others on the way out
    try:
        status = run_reporting_errors(lambda: run(args))
    finally:
        shutdown(wait_for_all=status == 0)
    return status


if __name__ == "__main__":
    exit_with(main())

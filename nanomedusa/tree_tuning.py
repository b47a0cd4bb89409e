"""Choose a Medusa tree for a set of heads from how often each head's rank-i guess is right.

    python -m nanomedusa.tree_tuning --heads weights/smollm2-135m-instruct-medusa \
        --data data/answers.jsonl [more.jsonl ...] --nodes 63 [--model M] [--write]
    python -m nanomedusa.tree_tuning ... --step-times work/bench/step-times.json --write   # sized to this GPU
    python -m nanomedusa.tree_tuning ... --nodes 31 --max-depth 3 --write --trim   # 3 heads deep, the rest dropped

The Medusa paper builds its sparse tree greedily: a path's expected contribution to the accepted
length is the product of its heads' rank accuracies, so the best N-node tree keeps the N paths with
the largest products (`tree.tree_from_head_accuracies`). This script measures those accuracies on
held-out conversations (the split `train.py` holds out, by --seed, --eval-fraction and --split, which follow the
heads' own by default, each cut as it cuts them: `training/data.py`), prints them (per data file and pooled), and
with --write stores the tree as `medusa_choices` in the heads' config.json, where `generate.py` picks it up as the
heads' default tree on a GPU (`--tree own` on a CPU), and the accuracies as `rank_accuracy`, from which dynamic trees
(`dynamic_tree.py`) build their superset.

Sized to the hardware: a bigger tree accepts more per step but a step costs more. With --step-times
(the step time against node count that `python -m bench.decode --tree-sizes ...` measured on the
target GPU, written to work/bench/step-times.json unless told otherwise; bench/step-times.json is the H200's
record) the size is the one with the most expected tokens per millisecond,
expected_accept_length(tree of N nodes) / step_ms(N), instead of a fixed --nodes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kernels.medusa_heads import MAX_TOPK

from .cli import (ArgumentParser, add_chat_format_flag, check_at_least, check_held_out_split, check_input_dir,
                  check_input_file, check_output_file, exit_with, run_reporting_errors)
from .errors import NanoMedusaError
from .files import read_utf8, write_atomically, write_text_atomically
from .heads import WEIGHT_FILES, MedusaHeads, base_model_note, load_heads_and_adapter, path_ids, recorded_held_out
from .loading import load_model
from .tokenizer import load_tokenizer
from .training.data import (IGNORE, add_held_out_flags, collate, example_length, held_out_split, held_out_split_notes,
                            load_conversations, tokenize_held_out, train_eval_split)
from .training.losses import shifted_targets
from .tree import expected_accept_length, tree_capacity, tree_from_head_accuracies


@torch.inference_mode()
def rank_hits(model, heads: MedusaHeads, examples, topk: int = 10, batch_size: int = 2):
    """-> (hits [K, topk]: answer positions where head k's rank-i guess is the true token, count [K])."""
    K = heads.config.num_heads
    hits = torch.zeros(K, topk, dtype=torch.float64)
    count = torch.zeros(K, dtype=torch.float64)
    # (a bar at a terminal only: tuning a 7B's tree reads thousands of answers)
    for i in tqdm(range(0, len(examples), batch_size), desc="rank accuracies", unit="batch", leave=False,
                  disable=None):
        batch = collate(examples[i:i + batch_size]).to(model.device)
        hidden = model.forward_hidden(batch.tokens)  # [B, T, D]
        path = model.tok_embeddings(path_ids(batch.tokens, K)) if heads.config.reads_path else None  # [B, T, K, D]
        logits = heads(hidden, model.lm_head.weight, path)  # [K, B, T, V]
        targets = shifted_targets(batch.labels, K)[1:]  # [K, B, T]: head k's target at t is token t+k+2
        valid = targets != IGNORE
        target_logit = logits.gather(-1, targets.clamp(min=0)[..., None])  # [K, B, T, 1]
        rank = (logits > target_logit).sum(-1)  # [K, B, T]
        for r in range(topk):
            hits[:, r] += ((rank == r) & valid).sum(dim=(1, 2)).double().cpu()
        count += valid.sum(dim=(1, 2)).double().cpu()
    return hits, count


def rank_accuracies(model, heads: MedusaHeads, examples, topk: int = 10, batch_size: int = 2) -> torch.Tensor:
    """-> acc [K, topk]: share of answer positions where head k's rank-i guess is the true token."""
    hits, count = rank_hits(model, heads, examples, topk, batch_size)
    return hits / count.clamp(min=1)[:, None]


def size_for_hardware(acc: torch.Tensor, step_times: dict) -> tuple[int, list[dict]]:
    """-> (paths in the best tree, one row per measured size): the size with the most expected
    accepted tokens per millisecond of step."""
    rows = []
    for t in step_times["trees"]:
        paths = min(t["nodes"] - 1, tree_capacity(*acc.shape))
        expected = expected_accept_length(acc, tree_from_head_accuracies(acc, paths))
        rows.append({"nodes": paths + 1, "step_ms": t["step_ms"], "expected_accepted": expected,
                     "tokens_per_ms": expected / t["step_ms"]})
    best = max(rows, key=lambda r: r["tokens_per_ms"])
    return best["nodes"] - 1, rows


def read_step_times(path: str) -> dict:
    """The step times `python -m bench.decode --tree-sizes` wrote: at least one tree, each of 2+ nodes."""
    try:
        step_times = json.loads(read_utf8(path))
        valid = step_times["trees"] and all(t["nodes"] > 1 and t["step_ms"] > 0 for t in step_times["trees"])
    except (OSError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise NanoMedusaError(f"{path} is not a step-times file; write one with "
                              f"python -m bench.decode --tree-sizes 16,32,64,128,256 on the target GPU.")
    return step_times


def trim_heads(heads_dir: Path, config: dict, depth: int) -> None:
    """Keep heads 0 .. depth-1 (a head the tree never reads costs every step a top-k for nothing):
    rewrites the weights file and sets the head count, accuracy rows and temperatures in `config`."""
    weights = heads_dir / WEIGHT_FILES[0]  # (check_args made sure it is there)
    # keys "medusa_head.{k}.{layer}...", "medusa_path.{k}.weight", or the reference's unprefixed "{k}.{layer}..."
    kept = {key: v for key, v in load_file(str(weights)).items() if _head_index(key) < depth}
    write_atomically(weights, lambda tmp: save_file(kept, str(tmp), metadata={"format": "pt"}))
    config["medusa_num_heads"] = config["num_heads"] = depth
    config["rank_accuracy"] = config["rank_accuracy"][:depth]
    if config.get("medusa_temperatures") is not None:
        config["medusa_temperatures"] = config["medusa_temperatures"][:depth]
    print(f"kept the {depth} heads the tree reaches in {weights}")


def _head_index(key: str) -> int:
    return int(key.removeprefix("medusa_head.").removeprefix("medusa_path.").split(".")[0])


def print_accuracies(title: str, acc: torch.Tensor) -> None:
    print(f"{title} (rows: heads, columns: rank 0..; then top-1 / top-5):")
    for k, row in enumerate(acc.tolist()):
        print(f"  head {k}: " + " ".join(f"{a:.3f}" for a in row) + f"   {row[0]:.3f} / {sum(row[:5]):.3f}")


def check_args(args) -> None:
    """Every flag's value and path, before the model loads (a NanoMedusaError naming the fix)."""
    check_input_dir("--heads", args.heads)
    for path in args.data:
        check_input_file("--data", path)
    if args.json:
        check_output_file("--json", args.json)
    check_at_least(1, {"--nodes": args.nodes, "--topk": args.topk, "--max-len": args.max_len, "--limit": args.limit,
                       "--max-depth": args.max_depth})
    if args.topk > MAX_TOPK:
        raise NanoMedusaError(f"--topk must be at most {MAX_TOPK} (the deepest rank a tree may use), not {args.topk}.")
    if args.trim and not args.write:
        raise NanoMedusaError("--trim drops heads from the files --write rewrites; add --write, or drop --trim.")
    if args.trim and not (Path(args.heads) / WEIGHT_FILES[0]).is_file():
        raise NanoMedusaError(f"--trim rewrites {WEIGHT_FILES[0]}, which {args.heads} lacks; drop --trim.")
    check_held_out_split(args.eval_fraction, args.seed)


def run(args) -> None:
    """Measure the accuracies, choose the tree, and print, --json and --write it."""
    check_args(args)
    # the held-out split to measure on, from the flags and the heads' record (a bad record fails before the loading)
    recorded = recorded_held_out(args.heads)
    eval_fraction, seed, split = held_out_split(recorded, args.eval_fraction, args.seed, args.split)
    step_times = read_step_times(args.step_times) if args.step_times else None
    model, ckpt = load_model(args.model, device=args.device)
    heads = load_heads_and_adapter(args.heads, model)
    if note := base_model_note(args.heads, heads.config.base_model, ckpt):  # (else: measured on another model)
        print(f"[note] {note}.", file=sys.stderr)
    if args.max_depth is not None and args.max_depth > heads.config.num_heads:
        raise NanoMedusaError(f"--max-depth {args.max_depth} is deeper than the {heads.config.num_heads} heads in "
                              f"{args.heads}; pass at most {heads.config.num_heads}.")
    depth = args.max_depth or heads.config.num_heads
    if not step_times and args.nodes > tree_capacity(depth, args.topk):  # (checked now, not after the measuring)
        raise NanoMedusaError(f"--nodes {args.nodes} is more than a tree {depth} deep of top-{args.topk} guesses "
                              f"holds ({tree_capacity(depth, args.topk)}); pass a smaller --nodes, or a larger "
                              f"--topk or --max-depth.")
    tokenizer = load_tokenizer(ckpt, args.chat_format)
    for note in held_out_split_notes(recorded, eval_fraction, seed, tokenizer.chat.preset, split):
        print(f"[note] {note}.", file=sys.stderr)
    max_len = example_length(args.max_len, model.config.max_position_embeddings)
    hits, count, report = 0, 0, {}
    for path in args.data:
        _, held_out = train_eval_split(load_conversations(path), eval_fraction, seed, split)
        examples = tokenize_held_out(tokenizer, held_out[: args.limit], max_len, f"{path}'s held-out conversations",
                                     say=lambda note: print(note, file=sys.stderr))
        if not examples:
            raise NanoMedusaError(f"{path} has no held-out conversation with an answer; pass more data.")
        file_hits, file_count = rank_hits(model, heads, examples, args.topk)
        acc = file_hits / file_count.clamp(min=1)[:, None]
        print_accuracies(f"{path}: {len(examples)} held-out conversations, {int(file_count[0])} answer tokens", acc)
        report[path] = {"conversations": len(examples), "tokens": int(file_count[0]), "rank_accuracy": acc.tolist()}
        hits, count = hits + file_hits, count + file_count
    acc = hits / count.clamp(min=1)[:, None]  # [K, topk], pooled over the files' answer tokens
    if len(args.data) > 1:
        print_accuracies("all files", acc)
    tree_acc = acc[: args.max_depth]  # the heads the tree may use (None: all)
    nodes = args.nodes
    if step_times:
        nodes, sizes = size_for_hardware(tree_acc, step_times)
        print(f"step times of {step_times.get('device', '?')} "
              f"(plain step {step_times.get('plain_step_ms', 0):.3f} ms):")
        for r in sizes:
            print(f"  T={r['nodes']:>4}: {r['step_ms']:.3f} ms, expected accepted {r['expected_accepted']:.2f}, "
                  f"{r['tokens_per_ms']:.3f} tokens/ms")
        report["sizes"] = sizes
    choices = tree_from_head_accuracies(tree_acc, nodes)
    print(f"tree ({len(choices)} nodes, expected accepted {expected_accept_length(tree_acc, choices):.2f}): "
          f"{json.dumps(choices)}")
    if args.json:
        out = {**report, "pooled": acc.tolist(), "medusa_choices": choices}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.write:
        config_path = Path(args.heads) / "config.json"
        config = json.loads(read_utf8(config_path))
        config["medusa_choices"] = choices
        config["rank_accuracy"] = [[round(a, 4) for a in row] for row in acc.tolist()]
        if args.trim:
            trim_heads(Path(args.heads), config, max(len(c) for c in choices))
        write_text_atomically(config_path, json.dumps(config, indent=2) + "\n")
        print(f"wrote medusa_choices to {config_path}")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", required=True, help="Medusa heads directory")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="conversations (the heads' training data; the held-out split of each file is used)")
    p.add_argument("--model", default=None, help="base model (default: the built-in default)")
    add_chat_format_flag(p)
    p.add_argument("--nodes", type=int, default=63, help="tree size, root not counted")
    p.add_argument("--step-times", default=None, metavar="FILE",
                   help="step time against tree size (python -m bench.decode --tree-sizes): choose the size too")
    p.add_argument("--max-depth", type=int, default=None,
                   help="build the tree from the first D heads only (default: all); where each depth costs a step "
                        "more, as when heads read their path (nanomedusa/path_tree.py), a shallower tree can be faster")
    p.add_argument("--topk", type=int, default=10, help="ranks measured per head")
    add_held_out_flags(p)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="use at most N held-out conversations per file")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, metavar="FILE", help="write the accuracies (per file and pooled) here")
    p.add_argument("--write", action="store_true",
                   help="store the tree as medusa_choices, and the accuracies as rank_accuracy, in the heads' "
                        "config.json")
    p.add_argument("--trim", action="store_true",
                   help="with --write: drop the heads deeper than the tree reaches from the heads' files")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args))


if __name__ == "__main__":
    exit_with(main())

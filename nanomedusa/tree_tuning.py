"""Choose a Medusa tree for a set of heads from how often each head's rank-i guess is right.

    python -m nanomedusa.tree_tuning --heads weights/smollm2-135m-instruct-medusa \
        --data data/answers.jsonl --nodes 63 [--model M] [--write]

The Medusa paper builds its sparse tree greedily: a path's expected contribution to the accepted
length is the product of its heads' rank accuracies, so the best N-node tree keeps the N paths with
the largest products (`tree.tree_from_head_accuracies`). This script measures those accuracies on
held-out conversations (the same split `train.py` holds out, by --seed and --eval-fraction), prints
them, and with --write stores the tree as `medusa_choices` in the heads' config.json, where
`generate.py` picks it up as the heads' default tree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .errors import NanoMedusaError
from .heads import MedusaHeads
from .loading import load_model
from .tokenizer import Tokenizer
from .training.data import IGNORE, collate, load_conversations, split_train_eval, tokenize_all
from .training.losses import shifted_targets
from .tree import tree_from_head_accuracies


@torch.inference_mode()
def rank_accuracies(model, heads: MedusaHeads, examples, topk: int = 10, batch_size: int = 2) -> torch.Tensor:
    """-> acc [K, topk]: share of answer positions where head k's rank-i guess is the true token."""
    K = heads.config.num_heads
    hits = torch.zeros(K, topk, dtype=torch.float64)
    count = torch.zeros(K, dtype=torch.float64)
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size]).to(model.device)
        hidden = model.forward_hidden(batch.tokens)  # [B, T, D]
        logits = heads(hidden, model.output.weight)  # [K, B, T, V]
        targets = shifted_targets(batch.labels, K)[1:]  # [K, B, T]: head k's target at t is token t+k+2
        valid = targets != IGNORE
        target_logit = logits.gather(-1, targets.clamp(min=0)[..., None])  # [K, B, T, 1]
        rank = (logits > target_logit).sum(-1)  # [K, B, T]
        for r in range(topk):
            hits[:, r] += ((rank == r) & valid).sum(dim=(1, 2)).double().cpu()
        count += valid.sum(dim=(1, 2)).double().cpu()
    return hits / count.clamp(min=1)[:, None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", required=True, help="Medusa heads directory")
    p.add_argument("--data", required=True, help="conversations (the heads' training data; its held-out split is used)")
    p.add_argument("--model", default=None, help="base model (default: the built-in default)")
    p.add_argument("--nodes", type=int, default=63, help="tree size, root not counted")
    p.add_argument("--topk", type=int, default=10, help="ranks measured per head")
    p.add_argument("--eval-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="use at most N held-out conversations")
    p.add_argument("--device", default="auto")
    p.add_argument("--write", action="store_true", help="store the tree as medusa_choices in the heads' config.json")
    args = p.parse_args(argv)
    try:
        model, ckpt = load_model(args.model, device=args.device)
        heads = MedusaHeads.load(args.heads, model.config, device=model.device, dtype=model.dtype)
        _, held_out = split_train_eval(load_conversations(args.data), args.eval_fraction, args.seed)
        examples = tokenize_all(Tokenizer.from_dir(ckpt), held_out[: args.limit], args.max_len)
        if not examples:
            raise NanoMedusaError(f"{args.data} has no held-out conversation with an answer; pass more data.")
        acc = rank_accuracies(model, heads, examples, args.topk)
        print("rank accuracy per head (rows: heads, columns: rank 0..):")
        for k, row in enumerate(acc.tolist()):
            print(f"  head {k}: " + " ".join(f"{a:.3f}" for a in row))
        choices = tree_from_head_accuracies(acc, args.nodes)
        print(f"tree ({len(choices)} nodes): {json.dumps(choices)}")
        if args.write:
            config_path = Path(args.heads) / "config.json"
            config = json.loads(config_path.read_text())
            config["medusa_choices"] = choices
            config["rank_accuracy"] = [[round(a, 4) for a in row] for row in acc.tolist()]
            config_path.write_text(json.dumps(config, indent=2) + "\n")
            print(f"wrote medusa_choices to {config_path}")
    except NanoMedusaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Would Medusa heads guess better if they also read the tokens before their target? An offline probe.

    python train.py --stage distill --data PROMPTS --out /tmp/train.jsonl --limit 480 --max-new-tokens 160
    python train.py --stage distill --data bench/prompts-chat-heldout.jsonl --out /tmp/eval.jsonl --max-new-tokens 160
    python -m bench.conditioned_heads_probe --train /tmp/train.jsonl --eval /tmp/eval.jsonl   # CPU: ~10 minutes

Head k (0-based) guesses token t+k+2 from the hidden state h_t alone. Two of the tokens before its target are
known, or could be, when it runs: the step's root t+1 (the token the base model just chose: `propose` holds it),
and, inside a tree, the path's own guesses t+2 .. t+k+1. Medusa's heads read neither, so a tree's candidates at a
depth are the same under every parent (why #15's dynamic trees gain little: bench/RESULTS.md). This probe measures
what reading them would be worth, teacher-forced (on the path a greedy step accepts, every token before the target
is the right one, so these are the accuracies a tree's acceptance rests on):

  shipped    the heads as trained (`--heads`), not trained further
  medusa     with --lr > 0 only: the same head trained further on --train, as it is (then the control: same
             data, same steps; by default, --lr 0, the heads' own weights stay as shipped and `shipped` is it)
  root       h_t + W e(x_{t+1}) into the head, W [D, D] from zero, trained alike (the root is known at every
             node: a tree's shape would not change)
  path       h_t + W [e(x_{t+1}), .., e(x_{t+k+1})] (the tree's own tokens too: children depend on their parent;
             heads k >= 1)

e() is the base model's token embedding, frozen like the backbone and the (shared) vocabulary projection. The
table gives each variant's top-1 and top-5 accuracy on --eval's answers per head.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomedusa.cli import ArgumentParser, add_chat_format_flag, check_input_file, exit_with, run_reporting_errors
from nanomedusa.errors import NanoMedusaError
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model, resolve_checkpoint
from nanomedusa.model import Transformer
from nanomedusa.tokenizer import Tokenizer, load_tokenizer
from nanomedusa.training.data import IGNORE, load_conversations, tokenize_all

from .report import print_table, save, say

SHIPPED_HEADS = "weights/smollm2-135m-instruct-medusa"


class Stream:
    """Every example's tokens, labels and frozen hidden states, end to end: ids [P], labels [P], hidden [P, D],
    end [P] (the position one past each token's example)."""

    def __init__(self, model, examples):
        ids, labels, hidden, end, start = [], [], [], [], 0
        with torch.no_grad():
            for e in examples:
                tokens = torch.tensor([e.input_ids], device=model.device)  # [1, T]
                hidden.append(model.forward_hidden(tokens)[0].float())  # [T, D]
                ids.append(tokens[0])
                labels.append(torch.tensor(e.labels, device=model.device))
                start += len(e.input_ids)
                end.append(torch.full((len(e.input_ids),), start, device=model.device))
        self.ids, self.labels, self.hidden, self.end = (torch.cat(x) for x in (ids, labels, hidden, end))

    def positions(self, k: int) -> torch.Tensor:
        """The positions t at which head k has an answer token to guess, t + k + 2, in t's own example."""
        t = torch.arange(self.ids.numel(), device=self.ids.device)
        target = t + k + 2
        ok = target < self.end
        ok[ok.clone()] = self.labels[target[ok]] != IGNORE
        return t[ok]


class ProbeHead(nn.Module):
    """One Medusa head's ResBlocks, fed h_t plus W times the embeddings of the `reads` tokens after t, then the base
    model's (shared) vocabulary projection."""

    def __init__(self, blocks: nn.Module, reads: int, dim: int):
        super().__init__()
        self.blocks, self.reads = blocks, reads
        self.condition = nn.Linear(reads * dim, dim, bias=False) if reads else None
        if self.condition is not None:
            nn.init.zeros_(self.condition.weight)  # starts as the head it was copied from

    def forward(self, stream: Stream, t: torch.Tensor, model) -> torch.Tensor:
        """positions t [N] -> logits [N, V]."""
        x = stream.hidden[t]  # [N, D]
        if self.reads:
            after = stream.ids[t[:, None] + torch.arange(1, self.reads + 1, device=t.device)]  # [N, reads]
            x = x + self.condition(model.tok_embeddings(after).float().flatten(1))  # [N, reads * D] -> [N, D]
        return F.linear(self.blocks(x), model.lm_head.weight.float())


def accuracy(head: ProbeHead, stream: Stream, k: int, model, topk: int = 5, chunk: int = 1024) -> tuple[float, float]:
    """Top-1 and top-`topk` accuracy of `head` as head k on every position of `stream`."""
    t_all, hits1, hitsk = stream.positions(k), 0, 0
    with torch.no_grad():
        for t in t_all.split(chunk):
            guesses = head(stream, t, model).topk(topk, dim=-1).indices  # [N, topk]
            right = guesses == stream.ids[t + k + 2][:, None]
            hits1 += int(right[:, 0].sum())
            hitsk += int(right.any(-1).sum())
    return hits1 / max(len(t_all), 1), hitsk / max(len(t_all), 1)


def train(head: ProbeHead, stream: Stream, k: int, model, args) -> ProbeHead:
    """`args.steps` Adam steps on batches of `args.batch` positions, drawn by `args.seed` alike for every variant."""
    t_all = stream.positions(k)
    rng = torch.Generator().manual_seed(args.seed + k)
    groups = []
    if args.lr > 0:  # the trained head: fine-tuned
        groups.append({"params": list(head.blocks.parameters()), "lr": args.lr})
    else:  # kept as it is: no gradients for its weights (only through it, for W)
        head.blocks.requires_grad_(False)
    if head.condition is not None:  # new weights, from zero
        groups.append({"params": list(head.condition.parameters()), "lr": args.condition_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    for _ in range(args.steps):
        t = t_all[torch.randint(len(t_all), (args.batch,), generator=rng)].to(t_all.device)
        loss = F.cross_entropy(head(stream, t, model), stream.ids[t + k + 2])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


def run(args) -> dict:
    model, tokenizer = load_base_model(args)
    heads = MedusaHeads.load(args.heads, model.config, device=model.device, dtype=torch.float32)
    if not heads.config.shared_lm_head:
        raise NanoMedusaError("the probe reads heads that share the base model's lm_head; train them with "
                              "--shared-lm-head.")
    if not all(0 <= k < heads.config.num_heads for k in args.probe_heads):
        raise NanoMedusaError(f"{args.heads} has {heads.config.num_heads} heads; pass --probe-heads among "
                              f"0 .. {heads.config.num_heads - 1}.")
    streams = {}
    for name, files in (("train", args.train), ("eval", args.eval)):
        examples = load_examples(tokenizer, files, args.max_len)
        streams[name] = Stream(model, examples)
        say(f"[probe] {name}: {len(examples)} answers, {int((streams[name].labels != IGNORE).sum())} answer tokens")
    rows, results = [], []
    for k in args.probe_heads:
        shipped = heads.medusa_head[k][: heads.config.num_layers]
        variants = ({"shipped": 0} | ({"medusa": 0} if args.lr > 0 else {}) | {"root": 1}
                    | ({"path": k + 1} if k >= 1 else {}))
        for variant, reads in variants.items():
            head = ProbeHead(copy.deepcopy(shipped), reads, model.config.dim)
            if variant != "shipped":
                head = train(head, streams["train"], k, model, args)
            top1, topk = accuracy(head, streams["eval"], k, model)
            say(f"[probe] head {k} (token t+{k + 2}), {variant}: top-1 {top1:.3f}, top-5 {topk:.3f}")
            rows.append([k, f"t+{k + 2}", variant, reads, f"{top1:.3f}", f"{topk:.3f}"])
            results.append(dict(head=k, variant=variant, reads=reads, top1=top1, top5=topk))
    print_table(f"Held-out accuracy of head k's guess of token t+k+2 ({args.steps} steps of {args.batch} on --train "
                f"for every variant but shipped)", ["head", "guesses", "variant", "tokens read", "top-1", "top-5"],
                rows)
    out = {"train": args.train, "eval": args.eval, "chat_format": tokenizer.chat.preset, "steps": args.steps,
           "batch": args.batch, "lr": args.lr,
           "condition_lr": args.condition_lr, "results": results}
    if args.json:
        save(out, args.json)
    return out


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every offline probe of drafts takes: the base model, the answers it trains on and is measured
    on (`load_examples`), how much of each conversation it keeps, and the format the conversations are rendered in
    (the one the heads were trained on)."""
    p.add_argument("--model", default=None, help="checkpoint dir, .gguf or hub id (default: the built-in model)")
    p.add_argument("--train", nargs="+", required=True, help="answers to train on (train.py --stage distill output)")
    p.add_argument("--eval", nargs="+", required=True, help="held-out answers to measure on")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per conversation kept (default 1024)")
    add_chat_format_flag(p)


def check_data_arguments(args) -> None:
    """add_data_arguments' files, by their flags, before the model loads (a NanoMedusaError naming the fix)."""
    for flag, files in (("--train", args.train), ("--eval", args.eval)):
        for path in files:
            check_input_file(flag, path)


def load_base_model(args) -> tuple[Transformer, Tokenizer]:
    """add_data_arguments' base model, frozen, in float32 on --device, and its tokenizer in --chat-format's format."""
    ckpt = resolve_checkpoint(args.model)
    model, _ = load_model(ckpt, args.device, torch.float32)
    model.requires_grad_(False)
    return model, load_tokenizer(ckpt, args.chat_format)


def load_examples(tokenizer, files, max_len: int):
    """Every answer of the answer files, tokenized, in order."""
    return [e for f in files for e in tokenize_all(tokenizer, load_conversations(f), max_len)]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])  # (its errors: one line)
    add_data_arguments(p)
    p.add_argument("--heads", default=SHIPPED_HEADS, help=f"Medusa heads to start from (default {SHIPPED_HEADS})")
    p.add_argument("--probe-heads", nargs="+", type=int, default=[0, 1, 2], help="which heads (default 0 1 2)")
    p.add_argument("--steps", type=int, default=250, help="training steps per variant (default 250)")
    p.add_argument("--batch", type=int, default=256, help="positions per step (default 256)")
    p.add_argument("--lr", type=float, default=0.0,
                   help="AdamW learning rate of the heads' own blocks (default 0: only W learns)")
    p.add_argument("--condition-lr", type=float, default=1e-2,
                   help="AdamW learning rate of W, which starts from zero (default 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    torch.manual_seed(0)
    args = parse_args(argv)
    return run_reporting_errors(lambda: (check_data_arguments(args), run(args)))


if __name__ == "__main__":
    exit_with(main())

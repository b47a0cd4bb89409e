"""Calibrate Medusa heads: one temperature per head, so that a head's probabilities mean what they say.

    python -m nanomedusa.calibration --heads weights/smollm2-135m-instruct-medusa \\
        --data work/answers-chat.jsonl work/answers-math.jsonl [--model M] [--write]

A dynamic tree (dynamic_tree.py) spends its nodes where the product of the heads' probabilities is
largest, which only means "likeliest to be accepted" if the probabilities are calibrated; a head's raw
softmax is often over- or under-confident. Temperature scaling (Guo et al., 2017) fixes that with one
number per head: head k's probability is softmax(logits / T_k), with T_k the temperature that minimises
the negative log-likelihood (NLL) of the true token on held-out answers (head k at position t guesses
token t + k + 2). Dividing by T changes no ranking, so top-k guesses, accuracies and static trees stay
as they are. --write stores the temperatures as `medusa_temperatures` in the heads' config.json
(HeadsConfig; heads without them run at T = 1).

Held-out answers: the split of each --data file that train.py held out (by --seed, --eval-fraction and --split,
which default to the heads' own, as tree_tuning.py splits them). Without the answer files the heads were trained
on, make held-out answers from their prompts (--heads DIR, or --split, says how train.py split them):

    python -m nanomedusa.calibration --heads DIR --held-out-prompts ../shared/data/prompts-chat-train.jsonl \\
        --out held-chat.jsonl
    python train.py --stage distill --data held-chat.jsonl --out held-answers-chat.jsonl --limit 48
    python -m nanomedusa.calibration --heads DIR --data held-answers-chat.jsonl --whole-files --write

The fit: with beta = 1 / T, a head's NLL(beta) = mean(logsumexp(beta * z) - beta * z_true) over answer
positions (z the head's logits) is convex, with derivative mean(E_p[z] - z_true) and second derivative
mean(Var_p[z]) under p = softmax(beta * z), so Newton's method finds its minimum in a few passes over the
positions. Each pass recomputes the logits from the base model's hidden states, chunk by chunk: all of
them at once ([positions, vocab]) would not fit in memory.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from .cli import (ArgumentParser, add_chat_format_flag, check_at_least, check_held_out_split, check_input_dir,
                  check_input_file, check_output_file, exit_with, run_reporting_errors)
from .errors import NanoMedusaError
from .files import read_utf8, write_text_atomically
from .heads import (MedusaHeads, base_model_note, held_out_record, load_heads_and_adapter, path_ids, read_heads_config,
                    recorded_held_out)
from .loading import load_model
from .tokenizer import Tokenizer, load_tokenizer
from .training.data import (IGNORE, Conversation, add_held_out_flags, collate, example_length, held_out_split,
                            held_out_split_notes, load_conversations, prompt_messages, split_by_id, split_by_position,
                            tokenize_held_out, train_eval_split)
from .training.losses import shifted_targets

Chunks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # a fresh pass of (logits [n, V], targets [n])


@dataclass
class Fit:
    temperature: float
    nll_before: float  # mean NLL per answer token at T = 1, in nats
    nll_after: float  # at the fitted temperature


def nll_and_derivatives(chunks: Chunks, beta: float) -> tuple[float, float, float]:
    """The mean NLL of the targets under softmax(beta * logits), and its first and second derivatives in beta."""
    nll = slope = curvature = count = 0.0
    for logits, targets in chunks():
        logp = torch.log_softmax(beta * logits, dim=-1)  # [n, V]
        p = logp.exp()
        mean = (p * logits).sum(-1)  # [n] E_p[z]
        nll -= logp.gather(-1, targets[:, None]).sum().item()
        slope += (mean - logits.gather(-1, targets[:, None])[:, 0]).sum().item()
        curvature += (p * (logits - mean[:, None]) ** 2).sum().item()
        count += len(targets)
    if count == 0:
        raise NanoMedusaError("there are no answer tokens to calibrate on; pass --data with answers.")
    return nll / count, slope / count, curvature / count


def fit_temperature(chunks: Chunks, tolerance: float = 1e-4, max_steps: int = 30) -> Fit:
    """The temperature minimising the mean NLL over `chunks`, by Newton's method on beta = 1 / T from T = 1."""
    beta = 1.0
    nll, slope, curvature = nll_and_derivatives(chunks, beta)
    before = nll
    for _ in range(max_steps):
        if curvature <= 0:  # every logit equal: any temperature is as good
            break
        # Newton's step, kept within a factor 2 while far from the minimum
        new_beta = min(max(beta - slope / curvature, beta / 2), beta * 2)
        converged = abs(new_beta - beta) <= tolerance * beta
        beta = new_beta
        nll, slope, curvature = nll_and_derivatives(chunks, beta)
        if converged:
            break
    return Fit(1 / beta, before, nll)


@torch.inference_mode()
def answer_positions(model, heads: MedusaHeads, examples,
                     batch_size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per head k: (inputs [n_k, D], what head k reads at each answer position where it has a target: the base
    model's last hidden state, plus its path for heads that read it; targets [n_k], the token k + 2 after it)."""
    num_heads = heads.config.num_heads
    input_rows, target_rows = [[] for _ in range(num_heads)], [[] for _ in range(num_heads)]
    for i in tqdm(range(0, len(examples), batch_size), desc="held-out answers", unit="batch", leave=False,
                  disable=None):  # (a bar at a terminal only)
        batch = collate(examples[i:i + batch_size]).to(model.device)
        hidden = model.forward_hidden(batch.tokens)  # [B, T, D]
        path = model.tok_embeddings(path_ids(batch.tokens, num_heads)) if heads.config.reads_path else None
        targets = shifted_targets(batch.labels, num_heads)[1:]  # [K, B, T]: head k's target at t is token t+k+2
        for k in range(num_heads):
            valid = targets[k] != IGNORE
            input_rows[k].append(heads.head_input(k, hidden[valid], None if path is None else path[valid]))
            target_rows[k].append(targets[k][valid])
    return [(torch.cat(x), torch.cat(t)) for x, t in zip(input_rows, target_rows)]


def calibrate(model, heads: MedusaHeads, examples, chunk: int = 512) -> list[Fit]:
    """One fitted temperature per head, on the answer positions of `examples`."""
    fits = []
    for k, (inputs, targets) in enumerate(answer_positions(model, heads, examples)):
        @torch.inference_mode()
        def chunks(k=k, inputs=inputs, targets=targets):
            for i in range(0, len(targets), chunk):
                yield heads.logits_of_input(k, inputs[i:i + chunk], model.lm_head.weight), targets[i:i + chunk]

        fits.append(fit_temperature(chunks))
        print(f"  head {k}: T = {fits[-1].temperature:.3f}, NLL {fits[-1].nll_before:.4f} -> {fits[-1].nll_after:.4f} "
              f"nats per token ({len(targets)} answer tokens)", flush=True)
    return fits


def held_out_prompts(path: str, tokenizer: Tokenizer | None, eval_fraction: float, seed: int,
                     split: str = "id") -> list[Conversation]:
    """The prompts of a distillation prompts file whose answers train.py held out, in the file's order.

    Split by id, a prompt's answer is held out by its id alone (distillation keeps the ids), so the prompts are split
    as they are (the tokenizer is not needed; only in a file so small that no id falls below --eval-fraction can the
    one held out instead differ, `split_by_id`). Split by position, train.py split the answers file in the order
    `train.py --stage distill` writes it, longest prompt first (it sorts the prompts so, stably, to batch similar
    lengths): so the prompts are put in that order first, then split alike. (That is the order of one uninterrupted
    distillation run that answered every prompt, as the shipped heads had.)"""
    conversations = load_conversations(path)
    if split == "id":
        return split_by_id(conversations, [c.id for c in conversations], eval_fraction, seed)[1]
    lengths = [len(tokenizer.encode_chat(prompt_messages(c))) for c in conversations]
    by_length = sorted(range(len(conversations)), key=lambda i: -lengths[i])
    _, held_out = split_by_position(by_length, eval_fraction, seed)
    return [conversations[i] for i in sorted(held_out)]


# What another split means for the prompts --held-out-prompts writes (held_out_split_notes).
PROMPTS_TRAINED_ON = ("if --held-out-prompts holds the heads' prompts, some that this run writes had answers the heads "
                      "were trained on")


def check_args(args) -> None:
    """Every flag's value and path, before the model loads (a NanoMedusaError naming the fix)."""
    if args.held_out_prompts:
        check_input_file("--held-out-prompts", args.held_out_prompts)
        if not args.out:
            raise NanoMedusaError("--held-out-prompts writes the prompts to --out FILE; pass --out.")
        check_output_file("--out", args.out)
        if not (args.heads or args.split):  # (no default fits both the heads of earlier versions and newer ones)
            raise NanoMedusaError("--held-out-prompts must split the prompts as the heads' training split their "
                                  "answers; pass --heads DIR (its config.json says how) or --split id|position.")
    elif not (args.heads and args.data):
        raise NanoMedusaError("pass --heads DIR and --data FILE (or --held-out-prompts FILE --out FILE).")
    check_input_dir("--heads", args.heads)
    for path in args.data or []:
        check_input_file("--data", path)
    check_at_least(1, {"--max-len": args.max_len, "--limit": args.limit})
    check_held_out_split(args.eval_fraction, args.seed)


def write_held_out_prompts(args) -> None:
    raw = read_heads_config(Path(args.heads)) if args.heads else {}  # (read once: the record and the base model)
    recorded = held_out_record(raw)
    if recorded and recorded.get("eval_fraction") == 0:
        raise NanoMedusaError(f"the heads in {args.heads} were trained with --eval-fraction 0, on the answers to every "
                              f"prompt, so none is held out; measure them on answers to prompts they never saw.")
    eval_fraction, seed, split = held_out_split(recorded, args.eval_fraction, args.seed, args.split,
                                                reads_heads=bool(args.heads))
    chat_format = tokenizer = None  # (split by id, the prompts' format plays no part)
    if split == "position":  # prompt lengths decide that split: the model's tokenizer is needed
        _, checkpoint = load_model(args.model, device="cpu")
        # (another model's tokenizer may count the prompts' lengths otherwise)
        if note := base_model_note(args.heads, raw.get("base_model_name_or_path", ""), checkpoint):
            print(f"[note] {note}.", file=sys.stderr)
        tokenizer = load_tokenizer(checkpoint, args.chat_format)
        chat_format = tokenizer.chat.preset
    for note in held_out_split_notes(recorded, eval_fraction, seed, chat_format, split, trained_on=PROMPTS_TRAINED_ON):
        print(f"[note] {note}.", file=sys.stderr)
    held_out = held_out_prompts(args.held_out_prompts, tokenizer, eval_fraction, seed, split)
    if not held_out:
        raise NanoMedusaError(f"{args.held_out_prompts} holds no prompt to hold out; pass the prompts file the heads' "
                              f"answers came from.")
    lines = [json.dumps({"id": c.id, "messages": prompt_messages(c)}, ensure_ascii=False) for c in held_out]
    write_text_atomically(Path(args.out), "\n".join(lines) + "\n")
    print(f"wrote the {len(held_out)} held-out prompts of {args.held_out_prompts} to {args.out}")


def fit_and_write(args) -> None:
    # the held-out split, from the flags and the heads' record (a bad record fails before the loading); --whole-files:
    # answers held out by --held-out-prompts, no split here, but the format still counts
    recorded = recorded_held_out(args.heads)
    eval_fraction, seed, split = (None, None, None) if args.whole_files else \
        held_out_split(recorded, args.eval_fraction, args.seed, args.split)
    model, checkpoint = load_model(args.model, device=args.device)
    heads = load_heads_and_adapter(args.heads, model)
    if note := base_model_note(args.heads, heads.config.base_model, checkpoint):  # (else: fitted on another model)
        print(f"[note] {note}.", file=sys.stderr)
    tokenizer = load_tokenizer(checkpoint, args.chat_format)
    for note in held_out_split_notes(recorded, eval_fraction, seed, tokenizer.chat.preset, split):
        print(f"[note] {note}.", file=sys.stderr)
    max_len = example_length(args.max_len, model.config.max_position_embeddings)
    examples = []
    for path in args.data:
        conversations = load_conversations(path)
        if not args.whole_files:
            conversations = train_eval_split(conversations, eval_fraction, seed, split)[1]
        examples += tokenize_held_out(tokenizer, conversations[: args.limit], max_len,
                                      f"{path}'s held-out conversations", say=lambda note: print(note, file=sys.stderr))
    if not examples:
        raise NanoMedusaError("no held-out conversation with an answer; pass more --data.")
    print(f"calibrating {heads.config.num_heads} heads on {len(examples)} held-out conversations:")
    fits = calibrate(model, heads, examples)
    if args.write:
        config_path = Path(args.heads) / "config.json"
        config = json.loads(read_utf8(config_path))
        config["medusa_temperatures"] = [round(fit.temperature, 4) for fit in fits]
        write_text_atomically(config_path, json.dumps(config, indent=2) + "\n")
        print(f"wrote medusa_temperatures to {config_path}")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default=None, help="Medusa heads directory")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="answered conversations (the heads' training data: the held-out split of each file is used)")
    p.add_argument("--whole-files", action="store_true",
                   help="every conversation of --data is held out (e.g. answers to --held-out-prompts): use them all")
    p.add_argument("--model", default=None, help="base model (default: the built-in default)")
    add_chat_format_flag(p)
    add_held_out_flags(p)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="use at most N held-out conversations per file")
    p.add_argument("--device", default="auto")
    p.add_argument("--write", action="store_true", help="store the temperatures in the heads' config.json")
    p.add_argument("--held-out-prompts", default=None, metavar="FILE",
                   help="instead: write the prompts of this distillation prompts file whose answers train.py held out")
    p.add_argument("--out", default=None, metavar="FILE", help="where --held-out-prompts writes them (JSON lines)")
    args = p.parse_args(argv)

    def run() -> None:
        check_args(args)
        (write_held_out_prompts if args.held_out_prompts else fit_and_write)(args)

    return run_reporting_errors(run)


if __name__ == "__main__":
    exit_with(main())

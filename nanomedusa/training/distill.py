"""Self-distillation: the base model answers the training prompts, so the heads learn what it says.

    distill(DistillConfig(model=None, data="prompts.jsonl", out="answers.jsonl", batch_size=64))

Each prompt (a prompt record, or the turns before a conversation's first answer) is answered by our
engine (greedy unless temperature > 0) and appended to OUT as a ShareGPT line
{"id", "conversations": [..., {"from": "gpt", "value": answer}]}, with "truncated": true where the answer
was cut at max_new_tokens (training then leaves out the end-of-turn marker the model never wrote). A rerun
skips ids already in OUT, so an interrupted job picks up where it stopped.

Greedy answers are decoded `batch_size` prompts at a time (`generation.generate_batch`): the prompts are
sorted by token length, longest first, so a batch holds similar lengths (little padding) and a batch too
big for the GPU fails in the first minute rather than the last. Each batch's answers are written and
flushed as soon as it finishes, so OUT lists answers in that order, not the data's. A batched answer is
the one the prompt gets alone (batch size 1), up to floating-point reordering, which in bfloat16 can
rarely flip a near-tied argmax.

With temperature > 0 prompts are answered one at a time (`generation.generate`) whatever `batch_size`
says: sampling is seeded per prompt id, which keeps a resumed run's answers the same as an uninterrupted
one's, and a batch would share one random stream between its rows.

Several GPUs: run one process per GPU on disjoint shards (`shard="i/n"`, each with its own OUT), then
concatenate the files.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import NanoMedusaError
from ..decoder import Decoder
from ..generation import generate, generate_batch
from ..loading import load_model
from ..sampling import Sampling
from ..tokenizer import load_tokenizer
from .data import load_conversations, prompt_messages

SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


@dataclass
class DistillConfig:
    model: str | None = None  # None: the project's default model
    data: str = ""
    out: str = "answers.jsonl"
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    limit: int | None = None  # answer only the first N prompts of --data
    shard: str = "0/1"  # "i/n": answer only prompts i, i+n, i+2n, ... (one process per GPU)
    batch_size: int = 64  # prompts decoded together (greedy only; sampling answers one at a time)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    chat_format: str = "auto"  # a chat_template.PRESETS name, or auto: the one the checkpoint's template matches


@dataclass
class Job:
    id: str
    messages: list[dict]
    prompt_ids: list[int]
    max_new_tokens: int  # cfg.max_new_tokens, or less where the prompt leaves less of the context


def distill(cfg: DistillConfig) -> int:
    """Answer every prompt not yet in cfg.out; returns how many answers were written."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NanoMedusaError("--stage distill runs in one process; start it with python, not torchrun.")
    if cfg.batch_size < 1:
        raise NanoMedusaError(f"--distill-batch-size {cfg.batch_size} is below 1; pass a positive size, e.g. 64.")
    index, count = parse_shard(cfg.shard)
    conversations = load_conversations(cfg.data)
    if not conversations:
        raise NanoMedusaError(f"{cfg.data} holds no prompts; pass a JSON-lines file of conversations to answer.")
    conversations = conversations[: cfg.limit][index::count]
    out = Path(cfg.out)
    done = finished_ids(out)
    todo = [c for c in conversations if c.id not in done]
    if not todo:
        return 0
    model, ckpt_dir = load_model(cfg.model, cfg.device, cfg.dtype)
    decoder = Decoder(model)  # one for the run: its CUDA graphs serve every prompt
    tokenizer = load_tokenizer(ckpt_dir, cfg.chat_format)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p)
    context = model.config.max_position_embeddings
    jobs, seen, why = [], set(), {"a repeated id": 0, "no prompt": 0, "no room to answer in the context": 0}
    for conversation in todo:
        messages = prompt_messages(conversation)
        prompt_ids = tokenizer.encode_chat(messages) if messages else []
        reason = ("a repeated id" if conversation.id in seen else "no prompt" if not prompt_ids
                  else "no room to answer in the context" if len(prompt_ids) >= context else None)
        if reason:
            why[reason] += 1
            continue
        seen.add(conversation.id)
        jobs.append(Job(conversation.id, messages, prompt_ids, min(cfg.max_new_tokens, context - len(prompt_ids))))
    skipped = len(todo) - len(jobs)
    if skipped:
        tqdm.write(f"distill: skipped {skipped} of {len(todo)} prompts: "
                   + ", ".join(f"{n} with {reason}" for reason, n in why.items() if n)
                   + f" (the model's context is {context} tokens)")
    jobs.sort(key=lambda job: -len(job.prompt_ids))  # stable: equal lengths keep the data's order
    written = capped = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with (open(out, "a", encoding="utf-8") as f,
          tqdm(total=len(todo), desc="distill", unit="prompt", dynamic_ncols=True) as bar):
        bar.update(skipped)
        bar.set_postfix(written=written, skipped=skipped)
        for batch in batches(jobs, cfg.batch_size if sampling.greedy else 1):
            for job, tokens in zip(batch, answer(decoder, batch, sampling, tokenizer.eos_ids, cfg.seed)):
                cut = not (tokens and tokens[-1] in tokenizer.eos_ids)
                if cut:  # at max_new_tokens: how often this happens is how to judge the cap
                    capped += 1
                else:
                    tokens = tokens[:-1]
                turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in job.messages]
                turns.append({"from": "gpt", "value": tokenizer.decode(tokens)})
                record = {"id": job.id, "conversations": turns} | ({"truncated": True} if cut else {})
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            written += len(batch)
            bar.update(len(batch))
            bar.set_postfix(written=written, skipped=skipped)
    if written:
        tqdm.write(f"distill: {capped} of {written} answers ({100 * capped / written:.1f}%) were cut at "
                   f"--max-new-tokens {cfg.max_new_tokens} (or where the context ended) before the model ended them")
    return written


def batches(jobs: list[Job], size: int):
    """Consecutive runs of at most `size` jobs that share one max_new_tokens.

    generate_batch decodes every row for the same number of steps, so a batch is capped by the context
    left after its longest prompt. Mixing caps would cut a shorter prompt's answer below what it gets
    alone; only prompts within max_new_tokens of the context's end have their own cap, and they are few.
    """
    batch = []
    for job in jobs:
        if batch and (len(batch) == size or job.max_new_tokens != batch[0].max_new_tokens):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def answer(decoder: Decoder, batch: list[Job], sampling: Sampling, eos_ids: list[int], seed: int) -> list[list[int]]:
    """The generated tokens of each job (ending with eos where the model stopped)."""
    if len(batch) > 1:
        return generate_batch(decoder.model, [job.prompt_ids for job in batch], batch[0].max_new_tokens, sampling,
                              eos_ids=eos_ids)
    job, generator = batch[0], None
    if not sampling.greedy:
        generator = torch.Generator(decoder.device).manual_seed(seed * 1_000_003 + zlib.crc32(job.id.encode()))
    return [generate(decoder, job.prompt_ids, job.max_new_tokens, sampling, eos_ids=eos_ids,
                     generator=generator).tokens]


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise NanoMedusaError(f"--shard {shard!r} is not of the form i/n with 0 <= i < n; e.g. --shard 0/4.")
    return index, count


def finished_ids(path: Path) -> set[str]:
    """Ids already answered in `path`; a line torn by an interruption is cut off first, in place (the
    answers before it are never rewritten, so a second interruption cannot lose them)."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        os.truncate(path, len(data))
    ids = set()
    # errors="replace": a line with stray bytes is then not JSON, and reported as such below
    for n, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), 1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NanoMedusaError(f"{path} line {n} is not a distilled answer with an id; remove it or choose another "
                                  f"--out.") from None
    return ids

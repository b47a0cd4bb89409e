"""Self-distillation: the base model answers the training prompts, so the heads learn what it says.

    distill(DistillConfig(model=None, data="prompts.jsonl", out="answers.jsonl"))

Each prompt (a prompt record, or the turns before a conversation's first answer) is answered by our
engine (`generation.generate`; greedy unless temperature > 0) and appended to OUT as a ShareGPT line
{"id", "conversations": [..., {"from": "gpt", "value": answer}]}, flushed at once. A rerun skips ids
already in OUT, so an interrupted job picks up where it stopped. Sampling is seeded per prompt id,
which keeps a resumed run's answers the same as an uninterrupted one's.

Generation is one prompt at a time, which leaves a GPU mostly idle with a small model: run several
processes side by side on disjoint shards (`shard="i/n"`, each with its own OUT) and concatenate.
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
from ..generation import generate
from ..loading import load_model
from ..sampling import Sampling
from ..tokenizer import Tokenizer
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
    shard: str = "0/1"  # "i/n": answer only prompts i, i+n, i+2n, ... (for n processes side by side)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"


def distill(cfg: DistillConfig) -> int:
    """Answer every prompt not yet in cfg.out; returns how many answers were written."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NanoMedusaError("--stage distill runs in one process; start it with python, not torchrun.")
    index, count = parse_shard(cfg.shard)
    conversations = load_conversations(cfg.data)[: cfg.limit][index::count]
    out = Path(cfg.out)
    done = finished_ids(out)
    todo = [c for c in conversations if c.id not in done]
    if not todo:
        return 0
    model, ckpt_dir = load_model(cfg.model, cfg.device, cfg.dtype)
    tokenizer = Tokenizer.from_dir(ckpt_dir)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p)
    context = model.config.max_position_embeddings
    written = skipped = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f, tqdm(todo, desc="distill", unit="prompt", dynamic_ncols=True) as bar:
        for conversation in bar:
            messages = prompt_messages(conversation)
            prompt_ids = tokenizer.encode_chat(messages) if messages else []
            if conversation.id in done or not prompt_ids or len(prompt_ids) >= context:
                skipped += 1  # a duplicate id, an empty prompt, or one that leaves no room to answer
                continue
            generator = None
            if not sampling.greedy:
                generator = torch.Generator(model.device).manual_seed(cfg.seed * 1_000_003 + zlib.crc32(conversation.id.encode()))
            result = generate(model, prompt_ids, min(cfg.max_new_tokens, context - len(prompt_ids)), sampling,
                              eos_ids=tokenizer.eos_ids, generator=generator)
            tokens = result.tokens[:-1] if result.tokens and result.tokens[-1] in tokenizer.eos_ids else result.tokens
            turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]
            turns.append({"from": "gpt", "value": tokenizer.decode(tokens)})
            f.write(json.dumps({"id": conversation.id, "conversations": turns}, ensure_ascii=False) + "\n")
            f.flush()
            done.add(conversation.id)
            written += 1
            bar.set_postfix(written=written, skipped=skipped)
    return written


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise NanoMedusaError(f"--shard {shard!r} is not of the form i/n with 0 <= i < n; e.g. --shard 0/4.")
    return index, count


def finished_ids(path: Path) -> set[str]:
    """Ids already answered in `path`; a line torn by an interruption is cut off first."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    ids = set()
    for n, line in enumerate(data.decode("utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NanoMedusaError(f"{path} line {n} is not a distilled answer with an id; remove it or choose another --out.") from None
    return ids

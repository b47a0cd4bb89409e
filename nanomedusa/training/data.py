"""Training data: read conversations, render them with the model's chat template, batch them.

Accepted files, a JSON array (`.json`) or one JSON object per line (anything else):

  * ShareGPT: {"id": ..., "conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
  * OpenAI:   {"id": ..., "messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
  * prompts:  {"id": ..., "source": ..., "prompt": ...}  (questions without answers, for self-distillation)

`tokenize_conversation` turns a conversation into `input_ids` and `labels`, with labels -100 except on
assistant tokens (each answer and the end-of-turn marker after it; not the marker after an answer a record
marks "truncated", which distillation cut before the model ended it). The whole conversation is rendered
and tokenized at once (as the model will see it), and each answer's span is found by rendering and
tokenizing the prefixes around it:

    tokens(render(msgs[:i], generation prompt)) = ids[:start]   answer i is ids[start:end]
    tokens(render(msgs[:i+1]))                  = ids[:end]

Several files train together as a mix (`mix_examples`): each file's answered conversations are split into
train / held-out on its own (`train_eval_split`, which tree_tuning.py and calibration.py use to find the
held-out part again; by default by a hash of each conversation's id and the seed, so a file that grows keeps
every conversation on its side; the heads record how, and the tools follow them, `held_out_split`), and its training
examples are repeated or thinned by its weight, so a small but important source (open-ended chat) can count for
more than a large one (math word problems). Examples are cut at --max-len or the model's context, whichever is
shorter (`example_length`).

`StepSampler` decides which examples each rank sees at each optimizer step: a fixed function of
(seed, step), so a resumed run continues exactly where it stopped, and the same global batch is cut
the same way whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import NanoMedusaError
from ..files import check_utf8, read_utf8

IGNORE = -100  # label of a token that is not trained on (cross_entropy's ignore_index)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # [{"role": "user"|"assistant"|"system", "content": str}]
    truncated: bool = False  # its last answer was cut (at distillation's --max-new-tokens) before the model ended it


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE or the token id itself


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs from a .json array or a JSON-lines file; `where` names the line for errors."""
    path = Path(path)
    if not path.is_file():
        raise NanoMedusaError(f"data file {path} does not exist; check the --data path.")
    text = read_utf8(path)
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            # A first record that ends with line 1: JSON lines, which a .json name promises not to hold.
            fix = ("a file of one record per line must be named .jsonl" if (e.msg, e.lineno) == ("Extra data", 2)
                   else "fix the file or use JSON lines")
            raise NanoMedusaError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}.") from None
        except RecursionError:
            raise NanoMedusaError(f"{path} nests its JSON too deeply to read; fix the file.") from None
        if not isinstance(items, list):
            raise NanoMedusaError(f"{path} holds a JSON {type(items).__name__}, not a list of records; wrap the "
                                  f"records in [...].")
        records = [(f"{path} record {i + 1}", item) for i, item in enumerate(items)]
    else:
        records = []
        # Split on "\n" only: str.splitlines() would also cut at U+2028 and friends, which JSON strings may hold.
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise NanoMedusaError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove that "
                                      f"line.") from None
            except RecursionError:
                raise NanoMedusaError(f"{path} line {n} nests its JSON too deeply to read; fix or remove that "
                                      f"line.") from None
    for where, record in records:
        if not isinstance(record, dict):
            raise NanoMedusaError(f"{where} is not a JSON object; give each record as {{\"conversations\": [...]}} or "
                                  f"similar.")
    return records


def to_conversation(where: str, record: dict, index: int) -> Conversation:
    """One record (any accepted format) as a list of {role, content} messages."""
    if "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    elif "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    elif "prompt" in record:
        turns, role_key, text_key = [{"role": "user", "content": record["prompt"]}], "role", "content"
    else:
        raise NanoMedusaError(f"{where} has none of conversations, messages or prompt; use ShareGPT, OpenAI messages "
                              f"or prompt records.")
    if not isinstance(turns, list):
        raise NanoMedusaError(f"{where} has turns that are not a list; give the turns as a JSON list.")
    messages = []
    for turn in turns:
        name = turn.get(role_key) if isinstance(turn, dict) else None
        role = ROLES.get(name) if isinstance(name, str) else None
        if role is None or not isinstance(turn.get(text_key), str):
            raise NanoMedusaError(f"{where} has a turn {str(turn)[:60]!r} that is not a {{{role_key}, {text_key}}} "
                                  f"pair with a known role; use human/gpt/system or user/assistant/system.")
        messages.append({"role": role, "content": turn[text_key]})
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)  # an answer with no question (ShareGPT dumps have some) cannot be rendered
    conversation = Conversation(str(record.get("id", index)), messages, record.get("truncated") is True)
    for text in [conversation.id] + [m["content"] for m in messages]:  # (JSON may escape half a surrogate pair)
        check_utf8(where, text, fix="fix or remove that record")
    return conversation


def load_conversations(path: str | Path) -> list[Conversation]:
    return [to_conversation(where, record, i) for i, (where, record) in enumerate(read_records(path))]


def prompt_messages(conversation: Conversation) -> list[dict]:
    """The messages before the first answer: what the model is asked (for self-distillation)."""
    roles = [m["role"] for m in conversation.messages]
    end = roles.index("assistant") if "assistant" in roles else len(roles)
    return conversation.messages[:end]


MERGED_REASON = ("an answer whose first token merges with the chat template's last when tokenized, as one opening "
                 "with a blank line can")


class MergedAnswer(NanoMedusaError):
    """An answer's first token merged with the chat template's last when the conversation was tokenized whole (an
    answer opening with a blank line: SmolLM2's tokenizer takes the newlines of "assistant\n" + "\n\n..." together), so
    the prompt's tokens are not a prefix of the conversation's: that one answer cannot be located (tokenize_all leaves
    its conversation out)."""

    def __init__(self):
        super().__init__(f"the conversation has {MERGED_REASON}; leave it out.")


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int, truncated: bool = False) -> Example | None:
    """-> Example truncated to max_len tokens, or None if no answer token is left to train on; raises MergedAnswer for
    an answer whose first token merged with the template's, and the template's error where it does not render a
    conversation as a prefix of its continuation. A `truncated` conversation's last answer ends without the
    end-of-turn marker, which its model never wrote: trained on, it would teach answers to end mid-sentence."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        return None

    # encode_chat decides about BOS as generation does; the same decision then applies to every prefix.
    first_prompt = tokenizer.encode_chat(messages[: answers[0]])
    bos = first_prompt[: len(first_prompt) - len(_encode(tokenizer, messages[: answers[0]], True, []))]
    ids = _encode_through(tokenizer, messages[: answers[-1] + 1], bos, truncated)
    labels = [IGNORE] * len(ids)
    for i in answers:
        prompt = _encode(tokenizer, messages[:i], True, bos)
        if len(prompt) >= max_len:
            break
        through = _encode_through(tokenizer, messages[: i + 1], bos, truncated and i == answers[-1])
        if ids[: len(prompt)] != prompt or ids[: len(through)] != through:
            if ids[: len(prompt) - 1] == prompt[:-1] and ids[: len(through)] == through:  # only the prompt's last token
                raise MergedAnswer
            raise NanoMedusaError("the model's chat template does not render (and tokenize) a conversation as a "
                                  "prefix of its continuation, so answers cannot be located; train with a ChatML-style "
                                  "model.")
        labels[len(prompt): len(through)] = ids[len(prompt): len(through)]
    ids, labels = ids[:max_len], labels[:max_len]
    # Position 0 is never a target (nothing precedes it), so an example needs an answer token after it.
    if not any(label != IGNORE for label in labels[1:]):
        return None
    return Example(ids, labels)


def _encode(tokenizer, messages: list[dict], generation_prompt: bool, bos: list[int]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return bos + tokenizer.encode(text, add_bos=False)


def _encode_through(tokenizer, messages: list[dict], bos: list[int], truncated: bool) -> list[int]:
    """The tokens through the last message, an answer: its end-of-turn marker too unless it was `truncated`, when it
    ends as the model left it (the prompt, then the answer's text)."""
    if not truncated:
        return _encode(tokenizer, messages, False, bos)
    text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True) + messages[-1]["content"]
    return bos + tokenizer.encode(text, add_bos=False)


def tokenize_all(tokenizer, conversations: list[Conversation], max_len: int, progress: bool = False,
                 left_out: Counter | None = None) -> list[Example]:
    """-> the examples of the conversations that have an answer token to train on. One with an answer that merged
    with the template (MergedAnswer) is left out too, not the run: a few answers open with a blank line. `left_out`,
    where given, counts those left out by reason: "cut" (no answer token within max_len, or no answer) and
    "merged"."""
    from tqdm import tqdm

    left_out = Counter() if left_out is None else left_out
    examples = []
    for c in tqdm(conversations, desc="tokenizing", disable=not progress, leave=False):
        try:
            example = tokenize_conversation(tokenizer, c.messages, max_len, c.truncated)
        except MergedAnswer:
            left_out["merged"] += 1
            continue
        if example is None:
            left_out["cut"] += 1
        else:
            examples.append(example)
    return examples


def tokenize_held_out(tokenizer, conversations: list[Conversation], max_len: int, where: str,
                      say=print) -> list[Example]:
    """tokenize_all for the tools that measure on held-out conversations (tree tuning, calibration): `say` gets a
    note when some of `where`'s are left out because an answer merged with the template."""
    left_out = Counter()
    examples = tokenize_all(tokenizer, conversations, max_len, left_out=left_out)
    if n := left_out["merged"]:
        say(f"[note] {n} of {where} {'has' if n == 1 else 'have'} {MERGED_REASON}; {'it is' if n == 1 else 'they are'} "
            f"left out.")
    return examples


# How a file's held-out share is chosen (train_eval_split): "id" by each conversation's id, "position" by its place in
# the file, the only way of earlier versions, kept for the heads they trained (the shipped ones).
SPLITS = ("id", "position")
EVAL_FRACTION = 0.02  # train.py's default held-out share


def split_by_position(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a held-out share of `items`, the first ones of a permutation chosen by `seed` alone (the
    same on every rank and every run, as long as the items are the same, in the same order)."""
    n = len(items)
    n_eval = min(max(round(n * eval_fraction), 1), n - 1) if eval_fraction > 0 and n >= 2 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in sorted(order[n_eval:])], [items[i] for i in sorted(order[:n_eval])]


def held_out_share(conversation_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, id) alone: split by id holds a conversation out where it is below
    --eval-fraction, whatever else the file holds."""
    digest = hashlib.blake2b(f"{seed}\n{conversation_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def split_by_id(items: list, ids: list[str], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): the items whose id's `held_out_share` is below `eval_fraction` held out, so a file that
    grows or is reordered keeps every conversation on its side (records without an id are named by their line
    number, load_conversations: those keep their side only where lines are appended). A file of two or more items
    keeps at least one on each side (its lowest share held out, its highest trained on): that one can change side as
    the file grows. Only a small file is likely to need it: at 0.02, a file of 30 conversations has none below the
    threshold 55% of the time, one of 150 5% of the time."""
    if eval_fraction <= 0 or len(items) < 2:
        return list(items), []
    shares = [held_out_share(i, seed) for i in ids]
    held = {j for j, share in enumerate(shares) if share < eval_fraction}
    by_share = sorted(range(len(items)), key=shares.__getitem__)
    if not held:
        held = {by_share[0]}
    elif len(held) == len(items):
        held.remove(by_share[-1])
    return [x for j, x in enumerate(items) if j not in held], [x for j, x in enumerate(items) if j in held]


def train_eval_split(conversations: list[Conversation], eval_fraction: float, seed: int,
                     split: str = "id") -> tuple[list[Conversation], list[Conversation]]:
    """(training, held-out) conversations of one data file, as train.py splits them (`split`, one of SPLITS): only
    the answered ones, so that prompts not yet answered (nothing to train or measure on) move no answer between the
    two."""
    if split not in SPLITS:
        raise NanoMedusaError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    answered = [c for c in conversations if any(m["role"] == "assistant" for m in c.messages)]
    if split == "position":
        return split_by_position(answered, eval_fraction, seed)
    return split_by_id(answered, [c.id for c in answered], eval_fraction, seed)


def add_split_flag(parser) -> None:
    """--split, for the command lines that split --data files as train.py does (train.py, tree tuning, calibration)."""
    parser.add_argument("--split", default=None, choices=SPLITS,
                        help="how each --data file's held-out share is chosen: id (by a hash of each conversation's id "
                             "and --seed, or its line number where a record has no id: a file that grows keeps every "
                             "conversation on its side) or position (a seeded shuffle of the file's order, as earlier "
                             "versions split); default: the split the heads were trained with, which their config.json "
                             "records (position for heads that record none), else id")


def add_held_out_flags(parser) -> None:
    """--eval-fraction, --seed and --split, for the tools that measure heads on the split train.py held out (tree
    tuning, calibration): each defaults to the heads' own, which their config.json records (`held_out_split`)."""
    parser.add_argument("--eval-fraction", type=float, default=None,
                        help=f"the held-out share of each --data file (default: the heads' own, else {EVAL_FRACTION})")
    parser.add_argument("--seed", type=int, default=None,
                        help="the seed of that split (default: the heads' own, else 0)")
    add_split_flag(parser)


def held_out_split(recorded: dict | None, eval_fraction: float | None, seed: int | None, split: str | None, *,
                   reads_heads: bool = True) -> tuple[float, int, str]:
    """(eval_fraction, seed, split) of a run that measures heads on the split train.py held out, or trains them on:
    each as given (None: not), else as the heads record (`recorded`, their config's held_out; `reads_heads` False:
    the run has no heads), else train.py's default. Heads trained on every conversation (eval_fraction 0) give the
    default share, and a note (`held_out_split_notes`)."""
    recorded = recorded or {}
    if eval_fraction is None:
        eval_fraction = _recorded(recorded, "eval_fraction", EVAL_FRACTION, "--eval-fraction",
                                  lambda v: type(v) in (int, float) and 0 <= v < 1) or EVAL_FRACTION
    if seed is None:
        seed = _recorded(recorded, "seed", 0, "--seed", lambda v: type(v) is int and 0 <= v < 2 ** 32)
    return eval_fraction, seed, split_of(split, recorded, reads_heads=reads_heads)


def split_of(given: str | None, recorded: dict | None, *, reads_heads: bool = True) -> str:
    """The split a run uses: `given` (--split); else, for a run that reads heads, the one they were trained with:
    `recorded`, their config's held_out, says; heads without a record, or one from before it named the split, come
    from versions that split by position only; else, for new heads, by id."""
    if given:
        return given
    if not reads_heads:
        return "id"
    return _recorded(recorded or {}, "split", "position", "--split", lambda v: v in SPLITS)


def _recorded(recorded: dict, key: str, default, flag: str, valid: Callable[[object], bool]):
    value = recorded.get(key, default)
    if not valid(value):  # (a hand-edited config.json: train.py records only values it checked)
        raise NanoMedusaError(f"the heads' config.json has held_out.{key} {value!r}, which is no {flag}; fix it, or "
                              f"pass {flag}.")
    return value


TRAINED_ON = "if --data are the files the heads were trained on, this run measures conversations they were trained on"


def held_out_split_notes(recorded: dict | None, eval_fraction: float, seed: int, chat_format: str | None,
                         split: str | None, trained_on: str = TRAINED_ON) -> list[str]:
    """What a run that measures heads on train.py's held-out split (tree tuning, calibration, or training that
    continues from them) should tell its user where its split or prompt format is not the one the heads were trained
    with (`recorded`: their config's held_out; None: not recorded; `chat_format`: this run's, or None where the
    prompts' format plays no part; `split`: this run's way of splitting, one of SPLITS, or None where it measures
    whole files, so only the format counts; `trained_on`: what that means for this run). Another way of splitting,
    another seed, or a larger share reaches conversations the heads were trained on, if the files are theirs."""
    if not recorded:
        return []
    notes = []
    if chat_format is not None and recorded.get("chat_format", chat_format) != chat_format:
        notes.append(f"the heads were trained on prompts in the {recorded['chat_format']} format and this run renders "
                     f"them as {chat_format}, so what it measures describes another format; pass --chat-format "
                     f"{recorded['chat_format']}")
    if split is None:
        return notes
    if recorded.get("eval_fraction") == 0:
        notes.append(f"the heads were trained with --eval-fraction 0, on every conversation: {trained_on}; measure "
                     f"on other answers")
    elif (theirs := split_of(None, recorded)) != split:
        notes.append(f"the heads were trained with --split {theirs} and this run has {split}: {trained_on}; pass "
                     f"--split {theirs}")
    elif recorded.get("seed", seed) != seed:
        notes.append(f"the heads were trained with --seed {recorded['seed']} and this run has {seed}: {trained_on}; "
                     f"pass --seed {recorded['seed']}")
    elif recorded.get("eval_fraction", eval_fraction) < eval_fraction:
        notes.append(f"the heads were trained with --eval-fraction {recorded['eval_fraction']} and this run holds out "
                     f"{eval_fraction}: {trained_on}; pass --eval-fraction {recorded['eval_fraction']} or less")
    return notes


def example_length(max_len: int, context: int, say=print) -> int:
    """Tokens kept per example: --max-len, or the model's context where that is shorter, as positions past it never
    occur in decoding (the cache stops there). `say` gets a note when the context cuts."""
    length = min(max_len, context)
    if length < max_len:
        say(f"[note] examples are cut at the model's context of {length} tokens, not --max-len {max_len}")
    return length


def mix_examples(sources: list[list[Example]], weights: list[float], seed: int) -> list[Example]:
    """The training set of a weighted mix: weight w keeps a file's examples floor(w) times, plus a
    share w - floor(w) of them chosen by `seed` (0.5 keeps a random half, 2 repeats every example)."""
    mixed = []
    for i, (examples, weight) in enumerate(zip(sources, weights)):
        whole, part = divmod(weight, 1.0)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + i)).tolist()
        mixed += examples * int(whole) + [examples[j] for j in sorted(order[: round(part * len(examples))])]
    return mixed


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] token ids, right-padded
    labels: torch.Tensor  # [B, T] IGNORE on prompt and padding

    def to(self, device) -> Batch:
        return Batch(self.tokens.to(device, non_blocking=True), self.labels.to(device, non_blocking=True))


def collate(examples: list[Example], pad_id: int = 0, multiple: int = 64) -> Batch:
    """Right-pad to the longest example, rounded up to `multiple` so that few distinct shapes reach
    the GPU (attention backends plan per shape); causal attention keeps padding out of real positions."""
    if not examples:  # a rank with nothing left to evaluate still joins the collective forward
        return Batch(torch.full((1, 1), pad_id), torch.full((1, 1), IGNORE))
    T = -(-max(len(e.input_ids) for e in examples) // multiple) * multiple
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        tokens[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[b, : len(e.labels)] = torch.tensor(e.labels)
    return Batch(tokens, labels)


class StepSampler:
    """Example indices per optimizer step: shuffled per epoch by (seed, epoch), last partial batch dropped.

    A step takes `global_batch = batch_size * grad_accum * world` examples, viewed as
    [grad_accum, world, batch_size]: micro-batch j of rank r is row [j, r].
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int):
        self.n, self.batch_size, self.grad_accum = n, batch_size, grad_accum
        self.world, self.rank, self.seed = world, rank, seed
        self.global_batch = batch_size * grad_accum * world
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise NanoMedusaError(f"the training split has {n} examples, fewer than one global batch of "
                                  f"{self.global_batch} (batch size x grad accum x processes); lower --batch-size or "
                                  f"--grad-accum.")
        self._epoch, self._order = -1, None

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=generator)
        chunk = self._order[i * self.global_batch: (i + 1) * self.global_batch]
        return chunk.view(self.grad_accum, self.world, self.batch_size)[:, self.rank].tolist()


def eval_batches(n: int, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's share of 0..n-1 in batches; every rank gets the same number (some maybe empty)."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    return [mine[i: i + batch_size] for i in range(0, per_rank, batch_size)]

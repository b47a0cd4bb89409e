"""Static against dynamic trees offline, on a CPU: exact greedy accepted lengths, and node-scoring rules fitted
on a tuning set.

    python -m bench.dynamic_trees_offline                       # the Medusa-1 and -2 heads, default sets, N = 16..128
    python -m bench.dynamic_trees_offline --validate 3          # first: the simulator against the real engine
    python -m bench.dynamic_trees_offline --heads weights/smollm2-135m-instruct-medusa --budgets 32,64 \\
        --eval bench/prompts-chat-heldout.jsonl:24 --tune /tmp/held-chat.jsonl:48 --max-new-tokens 128

It models Medusa's heads, whose guesses do not depend on the tree's path: heads that read their path (the default
weights/smollm2-135m-instruct-medusa-path, the third shipped heads) are refused before anything runs;
`python -m bench.path_trees_offline` simulates those (and `python -m bench.dynamic_trees` measures them on a GPU).

The tuning sets are prompts whose answers the heads' training held out (never the evaluation sets); --heads tells
calibration how that training split them (the shipped heads' by position):

    python -m nanomedusa.calibration --heads weights/smollm2-135m-instruct-medusa \
        --held-out-prompts ../shared/data/prompts-chat-train.jsonl --out /tmp/held-chat.jsonl
    python -m nanomedusa.calibration --heads weights/smollm2-135m-instruct-medusa \
        --held-out-prompts ../shared/data/prompts-train.jsonl --out /tmp/held-train.jsonl

Why it is exact for greedy decoding. Greedy Medusa emits plain greedy decoding's tokens c_0 c_1 ... c_{L-1}
(c_0 from the prefill). A step whose root is c_i verifies a tree whose depth-d nodes guess c_{i+d}: the heads
read the base model's hidden state at the position before the root, which is the teacher-forced hidden state
of prompt + c at that position. The step accepts the deepest tree node all of whose guesses are right, n
guesses, and emits c_{i+1} .. c_{i+n+1} (the bonus token included), so the next root is c_{i+n+1}. So one
plain greedy run and one teacher-forced forward over prompt + c give each root position's top-k guesses and
calibrated log-probabilities (a `Trace`), and a tree rule's steps follow from them without running the tree:
mean accepted = (L - 1) / steps, summed over prompts (bench/prompts.py's `totals`; the root's token is each
step's +1). Guesses past the end of c are counted wrong: a step reaching them ends the run either way.
`--validate` checks all of it against `generate_medusa` (torch kernels, float32): same tokens, same steps.

Node-scoring rules. A rule maps the heads' calibrated log-probabilities [K, k] ("features": and the step's
context) to per-guess increments <= 0; a node's score is the sum of its path's increments and the N best
superset nodes are verified (ties to the smaller node index), so the chosen nodes always form a tree
(dynamic_tree.py's argument). Each rule turns the log-probabilities (and "features" the context too) into
increments before `DynamicTree.choose`, from a small table:

  static         the heads' static tree of N nodes (`tree_from_head_accuracies`), the baseline
  dynamic        the shipped rule: increment = lp, the calibrated log-probability (`DynamicTree.choose` as it is)
  depth-bias     increment = lp + b_d, b per head d, fitted per N to the tuning set's mean accepted length
  conditional    increment = log sigmoid(a_d lp + b_d log(1 - p) + c_d): head d's chance of being right GIVEN
                 that its parent path is right (the heads' errors are correlated, so it is above the marginal
                 calibration), fitted per head by logistic regression (beta calibration) on the tuning set's
                 superset nodes whose parent is right
  binned         increment = log P(right | parent right, lp's bin): the same, as a monotone (isotonic) table
                 over BIN_EDGES per head
  prior-ratio    increment = log acc_d,r + alpha (lp - mean lp_d,r): the static tree's path accuracy moved by
                 this step's confidence against its tuning-set mean, alpha fitted per N
  features       increment = log sigmoid(w_d . x): "conditional" with everything else a step could see before it
                 chooses (`guess_features`): the guess's rank, its head's top-1 and top-k mass and entropy, the
                 previous head's top-1, the base model's own top-1 log-probability and entropy at the root;
                 fitted per head by logistic regression like "conditional"
  oracle         the deepest right superset node, whatever N (a ceiling for any rule over this superset)
  ceiling        the deepest right path among the heads' top-10 guesses (a ceiling for any tree)

Traces are cached under --cache (per heads, prompt file, prompt id, --max-new-tokens and --chat-format): a full
run generates about 35k tokens per heads once, over an hour on a CPU, a few minutes on a GPU (`--trace-device cuda
--trace-only`, then copy the cache back); later runs only simulate. The cache does not record where a trace was
made: a GPU's float32 can break a near tie of two tokens otherwise than a CPU's, so `--validate` (which checks the
simulator against the CPU engine) is worth running on GPU-made traces.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from nanomedusa.cli import (ArgumentParser, add_chat_format_flag, check_at_least, check_input_dir, check_input_file,
                            check_output_file, exit_with, run_reporting_errors)
from nanomedusa.decoder import Decoder
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.errors import NanoMedusaError
from nanomedusa.files import read_utf8
from nanomedusa.generation import generate
from nanomedusa.heads import HeadsConfig, load_heads_and_adapter
from nanomedusa.loading import load_model, resolve_checkpoint
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.tokenizer import Tokenizer, load_tokenizer
from nanomedusa.tree import TreeBuffers, tree_from_head_accuracies

from .checks import heads_read_path, int_list
from .report import save

HEADS = ["weights/smollm2-135m-instruct-medusa", "weights/smollm2-135m-instruct-medusa2"]
EVAL = ["bench/prompts-chat-heldout.jsonl:48", "bench/prompts-train-mix.jsonl:20"]
TUNE = ["/tmp/held-chat.jsonl:150", "/tmp/held-train.jsonl:100"]
TOPK = 10  # guesses per head kept in a trace: the superset's ranks reach 9


# ------------------------------------------------------------------------------------------------ traces


@dataclass
class Trace:
    """One prompt's plain greedy continuation and, at each root position i, the heads' guesses."""

    tokens: torch.Tensor  # [L] long: c_0 .. c_{L-1}
    ids: torch.Tensor  # [L, K, TOPK] long: each head's top-k at root c_i (head d guesses c_{i+d+1})
    logprobs: torch.Tensor  # [L, K, TOPK] float32: their calibrated log-probabilities (the engine's)
    context: torch.Tensor  # [L, 2 + K] float32: the base model's top-1 log-prob and entropy there, each head's entropy


def split_spec(flag: str, spec: str) -> tuple[str, int | None]:
    """'FILE[:N]' (--eval, --tune) -> (FILE, N or None for all), or an error naming the fix."""
    path, colon, limit = spec.partition(":")
    if (colon and not limit.isdigit()) or (limit.isdigit() and int(limit) < 1):
        raise NanoMedusaError(f"{flag} {spec!r} is not FILE or FILE:N with N a count of prompts of at least 1; pass "
                              f"e.g. {path}:24.")
    return path, int(limit) if limit else None


def read_prompt_set(spec: str) -> tuple[str, list[tuple[str, list[dict]]]]:
    """'FILE[:N]' -> (FILE, the first N (id, chat messages)): {"id", "prompt"} lines (bench/) or {"id",
    "messages"} lines (calibration.py --held-out-prompts)."""
    path, limit = split_spec("--eval/--tune", spec)
    records = [json.loads(line) for line in read_utf8(path).split("\n") if line.strip()]
    prompts = [(str(r["id"]), r.get("messages") or [{"role": "user", "content": r["prompt"]}]) for r in records]
    return path, prompts[:limit]


@torch.inference_mode()
def make_trace(model, heads, decoder: Decoder, prompt_ids: list[int], max_new_tokens: int, eos_ids) -> Trace:
    """Plain greedy decoding, then one teacher-forced forward over prompt + continuation for the heads."""
    tokens = generate(decoder, prompt_ids, max_new_tokens, eos_ids=eos_ids).tokens
    P = len(prompt_ids)
    hidden = model.forward_hidden(torch.tensor([prompt_ids + tokens], device=model.device), prefix_len=0)[0]
    hidden = hidden[P - 1: P - 1 + len(tokens)]  # [L, D]: where each root c_i was predicted
    ids, logprobs = heads.topk_logprobs(hidden, TOPK, model.lm_head.weight)
    base = F.log_softmax(model.logits(hidden), -1)  # [L, V] (model.logits is float32)
    temperatures = heads.config.temperatures()
    head_lp = torch.stack([F.log_softmax(heads.head_logits(k, hidden, model.lm_head.weight) / t, -1)
                           for k, t in enumerate(temperatures)])  # [K, L, V]: calibrated, as topk_logprobs
    context = torch.cat([base.max(-1).values[:, None], entropy(base)[:, None], entropy(head_lp).T], 1)
    return Trace(torch.tensor(tokens), ids.transpose(0, 1).contiguous().cpu(),
                 logprobs.transpose(0, 1).contiguous().cpu(), context.cpu())


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """[..., V] log-probabilities -> [...] entropies in nats (a token of probability 0 adds 0, not NaN)."""
    return torch.special.entr(logprobs.exp()).sum(-1)


def trace_format_suffix(chat_format: str) -> str:
    """The cache file names' mark of --chat-format: another format is other prompts, so other traces. The default
    model's own format, found by `auto` or named, has none, the name its traces had before the flag existed."""
    if chat_format == "auto":  # (no model needed: a cache copied from a GPU machine serves without one)
        return ""
    own = Tokenizer.from_dir(resolve_checkpoint(None)).chat.preset  # (the tokenizer only: no weights load)
    return "" if chat_format == own else f"--{chat_format}"


def load_traces(heads_dir: str, specs: list[str], max_new_tokens: int, cache: Path, chat_format: str = "auto",
                device: str = "cpu") -> dict[str, list[Trace]]:
    """{prompt file: its traces}, from the cache where there, else generated (and cached) on `device`, in
    float32 with the torch kernels (on a GPU in graphed steps: minutes where a CPU takes an hour), from prompts
    rendered in `chat_format` (--chat-format)."""
    out, model = {}, None
    fmt = trace_format_suffix(chat_format)
    for spec in specs:
        path, prompts = read_prompt_set(spec)
        cache_file = cache / f"{Path(heads_dir).name}--{Path(path).stem}--{max_new_tokens}{fmt}.pt"
        cached = torch.load(cache_file) if cache_file.is_file() else {}
        # An entry cached before traces kept their context is traced again.
        missing = [(i, messages) for i, messages in prompts if "context" not in cached.get(i, {})]
        if missing and model is None:
            kernels.set_backend("torch")
            model, checkpoint = load_model(None, device=device, dtype=torch.float32)
            heads = load_heads_and_adapter(heads_dir, model)
            tokenizer, decoder = load_tokenizer(checkpoint, chat_format), Decoder(model)
        for n, (i, messages) in enumerate(missing, 1):
            trace = make_trace(model, heads, decoder, tokenizer.encode_chat(messages), max_new_tokens, tokenizer.eos_ids)
            cached[i] = vars(trace)
            print(f"  traced {Path(heads_dir).name} {path} {n}/{len(missing)} {i}: {len(trace.tokens)} tokens", flush=True)
            if n % 8 == 0 or n == len(missing):
                cache.mkdir(parents=True, exist_ok=True)
                torch.save(cached, cache_file)
        out[path] = [Trace(**cached[i]) for i, _ in prompts]
    return out


# ------------------------------------------------------------------------------------------------ simulation


@dataclass
class Superset:
    """The dynamic tree's candidate nodes (the heads' 256-node accuracy tree)."""

    paths: list[list[int]]  # node order, the root's [] first
    ranks: torch.Tensor  # [M, D] long, -1 padded
    depth: torch.Tensor  # [M] long

    @classmethod
    def for_heads(cls, config: HeadsConfig) -> Superset:
        tree = DynamicTree.for_heads(config, 16)  # the superset does not depend on N (any N >= its depth + 1)
        return cls(tree.superset.paths, tree.ranks, (tree.ranks >= 0).sum(1))

    def nodes_of(self, paths: list[list[int]]) -> torch.Tensor:
        """The superset node ids [len(paths)] of some of its paths."""
        index = {tuple(p): n for n, p in enumerate(self.paths)}
        return torch.tensor([index[tuple(p)] for p in paths])


@dataclass
class Positions:
    """Every root position of a set of traces, stacked: what a rule's choice is computed on at once."""

    traces: list[Trace]
    logprobs: torch.Tensor  # [P, K, TOPK]
    context: torch.Tensor  # [P, 2 + K]
    hit: torch.Tensor  # [P, K, TOPK] bool: the guess is the true token
    node_right: torch.Tensor  # [P, M] bool: all the superset node's guesses are right

    @classmethod
    def of(cls, traces: list[Trace], superset: Superset) -> Positions:
        hits = []
        for t in traces:
            L, K = t.ids.shape[:2]
            future = torch.full((L + K + 1,), -1, dtype=torch.long)
            future[:L] = t.tokens
            truth = torch.stack([future[1 + d: 1 + d + L] for d in range(K)], 1)  # [L, K]: c_{i+d+1}, -1 past the end
            hits.append(t.ids == truth[:, :, None])
        hit = torch.cat(hits)
        right = torch.ones(len(hit), len(superset.paths), dtype=torch.bool)
        for d in range(superset.ranks.shape[1]):
            has = superset.ranks[:, d] >= 0
            right &= ~has | hit[:, d].gather(1, superset.ranks[:, d].clamp(min=0).expand(len(hit), -1))
        return cls(traces, torch.cat([t.logprobs for t in traces]), torch.cat([t.context for t in traces]), hit, right)


def choose(increments: torch.Tensor, superset: Superset, num_nodes: int) -> torch.Tensor:
    """increments [P, K, TOPK] -> the chosen superset nodes [P, M] bool: `tree_choice_reference`'s choice
    (scores summed root first in float32, each increment clamped to <= 0, stable sort), at every position."""
    P, M = len(increments), len(superset.paths)
    score = torch.zeros(P, M, dtype=torch.float32)
    for d in range(superset.ranks.shape[1]):
        has = superset.ranks[:, d] >= 0
        x = increments[:, d].gather(1, superset.ranks[:, d].clamp(min=0).expand(P, -1)).clamp(max=0)
        score = score + torch.where(has, x, 0)
    best = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :num_nodes]
    return torch.zeros(P, M, dtype=torch.bool).scatter_(1, best, True)


def accepted(positions: Positions, chosen: torch.Tensor, superset: Superset) -> torch.Tensor:
    """Chosen nodes [P, M] (or [M], every step alike) -> guesses accepted at each root position [P]: the
    depth of the deepest chosen node whose guesses are all right."""
    return torch.where(positions.node_right & chosen, superset.depth, 0).max(1).values


def walk(traces: list[Trace], accepted_at: torch.Tensor) -> list[tuple[int, int]]:
    """Guesses accepted at each root position [P] -> each trace's (tokens, steps), as generate_medusa runs."""
    accepted_at, out, start = accepted_at.tolist(), [], 0
    for t in traces:
        L, i, steps = len(t.tokens), 0, 0
        while i + 1 < L:  # c_0 .. c_i emitted
            i += accepted_at[start + i] + 1
            steps += 1
        out.append((L, steps))
        start += L
    return out


def mean_accepted(runs: list[tuple[int, int]]) -> float:
    """Tokens gained after each prompt's first per decoding step, summed over prompts (as bench/prompts.py)."""
    return sum(L - 1 for L, _ in runs) / max(sum(steps for _, steps in runs), 1)


# ------------------------------------------------------------------------------------------------ rules

RULES = ["static", "dynamic", "depth-bias", "conditional", "binned", "prior-ratio", "features", "oracle", "ceiling"]
# "binned"'s log-probability bins: edges between them, ascending (bin 0 below -8, the last above -0.05)
BIN_EDGES = [-8.0, -6.0, -5.0, -4.0, -3.5, -3.0, -2.5, -2.0, -1.6, -1.3, -1.0, -0.8, -0.6, -0.45, -0.3, -0.2, -0.1, -0.05]


class Rules:
    """The node-scoring rules of the module docstring, for one heads' superset; `fit` on a tuning set."""

    def __init__(self, config: HeadsConfig, superset: Superset):
        self.config, self.superset = config, superset
        self.log_acc = torch.tensor(config.rank_accuracies(), dtype=torch.float32)[:, :TOPK].clamp(min=1e-6).log()
        self.params: dict = {"depth-bias": {}, "prior-ratio": {}}

    def static_nodes(self, num_nodes: int) -> torch.Tensor:
        """The static tree of num_nodes as superset nodes [M] bool."""
        chosen = torch.zeros(len(self.superset.paths), dtype=torch.bool)
        chosen[0] = True
        chosen[self.superset.nodes_of(tree_from_head_accuracies(self.config.rank_accuracies(), num_nodes - 1))] = True
        return chosen

    def increments(self, name: str, lp: torch.Tensor, context: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """The rule's increments [P, K, TOPK] from the heads' calibrated log-probabilities lp [P, K, TOPK] (and,
        for "features", the positions' context [P, 2 + K])."""
        if name == "dynamic":
            return lp
        if name == "depth-bias":
            return lp + torch.tensor(self.params[name][num_nodes])[:, None]
        if name == "conditional":
            a, b, c = torch.tensor(self.params[name]).T[:, :, None]  # [K, 1] each
            return F.logsigmoid(a * lp + b * log1m_exp(lp) + c)
        if name == "features":
            w = torch.tensor(self.params[name])  # [K, F]
            return F.logsigmoid((guess_features(lp, context) * w[:, None]).sum(-1))
        if name == "binned":
            table = torch.tensor(self.params[name]).log()  # [K, bins]
            return table[torch.arange(lp.shape[1])[:, None], torch.bucketize(lp, torch.tensor(BIN_EDGES))]
        if name == "prior-ratio":
            return self.log_acc + self.params[name][num_nodes][0] * (lp - torch.tensor(self.params["mean-lp"]))
        raise ValueError(name)

    def accepted(self, name: str, positions: Positions, num_nodes: int) -> torch.Tensor:
        """Guesses accepted at each root position [P] with the rule's trees of num_nodes."""
        if name == "ceiling":  # the deepest path of right guesses among the heads' top-TOPK: any tree's limit
            return positions.hit.any(2).long().cumprod(1).sum(1)
        if name == "oracle":  # the deepest right superset node
            return accepted(positions, positions.node_right, self.superset)
        if name == "static":
            return accepted(positions, self.static_nodes(num_nodes), self.superset)
        increments = self.increments(name, positions.logprobs, positions.context, num_nodes)
        chosen = choose(increments, self.superset, num_nodes)
        return accepted(positions, chosen, self.superset)

    def mean_accepted(self, name: str, positions: Positions, num_nodes: int) -> float:
        return mean_accepted(walk(positions.traces, self.accepted(name, positions, num_nodes)))

    def fit(self, tune: Positions, budgets: list[int]) -> None:
        """Every rule's parameters from the tuning positions (never the evaluation sets): the calibrations by
        likelihood, the per-N ones by the tuning set's mean accepted length."""
        features = guess_features(tune.logprobs, tune.context)  # [P, K, TOPK, F]
        samples = [parent_right_samples(tune, self.superset, d, features)
                   for d in range(tune.logprobs.shape[1])]  # per head: (features [n, F], right [n])
        self.params["conditional"] = [fit_beta_calibration(x[:, 0], hit) for x, hit in samples]
        self.params["binned"] = [fit_binned(x[:, 0].contiguous(), hit) for x, hit in samples]
        self.params["features"] = [fit_logistic(x, hit, l2=1e-3, max_iter=300) for x, hit in samples]
        self.params["mean-lp"] = tune.logprobs.mean(0).tolist()  # [K, TOPK]
        for N in budgets:
            for name, start, grid in (("depth-bias", [0.0] * len(samples), [x / 4 for x in range(-4, 13)]),
                                      ("prior-ratio", [1.0], [x / 10 for x in range(0, 21)])):
                def objective(values, name=name, N=N):
                    self.params[name][N] = values
                    return self.mean_accepted(name, tune, N)

                self.params[name][N] = coordinate_search(objective, start, grid)


def log1m_exp(lp: torch.Tensor) -> torch.Tensor:
    """log(1 - p) from lp = log p <= 0 (p kept below 1 - 1e-6)."""
    return torch.log1p(-lp.exp().clamp(max=1 - 1e-6))


def guess_features(lp: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """What a step knows of each guess before it chooses -> [P, K, TOPK, F], the calibrated log-probability
    first: lp, log(1 - p), the head's top-1 lp, the log of its top-TOPK mass, the previous head's top-1 lp (0
    for head 0), the base model's top-1 lp and entropy at the root, the head's entropy, and the rank one-hot
    (which also gives the intercept: its columns sum to 1)."""
    P, K, R = lp.shape
    per_guess = [lp, log1m_exp(lp), lp[:, :, :1], torch.logsumexp(lp, 2, keepdim=True),
                 F.pad(lp[:, :-1, :1], (0, 0, 1, 0)), context[:, None, None, 0], context[:, None, None, 1],
                 context[:, 2:, None]]
    ranks = F.one_hot(torch.arange(R), R).float().expand(P, K, R, R)
    return torch.cat([torch.stack([x.expand(P, K, R) for x in per_guess], -1), ranks], -1)


def parent_right_samples(tune: Positions, superset: Superset, d: int,
                         values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head d's guesses that some superset node at depth d + 1 makes where its parent's guesses are all right:
    (their `values` [P, K, TOPK, ...] -> [n, ...], whether each is right [n]). At most one parent path is right
    at a position, so each (position, rank) counts once."""
    parent_of = {tuple(p): n for n, p in enumerate(superset.paths)}
    nodes = (superset.depth == d + 1).nonzero()[:, 0]
    parents = torch.tensor([parent_of[tuple(superset.paths[n][:-1])] for n in nodes.tolist()])
    rank = superset.ranks[nodes, d]
    ok = tune.node_right[:, parents]  # [P, n]
    return values[:, d][:, rank][ok], tune.hit[:, d][:, rank][ok]


def fit_beta_calibration(lp: torch.Tensor, hit: torch.Tensor) -> list[float]:
    """(a, b, c) maximising the likelihood of P(right) = sigmoid(a log p + b log(1 - p) + c) (beta calibration,
    Kull et al. 2017: it keeps p = 0 and p = 1 where they are when a, -b > 0), by logistic regression."""
    return fit_logistic(torch.stack([lp, log1m_exp(lp), torch.ones_like(lp)], 1), hit)


def fit_logistic(x: torch.Tensor, hit: torch.Tensor, l2: float = 0.0, max_iter: int = 100) -> list[float]:
    """w maximising the likelihood of P(right) = sigmoid(x @ w), less l2 |w|^2, for x [n, F] (columns of x that
    sum to 1 give the intercept)."""
    x = x.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = F.binary_cross_entropy_with_logits(x @ w, hit.double()) + l2 * (w * w).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return [round(v, 4) for v in w.tolist()]


def fit_binned(lp: torch.Tensor, hit: torch.Tensor) -> list[float]:
    """P(right) per log-probability bin (BIN_EDGES), made non-decreasing in lp by pool-adjacent-violators;
    each bin also counts one prior sample at the overall rate, so an empty bin takes its neighbours' rate."""
    bins = torch.bucketize(lp, torch.tensor(BIN_EDGES))
    n = torch.bincount(bins, minlength=len(BIN_EDGES) + 1).double() + 1
    k = torch.bincount(bins, weights=hit.double(), minlength=len(BIN_EDGES) + 1) + hit.double().mean()
    blocks = []  # [hits, count, bins in the block], ascending lp
    for hits, count in zip(k.tolist(), n.tolist()):
        blocks.append([hits, count, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            h, c, m = blocks.pop()
            blocks[-1] = [blocks[-1][0] + h, blocks[-1][1] + c, blocks[-1][2] + m]
    return [round(h / c, 5) for h, c, m in blocks for _ in range(m)]


def coordinate_search(objective, start: list[float], grid: list[float], rounds: int = 3) -> list[float]:
    """Maximise objective(values) one coordinate at a time over `grid` (ties keep the earlier best)."""
    best, best_score = list(start), objective(list(start))
    for _ in range(rounds):
        improved = False
        for j in range(len(best)):
            for x in grid:
                trial = best[:j] + [x] + best[j + 1:]
                score = objective(trial)
                if score > best_score + 1e-12:
                    best, best_score, improved = trial, score, True
        if not improved:
            break
    return best


def heads_config(heads_dir: str) -> HeadsConfig:
    raw = json.loads(read_utf8(Path(heads_dir) / "config.json"))
    fields = {k: raw[k] for k in HeadsConfig.__dataclass_fields__ if k in raw}
    # Heads trimmed by an older tree_tuning --trim kept every head's temperature: theirs are the first num_heads
    # (as MedusaHeads.load reads them).
    if fields.get("medusa_temperatures"):
        fields["medusa_temperatures"] = fields["medusa_temperatures"][: fields["num_heads"]]
    return HeadsConfig(**fields)


# ------------------------------------------------------------------------------------------------ validation


@torch.inference_mode()
def validate(heads_dir: str, spec: str, budgets: list[int], max_new_tokens: int, cache: Path,
             chat_format: str = "auto") -> bool:
    """The simulator against `generate_medusa` (torch kernels, float32) on the prompts of `spec` in `chat_format`,
    with the static and the dynamic tree of each budget: each prompt's tokens and steps must be equal."""
    traces = next(iter(load_traces(heads_dir, [spec], max_new_tokens, cache, chat_format).values()))
    kernels.set_backend("torch")
    model, checkpoint = load_model(None, device="cpu", dtype=torch.float32)
    heads = load_heads_and_adapter(heads_dir, model)
    tokenizer, decoder = load_tokenizer(checkpoint, chat_format), Decoder(model)
    superset = Superset.for_heads(heads.config)
    rules, positions = Rules(heads.config, superset), Positions.of(traces, superset)
    prompts = [tokenizer.encode_chat(messages) for _, messages in read_prompt_set(spec)[1]]
    all_equal = True
    for N in budgets:
        trees = {"static": TreeBuffers.from_choices(tree_from_head_accuracies(heads.config.rank_accuracies(), N - 1)),
                 "dynamic": DynamicTree.for_heads(heads.config, N)}
        for name, tree in trees.items():
            simulated = walk(traces, rules.accepted(name, positions, N))
            for ids, trace, (L, steps) in zip(prompts, traces, simulated):
                r = generate_medusa(decoder, heads, tree, ids, max_new_tokens, eos_ids=tokenizer.eos_ids)
                same = r.tokens == trace.tokens.tolist() and r.steps == steps
                all_equal &= same
                print(f"  validate {Path(heads_dir).name} N={N} {name}: engine {len(r.tokens)} tokens in {r.steps} "
                      f"steps (mean accepted {r.mean_accepted:.3f}), simulator {L} in {steps} "
                      f"({(L - 1) / max(steps, 1):.3f}): {'equal' if same else 'DIFFERENT'}", flush=True)
    return all_equal


# ------------------------------------------------------------------------------------------------ main


def traces_of(heads_dir: str, specs: list[str], args) -> dict[str, list[Trace]]:
    """`load_traces` with the command line's settings."""
    return load_traces(heads_dir, specs, args.max_new_tokens, args.cache, args.chat_format, args.trace_device)


def evaluate(heads_dir: str, args) -> tuple[list[dict], dict]:
    """Fit the rules on the tuning sets, then each rule's mean accepted length on each evaluation set -> (rows,
    the fitted parameters)."""
    config = heads_config(heads_dir)
    superset = Superset.for_heads(config)
    rules = Rules(config, superset)
    tune_traces = [t for ts in traces_of(heads_dir, args.tune, args).values() for t in ts]
    rules.fit(Positions.of(tune_traces, superset), args.budgets)
    print(f"{heads_dir}: rules fitted on {len(tune_traces)} tuning prompts: "
          f"{json.dumps({k: v for k, v in rules.params.items() if k != 'mean-lp'})}", flush=True)
    rows = []
    sets = {"tuning (in-sample)": tune_traces,
            **{Path(p).stem: ts for p, ts in traces_of(heads_dir, args.eval, args).items()}}
    for set_name, traces in sets.items():
        positions = Positions.of(traces, superset)
        for N in args.budgets:
            row = {"heads": Path(heads_dir).name, "set": set_name, "prompts": len(traces), "nodes": N}
            for name in RULES:
                row[name] = rules.mean_accepted(name, positions, N)
            rows.append(row)
    return rows, rules.params


def print_table(rows: list[dict]) -> None:
    print("| heads | set | N | " + " | ".join(RULES) + " |")
    print("| --- | --- | --- |" + " --- |" * len(RULES))
    for r in rows:
        cells = [f"{r[name]:.3f}" + ("" if name == "static" else f" ({r[name] / r['static']:.3f}x)") for name in RULES]
        print(f"| {r['heads']} | {r['set']} ({r['prompts']}) | {r['nodes']} | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", nargs="+", default=HEADS,
                   help="Medusa heads directories, not path-reading ones (a LoRA adapter is applied)")
    p.add_argument("--eval", nargs="+", default=EVAL, metavar="FILE[:N]", help="evaluation prompt sets, first N prompts")
    p.add_argument("--tune", nargs="+", default=TUNE, metavar="FILE[:N]", help="tuning prompt sets (the rules' fits)")
    p.add_argument("--budgets", default="16,32,64,128", help="node budgets, the root included (at least 2)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--validate", type=int, default=0, metavar="N",
                   help="instead: check the simulator against the engine on the first N prompts of the first --eval")
    p.add_argument("--cache", type=Path, default=Path("/tmp/nanomedusa-offline-traces"))
    p.add_argument("--trace-device", default="cpu",
                   help="where missing traces are made (cuda: minutes, not an hour; see the module docstring)")
    p.add_argument("--trace-only", action="store_true", help="instead: make and cache every set's traces, then stop")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and fitted parameters here")
    add_chat_format_flag(p)  # the prompts' format: the one the heads were trained on
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: (check_args(args), run(args)))


def check_args(args) -> None:
    """The paths and values, before an hour of tracing (a NanoMedusaError naming the fix); --budgets becomes ints."""
    for heads_dir in args.heads:
        check_input_dir("--heads", heads_dir)
        if heads_read_path(heads_dir):
            raise NanoMedusaError(f"--heads {heads_dir} reads its path, which this simulator does not model (its "
                                  f"heads' guesses must not depend on the tree); run python -m "
                                  f"bench.path_trees_offline --heads {heads_dir} for those.")
    args.budgets = int_list("--budgets", args.budgets, 2, what="node counts")
    check_at_least(0, {"--validate": args.validate})
    check_at_least(1, {"--max-new-tokens": args.max_new_tokens})
    if args.json is not None:
        check_output_file("--json", args.json)
    for path in (split_spec("--eval", spec)[0] for spec in args.eval):
        check_input_file("--eval", path)
    for path in (split_spec("--tune", spec)[0] for spec in args.tune if not args.validate):  # (--validate reads none)
        if not Path(path).exists():
            raise NanoMedusaError(f"--tune {path} does not exist; make the tuning sets first with python -m "
                                  f"nanomedusa.calibration --held-out-prompts (this module's docstring shows how).")
        check_input_file("--tune", path)


def run(args) -> None:
    torch.manual_seed(0)
    if args.validate:
        spec = f"{args.eval[0].partition(':')[0]}:{args.validate}"
        ok = all([validate(h, spec, args.budgets, args.max_new_tokens, args.cache, args.chat_format)
                  for h in args.heads])
        print("simulator = engine on every prompt" if ok else "the simulator DIFFERS from the engine")
        sys.exit(0 if ok else 1)
    if args.trace_only:
        for heads_dir in args.heads:
            traces_of(heads_dir, args.tune + args.eval, args)
        return
    rows, params = [], {}
    for heads_dir in args.heads:
        heads_rows, params[heads_dir] = evaluate(heads_dir, args)
        rows += heads_rows
        print_table(heads_rows)
    print(f"\nmean accepted length (tokens per step), greedy, {args.max_new_tokens} new tokens; (x) = against static:")
    print_table(rows)
    if args.json:
        save({"chat_format": args.chat_format, "rows": rows, "params": params}, args.json)  # (folder made if missing)


if __name__ == "__main__":
    exit_with(main())

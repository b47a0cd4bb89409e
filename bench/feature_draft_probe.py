"""Would a draft that reads the base model's features guess deeper than Medusa heads? An offline probe for #15.

    bash bench/gpu_run.sh distill && bash bench/gpu_run.sh draft-probe   # on a GPU: the whole run, in minutes
    python -m bench.feature_draft_probe --train A.jsonl --eval B.jsonl --limit-train 6 --device cpu   # a small one

(draft-probe: the default model's answers to the held-out bench sets, then this probe trained on the distill
stage's answers and measured on those.)

Why: #15's dynamic trees stall on the draft's strength. The default path-reading heads guess tokens t+2, t+3, t+4
right 0.55 / 0.41 / 0.39 of the time (bench/RESULTS.md), and the trees EAGLE-2 grows pay off with drafts that
are right 0.7-0.8 of the time at every depth. EAGLE (Li et al. 2024) drafts with one decoder layer that reads, at
each position j, the base model's feature f_j (its last hidden state, the one its lm_head reads) beside the next
token's embedding e(x_{j+1}), and predicts the next feature f_{j+1}; the base lm_head turns that into its guess of
x_{j+2}. Deeper guesses feed its own predicted features back in. This probe trains such a layer on --train
(teacher-forced: the base model's features in; smooth-L1 to the next feature plus `--ce-weight` x cross-entropy
on the token, per answer token; unlike EAGLE, the token target is the answer's own token, which in distilled
answers is the base model's greedy choice, not its whole distribution, and no noise is added to the features)
and measures it on --eval the way nanomedusa.tree_tuning measures heads: for each depth m, how often its rank-r
guess of token t+m+1 is the true token when the tokens before it are (what a tree's acceptance rests on; depth m
and head m - 1 are scored on the same positions and targets). Beside it, --heads measured alike, and the expected
accepted length of the best static tree of --paths paths (tree.py's greedy rule over those rank accuracies) for
each, the draft's also cut to the heads' depth.

Then #15's question itself, for this draft: the first `--sim-answers` held-out answers are decoded greedily as the
engine would, once with the draft's static tree (tree.py's rule over its rank accuracies on training answers) and
once with EAGLE-2's dynamic tree (the `--beam` likeliest nodes of each depth grow `--branch` children each; the
likeliest paths of all are kept), each drafted depth by depth as a decoder would (`TreeSimulator`) and accepted against
the answer (the base model's own greedy text): tokens a step, static against dynamic, at each of `--sim-paths` sizes.

Depth m without running m passes per position: at depth m, position j's query belongs to the chain that started at
t = j - m + 1. It sees the base model's features up to t (set 0: every position's input made from true features)
and then one input from each set s = 1 .. m - 1 (inputs made from features the draft predicted s times), the one
at position t + s. So one attention call per depth over the sets' keys, with that mask (`frontier_mask`), gives
every chain's m-th guess at once; tests/test_feature_draft_probe.py checks it against running each chain alone.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.rope_cache import apply_rope
from nanomedusa.cli import ArgumentParser, check_input_dir, check_output_file, exit_with, run_reporting_errors
from nanomedusa.config import ModelConfig, rope_inv_freq
from nanomedusa.errors import NanoMedusaError
from nanomedusa.heads import load_heads_and_adapter
from nanomedusa.training.data import IGNORE
from nanomedusa.tree import expected_accept_length, tree_from_head_accuracies
from nanomedusa.tree_tuning import rank_accuracies

from .conditioned_heads_probe import add_data_arguments, check_data_arguments, load_base_model, load_examples
from .report import print_table, save, say

DEFAULT_HEADS = "weights/smollm2-135m-instruct-medusa-path"
GRAD_CLIP = 0.5


class FeatureDraft(nn.Module):
    """EAGLE's draft: fc([e(x_{j+1}); f_j]) -> one pre-norm decoder layer of the base model's shape (causal
    attention with RoPE, SwiGLU) -> the predicted f_{j+1}."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, Dh = config.dim, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, Dh
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.attn_norm = nn.RMSNorm(D, eps=config.rms_norm_eps)
        self.wqkv = nn.Linear(D, (config.n_heads + 2 * config.n_kv_heads) * Dh, bias=False)
        self.wo = nn.Linear(config.n_heads * Dh, D, bias=False)
        self.ffn_norm = nn.RMSNorm(D, eps=config.rms_norm_eps)
        self.w13 = nn.Linear(D, 2 * config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, D, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def inputs(self, embeds, features):
        """e(x_{j+1}) [..., T, D], f_j [..., T, D] -> the layer's input at each position j [..., T, D]."""
        return self.fc(torch.cat([embeds, features], dim=-1))

    def rope(self, T: int):
        """RoPE tables cos, sin [T, Dh] for positions 0 .. T-1 (the base model's frequencies)."""
        angles = torch.outer(torch.arange(T, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # [T, Dh]
        return angles.cos(), angles.sin()

    def qkv(self, x, cos, sin):
        """x [..., T, D] -> q [..., Hq, T, Dh], k and v [..., Hkv, T, Dh], RoPE'd at positions 0 .. T-1 (the leading
        dims: a batch of answers in training, none elsewhere)."""
        *lead, T, _ = x.shape
        Dh = self.head_dim

        def heads(y, n, rotate):  # [..., T, n * Dh] -> [..., n, T, Dh]
            y = y.reshape(-1, T, n, Dh)  # [B, T, n, Dh]
            return (apply_rope(y, cos, sin) if rotate else y).transpose(1, 2).reshape(*lead, n, T, Dh)

        q, k, v = self.wqkv(self.attn_norm(x)).split([self.n_heads * Dh, self.n_kv_heads * Dh,
                                                      self.n_kv_heads * Dh], dim=-1)
        return heads(q, self.n_heads, True), heads(k, self.n_kv_heads, True), heads(v, self.n_kv_heads, False)

    def finish_layer(self, x, q, keys, values, mask):
        """The rest of the layer for inputs x [..., T, D]: attention of queries q [..., Hq, T, Dh] over keys/values
        [..., Hkv, S, Dh] under mask [T, S] (True: seen), the output projection and residual, the SwiGLU block
        -> outputs [..., T, D]."""
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # [..., Hq, T, Dh]
        h = x + self.wo(y.transpose(-3, -2).reshape(*x.shape[:-1], -1))
        gate, up = self.w13(self.ffn_norm(h)).chunk(2, dim=-1)
        return h + self.w2(F.silu(gate) * up)

    def forward(self, embeds, features):
        """Teacher-forced (depth 1): e(x_{j+1}), f_j [..., T, D] -> the predicted f_{j+1} [..., T, D], causally."""
        x = self.inputs(embeds, features)
        T = x.shape[-2]
        q, k, v = self.qkv(x, *self.rope(T))
        return self.finish_layer(x, q, k, v, frontier_mask(T, 1, x.device))


def frontier_mask(T: int, depth: int, device) -> torch.Tensor:
    """[T, depth * T] bool: at depth m, position j's query (chain start t = j - m + 1) sees set 0 at positions <= t and
    set s at position t + s (s = 1 .. m - 1; set s is column block s). Depth 1 is the causal mask."""
    j = torch.arange(T, device=device)[:, None]
    i = torch.arange(T, device=device)[None, :]
    t = j - (depth - 1)
    return torch.cat([i <= t] + [i == t + s for s in range(1, depth)], dim=1)


def draft_guesses(draft: FeatureDraft, embeds, features, lm_head_weight, depth: int) -> list[torch.Tensor]:
    """Every chain's guesses of one answer (embeds, features [T, D]), depth by depth: logits [T, V] per depth
    m = 1 .. depth, row j holding the m-th guess (of token j + 2) of the chain that started at t = j - m + 1 with the
    base model's features up to t; rows with t < 0 are no chain (ignore them)."""
    T = embeds.shape[0]
    cos, sin = draft.rope(T)
    features_in, keys, values, logits = features, [], [], []
    for m in range(1, depth + 1):
        x = draft.inputs(embeds, features_in)  # set m - 1: inputs from features predicted m - 1 times
        q, k, v = draft.qkv(x, cos, sin)
        keys.append(k)
        values.append(v)
        out = draft.finish_layer(x, q, torch.cat(keys, dim=-2), torch.cat(values, dim=-2),
                                 frontier_mask(T, m, x.device))
        logits.append(F.linear(out, lm_head_weight))
        # The next set's input at j reads the feature of token j as this depth predicted it (from position j - 1);
        # position 0 has none and keeps the true one, which no chain reads.
        features_in = torch.cat([features[:1], out[:-1]])
    return logits


def batch_tensors(model, examples):
    """-> the base model's features f [B, T, D] (float32) and e(x_{j+1}) [B, T, D] of the examples, right-padded to the
    longest (causal attention: a padding token changes no feature before it; rows past an answer's end, and its last
    row, token 0's embedding, are read by no guess)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), T + 1, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
    ids = ids.to(model.device)
    with torch.no_grad():
        features = model.forward_hidden(ids[:, :T]).float()
        embeds = model.tok_embeddings(ids[:, 1:]).float()
    return features, embeds


def example_tensors(model, example):
    """`batch_tensors` of one example -> f [T, D], e(x_{j+1}) [T, D]."""
    features, embeds = batch_tensors(model, [example])
    return features[0], embeds[0]


def targets_at_depth(example, depth: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows j whose depth-m guess has an answer token to guess, x_{j+2}, with a chain start t = j - m + 1 >= 0
    -> (rows [N], their targets [N]), built on the host (no device sync per answer)."""
    rows = [j for j in range(depth - 1, len(example.input_ids) - 2) if example.labels[j + 2] != IGNORE]
    targets = [example.input_ids[j + 2] for j in rows]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(targets, dtype=torch.long, device=device)


def draft_loss(draft: FeatureDraft, model, examples, ce_weight: float) -> tuple[torch.Tensor, int]:
    """EAGLE's loss of a batch of answers, summed over their answer tokens: smooth-L1 of the predicted f_{j+1} against
    the base model's, plus ce_weight x cross-entropy of its guess against x_{j+2} -> (the sum, the tokens counted)."""
    picked = [(b, *targets_at_depth(e, 1, "cpu")) for b, e in enumerate(examples)]
    rows = torch.cat([rows for _, rows, _ in picked]).to(model.device)  # [N] positions j
    if not len(rows):
        return torch.zeros((), device=model.device), 0
    answer = torch.cat([torch.full((len(r),), b) for b, r, _ in picked]).to(model.device)  # [N] each row's answer
    targets = torch.cat([targets for _, _, targets in picked]).to(model.device)  # [N]
    features, embeds = batch_tensors(model, examples)  # [B, T, D]
    predicted = draft(embeds, features)[answer, rows]  # [N, D] f_{j+1} predicted at j
    feature_loss = F.smooth_l1_loss(predicted, features[answer, rows + 1], reduction="none").mean(-1).sum()
    token_loss = F.cross_entropy(F.linear(predicted, model.lm_head.weight.float()), targets, reduction="sum")
    return feature_loss + ce_weight * token_loss, len(rows)


def train_draft(draft: FeatureDraft, model, examples, args) -> list[float]:
    """`draft_loss`, teacher-forced, `args.batch` answers a step (each token weighing alike), gradients clipped at
    GRAD_CLIP as EAGLE does, `args.epochs` passes -> the loss per token of each step."""
    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    losses, started = [], time.perf_counter()
    steps = args.epochs * math.ceil(len(examples) / args.batch)
    for epoch in range(args.epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), args.batch):
            loss, tokens = draft_loss(draft, model, [examples[i] for i in order[start:start + args.batch]],
                                      args.ce_weight)
            if not tokens:
                continue
            optimizer.zero_grad()
            (loss / tokens).backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), GRAD_CLIP)
            optimizer.step()
            losses.append(loss.detach() / tokens)
            if len(losses) % args.log_every == 0:
                say(f"[probe] step {len(losses)}/{steps} (epoch {epoch + 1}): loss {losses[-1].item():.4f}, "
                    f"{time.perf_counter() - started:.0f} s")
    return [float(loss) for loss in losses]


@torch.no_grad()
def draft_rank_accuracies(draft: FeatureDraft, model, examples, depth: int, topk: int) -> torch.Tensor:
    """-> acc [depth, topk]: the share of chains whose rank-r guess at depth m is the true token (tree_tuning's
    table for heads, for the draft)."""
    hits = torch.zeros(depth, topk, dtype=torch.float64)
    count = torch.zeros(depth, dtype=torch.float64)
    for example in examples:
        features, embeds = example_tensors(model, example)
        for m, logits in enumerate(draft_guesses(draft, embeds, features, model.lm_head.weight.float(), depth)):
            rows, targets = targets_at_depth(example, m + 1, model.device)
            picked = logits[rows]  # [N, V]
            rank = (picked > picked.gather(1, targets[:, None])).sum(1)  # [N]
            for r in range(topk):
                hits[m, r] += float((rank == r).sum())
            count[m] += len(rows)
    return hits / count.clamp(min=1)[:, None]


class DraftNode:
    """A node of a draft tree grown at one chain start t: its token, the summed log-probabilities of its path (0 at
    the root, the token after t, which the base model chose) and, once expanded, what its own draft call gave."""

    def __init__(self, token: int, score: float, parent: "DraftNode | None"):
        self.token, self.score, self.parent = token, score, parent
        self.depth = 0 if parent is None else parent.depth + 1
        self.children: dict[int, DraftNode] = {}
        self.call: DraftCall | None = None  # its own draft call, once expanded

    def ancestors(self) -> list["DraftNode"]:
        """Its ancestors below the root, shallowest first."""
        chain, node = [], self.parent
        while node is not None and node.parent is not None:
            chain.append(node)
            node = node.parent
        return chain[::-1]


class DraftCall(NamedTuple):
    feature: torch.Tensor  # [D] the feature it predicts: its children's input
    ranked: list[tuple[int, float]]  # its likeliest children: (token, log-probability), best first
    kv: tuple[torch.Tensor, torch.Tensor] | None  # its key and value [Hkv, 1, Dh] (the root's: the prefix's last)


class TreeSimulator:
    """Draft trees grown in one answer as a decoder would draft them, one draft call a depth: at chain start t the
    root's call is the teacher-forced one at t (the base model's features up to t); a node at depth d calls the draft
    at position t + d on [e(its token); its parent's predicted feature], seeing positions 0 .. t and its ancestors'
    calls. Calls are kept by (t, the path's tokens), so trees of one start share them."""

    def __init__(self, draft: FeatureDraft, model, example, max_depth: int, ranks: int):
        self.draft, self.example, self.ranks = draft, example, ranks
        self.lm_head, self.embedding = model.lm_head.weight.float(), model.tok_embeddings
        self.calls_run: dict[tuple, DraftCall] = {}  # (t, the path's tokens) -> its call
        features, embeds = example_tensors(model, example)
        T = features.shape[0]
        self.cos, self.sin = draft.rope(T + max_depth)
        x = draft.inputs(embeds, features)
        q, self.k0, self.v0 = draft.qkv(x, self.cos[:T], self.sin[:T])
        self.out0 = draft.finish_layer(x, q, self.k0, self.v0, frontier_mask(T, 1, x.device))  # [T, D]

    def calls(self, out) -> list[DraftCall]:
        """Predicted features out [n, D] -> each one's call (its likeliest children in one read to the host)."""
        values, indices = F.log_softmax(F.linear(out, self.lm_head), dim=-1).topk(self.ranks)  # [n, ranks]
        ranked = torch.stack([indices.double(), values.double()], dim=-1).tolist()  # (token ids are exact in float64)
        return [DraftCall(out[i], [(int(tok), logprob) for tok, logprob in row], None) for i, row in enumerate(ranked)]

    def root(self, t: int) -> DraftNode:
        node = DraftNode(self.example.input_ids[t + 1], 0.0, None)
        key = (t,)
        if key not in self.calls_run:
            self.calls_run[key] = self.calls(self.out0[t:t + 1])[0]
        node.call = self.calls_run[key]
        return node

    def expand(self, nodes: list[DraftNode], t: int) -> None:
        """Run the draft calls of nodes of one depth below the root in one batch, as a decoder drafts a depth: node
        i's query, at position t + depth, sees positions 0 .. t, its ancestors' keys and its own (a tree mask over the
        prefix and one block of `depth` keys a node). Nodes already expanded, or whose path another tree of this
        start has run, take the kept call."""
        todo: dict[tuple, list[DraftNode]] = {}
        for node in nodes:
            if node.call is None:
                key = (t, *(a.token for a in node.ancestors()), node.token)
                if key in self.calls_run:
                    node.call = self.calls_run[key]
                else:
                    todo.setdefault(key, []).append(node)
        if not todo:
            return
        first = [same[0] for same in todo.values()]  # one node per path
        n, depth = len(first), first[0].depth
        assert all(node.depth == depth for node in first), "expand takes the nodes of one depth"
        p = t + depth  # their position
        tokens = torch.tensor([node.token for node in first], device=self.out0.device)
        parents = torch.stack([node.parent.call.feature for node in first])  # [n, D]
        x = self.draft.inputs(self.embedding(tokens).float(), parents)  # [n, D]
        q, k, v = self.draft.qkv(x, self.cos[p].expand(n, -1), self.sin[p].expand(n, -1))  # [H, n, Dh]

        def blocks(prefix, own, which):  # the prefix's keys (which 0) or values (1), then each node's ancestors' and
            # its own -> [Hkv, t + 1 + n * depth, Dh]
            return torch.cat([prefix[:, : t + 1], *(torch.cat([*(a.call.kv[which] for a in node.ancestors()),
                                                                own[:, i:i + 1]], dim=-2)
                                                     for i, node in enumerate(first))], dim=-2)

        key_index = torch.arange(t + 1 + n * depth, device=x.device)  # [S]: the prefix, then node i's block
        block = (key_index - (t + 1)).div(depth, rounding_mode="floor")  # [S] the block a key is in (< 0: prefix)
        seen = (block < 0) | (block == torch.arange(n, device=x.device)[:, None])  # [n, S]
        out = self.draft.finish_layer(x, q, blocks(self.k0, k, 0), blocks(self.v0, v, 1), seen)  # [n, D]
        for i, (key, call) in enumerate(zip(todo, self.calls(out))):
            self.calls_run[key] = call._replace(kv=(k[:, i:i + 1], v[:, i:i + 1]))
            for node in todo[key]:
                node.call = self.calls_run[key]

    def child(self, node: DraftNode, rank: int) -> DraftNode:
        """The node's rank-th likeliest child (the node expanded first)."""
        token, logprob = node.call.ranked[rank]
        if token not in node.children:
            node.children[token] = DraftNode(token, node.score + logprob, node)
        return node.children[token]

    def static_tree(self, t: int, paths: list[list[int]]) -> DraftNode:
        """The tree of rank paths (tree.py's choices: path [1, 0] = the second guess, then its first), drafted depth
        by depth."""
        reached = {(): self.root(t)}  # rank path -> its node
        for d in range(max(map(len, paths), default=0)):
            longer = [tuple(path) for path in paths if len(path) > d]
            self.expand(list({id(reached[path[:d]]): reached[path[:d]] for path in longer}.values()), t)
            for path in longer:
                reached[path[: d + 1]] = self.child(reached[path[:d]], path[d])
        return reached[()]

    def grow(self, root: DraftNode, t: int, depth: int, beam: int, branch: int) -> list[DraftNode]:
        """EAGLE-2's expansion: depth by depth, the `beam` likeliest nodes of the last depth (summed
        log-probabilities; the root at first) each get their `branch` likeliest children -> every node grown."""
        frontier, grown = [root], []
        for _ in range(depth):
            self.expand(frontier, t)
            children = [self.child(node, rank) for node in frontier for rank in range(branch)]
            grown += children
            frontier = sorted(children, key=lambda n: -n.score)[:beam]
        return grown

    def dynamic_tree(self, t: int, paths: int, depth: int, beam: int, branch: int) -> DraftNode:
        """EAGLE-2's tree: `grow`, then only the `paths` likeliest grown nodes stay attached (a child never outranks
        its parent: its score is no higher, and ties go to the shallower, so they form a tree)."""
        root = self.root(t)
        grown = self.grow(root, t, depth, beam, branch)
        kept = set(sorted(grown, key=lambda n: (-n.score, n.depth))[:paths])
        for node in [root, *grown]:
            node.children = {tok: c for tok, c in node.children.items() if c in kept}
        return root

    def accepted(self, root: DraftNode, t: int) -> int:
        """Guesses greedy decoding accepts from the tree at t: down the tree while the next answer token is a child."""
        ids, labels, node, n = self.example.input_ids, self.example.labels, root, 0
        while t + 2 + n < len(ids) and labels[t + 2 + n] != IGNORE and ids[t + 2 + n] in node.children:
            node = node.children[ids[t + 2 + n]]
            n += 1
        return n


def answer_spans(example) -> list[tuple[int, int]]:
    """The answer's runs of consecutive answer tokens (labels not IGNORE), [start, end) each: one per assistant turn."""
    spans, start = [], None
    for j, label in enumerate([*example.labels, IGNORE]):
        if label != IGNORE and start is None:
            start = j
        elif label == IGNORE and start is not None:
            spans.append((start, j))
            start = None
    return spans


def decode_with_trees(sim: TreeSimulator, example, make_tree) -> tuple[int, int]:
    """Greedy decoding of the answer's turns with a tree drafted at each step (make_tree(t) -> its root), as the
    engine decodes: the turn's first token comes from the prefill; each step emits its accepted guesses and the base
    model's next token, and the next step starts after them -> (tokens emitted after the first, steps)."""
    tokens = steps = 0
    for start, end in answer_spans(example):
        t = start - 1  # the root x_{t+1} is the turn's first token
        while t + 2 < end:
            n = sim.accepted(make_tree(t), t)
            emitted = min(n + 1, end - (t + 2))  # (the last step may pass the turn's end: count only its tokens)
            tokens, steps, t = tokens + emitted, steps + 1, t + n + 1
    return tokens, steps


@torch.no_grad()
def simulate_trees(draft: FeatureDraft, model, examples, tree_acc: torch.Tensor, args) -> list[dict]:
    """Greedy decoding of the first `args.sim_answers` held-out answers with the draft's static trees (tree.py's rule
    over `tree_acc`, its rank accuracies on training answers) and with EAGLE-2's dynamic trees, each of N paths for N
    in args.sim_paths -> per N: tokens a step for each (emitted tokens over steps, all answers together)."""
    static_paths = {n: tree_from_head_accuracies(tree_acc, n) for n in args.sim_paths}
    totals = {(n, kind): [0, 0] for n in args.sim_paths for kind in ("static", "dynamic")}
    for example in examples[: args.sim_answers]:
        sim = TreeSimulator(draft, model, example, len(tree_acc), max(args.branch, tree_acc.shape[1]))
        for (n, kind), total in totals.items():
            make_tree = ((lambda t, paths=static_paths[n]: sim.static_tree(t, paths)) if kind == "static" else
                         (lambda t, n=n: sim.dynamic_tree(t, n, len(tree_acc), args.beam, args.branch)))
            tokens, steps = decode_with_trees(sim, example, make_tree)
            total[0] += tokens
            total[1] += steps
    return [{"paths": n, "answers": len(examples[: args.sim_answers]),
             **{kind: totals[n, kind][0] / max(totals[n, kind][1], 1) for kind in ("static", "dynamic")},
             "steps": {kind: totals[n, kind][1] for kind in ("static", "dynamic")}} for n in args.sim_paths]


def best_static_tree(acc: torch.Tensor, paths: int) -> float:
    """The expected accepted length of the greedy static tree of `paths` paths (root not counted) for rank
    accuracies acc [depth, topk]."""
    return expected_accept_length(acc, tree_from_head_accuracies(acc, paths))


def run(args) -> dict:
    check_input_dir("--heads", args.heads or None)  # before minutes of training, not after
    check_data_arguments(args)
    if args.json:
        check_output_file("--json", args.json)
    if args.topk < 5:
        raise NanoMedusaError(f"--topk {args.topk}: the table reports top-5 accuracy; pass --topk 5 or more.")
    capacity = sum(args.topk ** d for d in range(1, args.depth + 1))  # the paths tree.py's rule can pick from
    if args.sim_answers and not all(0 < n <= capacity for n in args.sim_paths):
        raise NanoMedusaError(f"--sim-paths {','.join(map(str, args.sim_paths))}: each must be 1 to {capacity} "
                              f"(--topk {args.topk} ranks, --depth {args.depth} deep).")
    torch.manual_seed(args.seed)
    model, tokenizer = load_base_model(args)
    data = {name: load_examples(tokenizer, files, args.max_len) for name, files in (("train", args.train),
                                                                                     ("eval", args.eval))}
    if args.limit_train:
        data["train"] = data["train"][: args.limit_train]
    if args.limit_eval:
        data["eval"] = data["eval"][: args.limit_eval]
    for name, examples in data.items():
        say(f"[probe] {name}: {len(examples)} answers, {sum(sum(l != IGNORE for l in e.labels) for e in examples)} "
            f"answer tokens")
    draft = FeatureDraft(model.config).to(model.device)
    losses = train_draft(draft.train(), model, data["train"], args)
    acc_draft = draft_rank_accuracies(draft.eval(), model, data["eval"], args.depth, args.topk)
    rows = [[m + 1, f"t+{m + 2}", *(f"{acc_draft[m, :r].sum():.3f}" for r in (1, 5))] for m in range(args.depth)]
    expected = {"draft": best_static_tree(acc_draft, args.paths)}
    out = {"train": args.train, "eval": args.eval, "chat_format": tokenizer.chat.preset, "epochs": args.epochs,
           "lr": args.lr, "batch": args.batch, "ce_weight": args.ce_weight, "paths": args.paths, "losses": losses,
           "draft_acc": acc_draft.tolist(), "expected_accepted": expected}
    if args.json:  # the draft's numbers first: they cost the minutes
        save(out, args.json)
    if args.sim_answers:
        # The static trees' shape from training answers, so that neither kind is tuned on the answers it is scored on.
        tree_acc = draft_rank_accuracies(draft, model, data["train"][: args.tree_answers], args.depth, args.topk)
        out["trees"] = simulate_trees(draft, model, data["eval"], tree_acc, args)
        print_table(f"The draft's trees: greedy decoding of {out['trees'][0]['answers']} held-out answers simulated, "
                    f"tokens a step; static: tree.py's rule over its rank accuracies ({args.topk} ranks); dynamic: "
                    f"EAGLE-2's (beam {args.beam}, branch {args.branch}); both {args.depth} deep",
                    ["paths", "static", "dynamic", "dynamic / static"],
                    [[r["paths"], f"{r['static']:.3f}", f"{r['dynamic']:.3f}", f"{r['dynamic'] / r['static']:.3f}"]
                     for r in out["trees"]])
        if args.json:
            save(out, args.json)
    if args.heads:
        heads = load_heads_and_adapter(args.heads, model, say=say)  # (after the draft: an adapter changes model)
        acc_heads = rank_accuracies(model, heads, data["eval"], args.topk)
        for m, row in enumerate(rows):
            row += [f"{acc_heads[m, :r].sum():.3f}" for r in (1, 5)] if m < len(acc_heads) else ["-", "-"]
        out["heads"], out["heads_acc"] = args.heads, acc_heads.tolist()
        expected["heads"] = best_static_tree(acc_heads, args.paths)
        expected[f"draft, {len(acc_heads)} deep"] = best_static_tree(acc_draft[:len(acc_heads)], args.paths)
    print_table(f"Held-out accuracy per depth (the tokens before each guess right; {len(data['eval'])} answers)",
                ["depth", "guesses", "draft top-1", "draft top-5"] + (["heads top-1", "heads top-5"] if args.heads
                                                                       else []), rows)
    say("[probe] expected accepted length, best static tree of {} paths: {}".format(
        args.paths, ", ".join(f"{k} {v:.3f}" for k, v in expected.items())))
    if args.json:
        save(out, args.json)
    return out


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])  # (its errors: one line)
    add_data_arguments(p)
    p.add_argument("--heads", default=DEFAULT_HEADS, help=f"heads to compare with (default {DEFAULT_HEADS}; '' none)")
    p.add_argument("--depth", type=int, default=4, help="guesses per chain measured (default 4)")
    p.add_argument("--topk", type=int, default=8, help="ranks measured per depth (default 8, at least 5)")
    p.add_argument("--paths", type=int, default=31,
                   help="the static trees' paths, root not counted (default 31, the default heads' 32-node tree)")
    p.add_argument("--sim-answers", type=int, default=24,
                   help="held-out answers greedily decoded with the draft's static and dynamic trees (default 24; 0: "
                        "none)")
    p.add_argument("--tree-answers", type=int, default=200,
                   help="training answers whose rank accuracies shape the static trees (default 200)")
    p.add_argument("--sim-paths", type=lambda v: [int(x) for x in v.split(",")], default=[15, 31, 63],
                   help="the simulated trees' sizes in paths, root not counted (default 15,31,63)")
    p.add_argument("--beam", type=int, default=8, help="dynamic trees: nodes expanded per depth (default 8)")
    p.add_argument("--branch", type=int, default=8, help="dynamic trees: children per expanded node (default 8)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="answers per optimizer step (default 16)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    p.add_argument("--ce-weight", type=float, default=0.1, help="weight of the token loss beside the feature loss")
    p.add_argument("--limit-train", type=int, default=0, help="use the first N training answers (default all)")
    p.add_argument("--limit-eval", type=int, default=0, help="use the first N held-out answers (default all)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="write the numbers here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU: a probe's accuracies, not a decoder's bits
    return run_reporting_errors(lambda: run(args))  # a bad flag or path: one `error:` line, before any training


if __name__ == "__main__":
    exit_with(main())

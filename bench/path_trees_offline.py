"""Trees grown from path-reading heads' own guesses (EAGLE-2's expansion) against their static tree, at equal node
counts: an exact offline simulator of greedy decoding (CPU), for #15.

    python -m bench.path_trees_offline [--heads weights/smollm2-135m-instruct-medusa-path] \\
        [--prompts bench/prompts-chat-heldout.jsonl bench/prompts-train-mix.jsonl] [--budgets 16,24,32,48,64] \\
        [--beam 8] [--children 8] [--supersets 256] [--max-new-tokens 128] [--json FILE]

Why it is exact. Greedy Medusa emits plain greedy decoding's tokens c_0 c_1 .. (c_0 from the prefill). A step whose
root is c_i reads the hidden state of the position before it (the last accepted node's, which is the teacher-forced
hidden state of prompt + c there) and accepts the deepest tree node whose guesses are c_{i+1} .. c_{i+d}; it emits
those and the bonus c_{i+d+1}, the next root. So one plain greedy run and one teacher-forced forward per prompt
give every step's input, and a rule's steps follow from proposing its tree there with the heads, without running
the model on the tree. (`python -m bench.dynamic_trees_offline` does the same for Medusa's heads, whose guesses
do not depend on the path.) The rules, each with N nodes (the root included):

  static   the heads' static tree of N nodes (`tree_from_head_accuracies` on their measured rank accuracies,
           first --max-depth heads), proposed depth by depth as the engine does (path_tree.guess_along_paths)
  expand   EAGLE-2's: at each depth the --beam best nodes so far (by the sum of their path's calibrated
           log-probabilities, as dynamic trees score) each get their head's --children best guesses; after the
           last depth the N - 1 best of every node guessed are verified (a child never scores above its parent
           and is guessed after it, so the chosen nodes form a tree). Its heads run on 1 + beam x (depth - 1)
           rows a step, whatever N.
  dynamic  the engine's dynamic tree (nanomedusa/dynamic_tree.py, `--tree dynamic`) over a superset of S nodes for each
           S of --supersets (the heads' accuracy tree of max(S, N) nodes, as `DynamicTree.for_heads` builds it):
           the heads guess every superset node depth by depth, and the N best by summed calibrated log-probability
           are verified (path_tree.choose_by_path_scores). Its heads run on the superset's parents, so a smaller
           superset costs less a step; this rule says what it costs in accepted length.

Per prompt set and N: mean accepted (tokens emitted per step, the bonus token included) for each rule, and each as a
multiple of the static tree's (#15's first target: >= 1.10x).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanomedusa.cli import (ArgumentParser, add_chat_format_flag, check_at_least, check_input_dir, check_input_file,
                            check_output_file, exit_with, run_reporting_errors)
from nanomedusa.generation import generate_batch
from nanomedusa.errors import NanoMedusaError
from nanomedusa.heads import MedusaHeads, load_heads_and_adapter
from nanomedusa.loading import load_model
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.path_tree import PathPlan, choose_by_path_scores, guess_along_paths
from nanomedusa.tokenizer import load_tokenizer
from nanomedusa.tree import TreeBuffers, tree_from_head_accuracies

from .checks import heads_read_path, int_list
from .prompts import chat_prompts
from .report import print_table, save, say

HEADS = "weights/smollm2-135m-instruct-medusa-path"
PROMPTS = ["bench/prompts-chat-heldout.jsonl", "bench/prompts-train-mix.jsonl"]


def accepted_depth(parents: list[int], depths: list[int], tokens: list[int], chosen, future: list[int]) -> int:
    """The deepest chosen node whose path's guesses are all right: node n (depth d) is right when its parent is
    and its token is future[d - 1] (future = c_{i+1}, c_{i+2}, ..; guesses past its end are wrong). Nodes are in
    an order that puts every parent before its children; `chosen` is a set of nodes (None: all)."""
    right, deepest = [True] + [False] * (len(tokens) - 1), 0
    for node in range(1, len(tokens)):
        d = depths[node]
        right[node] = right[parents[node]] and d <= len(future) and tokens[node] == future[d - 1]
        if right[node] and (chosen is None or node in chosen):
            deepest = max(deepest, d)
    return deepest


class Step:
    """What the heads propose at one root (position i of the continuation), each rule's tree cached."""

    def __init__(self, heads: MedusaHeads, model, hidden: torch.Tensor, root: int):
        self.heads, self.model, self.hidden, self.root = heads, model, hidden, torch.tensor(root)

    @torch.inference_mode()
    def static(self, plan: PathPlan, tree: TreeBuffers):
        """(parents, depths, tokens) of the static tree proposed here."""
        tokens = guess_along_paths(self.heads, plan, self.model.lm_head.weight, self.root, self.hidden,
                                   self.model.tok_embeddings)[0]
        return tree.parents.tolist(), tree.depths.tolist(), tokens.tolist()

    @torch.inference_mode()
    def dynamic(self, plan: PathPlan, tree: DynamicTree):
        """(parents, depths, tokens, chosen) of a dynamic tree's superset proposed here, and the set of superset
        nodes the engine's choice keeps."""
        tokens, logprobs = guess_along_paths(self.heads, plan, self.model.lm_head.weight, self.root, self.hidden,
                                             self.model.tok_embeddings, logprobs=True)
        nodes = choose_by_path_scores(tokens, logprobs, plan.node_paths, tree.num_nodes)[1]
        superset = tree.superset
        return superset.parents.tolist(), superset.depths.tolist(), tokens.tolist(), set(nodes.tolist())

    @torch.inference_mode()
    def expand(self, depth: int, beam: int, children: int):
        """(parents, depths, tokens, scores) of every node the expansion guesses, root first, parents before
        children: at each depth the `beam` best nodes of the depth above (the root at first) each get `children`
        guesses of the head, scored by the path's summed calibrated log-probabilities."""
        heads, embed, lm = self.heads, self.model.tok_embeddings, self.model.lm_head.weight
        parents, depths, tokens, scores, paths = [0], [0], [int(self.root)], [0.0], [[int(self.root)]]
        frontier = [0]
        for k in range(depth):  # head k guesses depth k + 1 for each frontier node
            path = embed(torch.tensor([paths[n] for n in frontier]))  # [B, k + 1, D]
            x = heads.head_input(k, self.hidden.expand(len(frontier), -1), path)  # [B, D]
            ids, logprobs = heads.head_topk(k, x, children, lm, logprobs=True)  # [B, children] each, calibrated
            new = []
            for row, parent in enumerate(frontier):
                for lp, token in zip(logprobs[row].tolist(), ids[row].tolist()):
                    new.append(len(tokens))
                    parents.append(parent), depths.append(k + 1), tokens.append(token)
                    scores.append(scores[parent] + min(lp, 0.0)), paths.append(paths[parent] + [token])
            # the beam: this depth's best, ties to the earlier guessed (a stable sort)
            frontier = sorted(new, key=lambda n: -scores[n])[:beam]
        return parents, depths, tokens, scores


def walk(continuation: list[int], accept_at) -> int:
    """Steps greedy Medusa takes to emit `continuation` (its first token comes from the prefill), where
    accept_at(i) is how many guesses a step rooted at continuation[i] accepts."""
    i, steps = 0, 0
    while i < len(continuation) - 1:
        i += accept_at(i) + 1
        steps += 1
    return steps


def simulate(model, heads: MedusaHeads, prompt_ids: list[int], continuation: list[int], budgets: list[int],
             max_depth: int, beam: int, children: int, supersets: list[int]) -> dict:
    """{(rule, N): steps} for one prompt."""
    tokens = torch.tensor([prompt_ids + continuation])
    with torch.inference_mode():
        model.kv_cache = None  # a plain forward, no cache
        hidden = model.forward_hidden(tokens)[0]  # [P + L, D]
    P, acc = len(prompt_ids), heads.config.rank_accuracies()[:max_depth]
    steps: dict = {}
    expansions: dict = {}
    for n in budgets:
        tree = TreeBuffers.from_choices(tree_from_head_accuracies(acc, n - 1))
        plan = PathPlan.from_paths(tree.paths, tree.depth_max)

        def static_at(i, tree=tree, plan=plan):
            step = Step(heads, model, hidden[P - 1 + i: P + i], continuation[i])
            parents, depths, guessed = step.static(plan, tree)
            return accepted_depth(parents, depths, guessed, None, continuation[i + 1:])

        def expand_at(i, n=n):
            if i not in expansions:  # the same guesses for every N: only the choice differs
                step = Step(heads, model, hidden[P - 1 + i: P + i], continuation[i])
                expansions[i] = step.expand(max_depth, beam, children)
            parents, depths, guessed, scores = expansions[i]
            best = sorted(range(1, len(guessed)), key=lambda node: -scores[node])[: n - 1]
            return accepted_depth(parents, depths, guessed, set(best), continuation[i + 1:])

        steps[("static", n)] = walk(continuation, static_at)
        steps[("expand", n)] = walk(continuation, expand_at)
        for size in supersets:
            dynamic = DynamicTree.for_heads(heads.config, n, superset_nodes=size)
            dynamic_plan = PathPlan.from_paths(dynamic.superset.paths, dynamic.depth_max)

            def dynamic_at(i, dynamic=dynamic, plan=dynamic_plan):
                step = Step(heads, model, hidden[P - 1 + i: P + i], continuation[i])
                parents, depths, guessed, chosen = step.dynamic(plan, dynamic)
                return accepted_depth(parents, depths, guessed, chosen, continuation[i + 1:])

            steps[(f"dynamic-{size}", n)] = walk(continuation, dynamic_at)
    return steps


def run(args) -> dict:
    model, checkpoint = load_model(args.model, device="cpu", dtype=torch.float32)
    heads = load_heads_and_adapter(args.heads, model)  # (check_args refused heads that do not read their path)
    max_depth = min(args.max_depth or heads.config.num_heads, heads.config.num_heads)
    supersets = sorted(set(superset_sizes(args)))
    if supersets and max_depth < heads.config.num_heads:
        raise NanoMedusaError("--supersets models the engine's dynamic tree, which uses every head; drop "
                              "--max-depth or pass --supersets ''.")
    tokenizer = load_tokenizer(checkpoint, args.chat_format)
    budgets = sorted(set(int_list("--budgets", args.budgets, 2, what="node counts")))
    rules = ["static", "expand"] + [f"dynamic-{size}" for size in supersets]
    rows, out = [], {"heads": args.heads, "beam": args.beam, "children": args.children, "max_depth": max_depth,
                     "max_new_tokens": args.max_new_tokens, "chat_format": tokenizer.chat.preset, "sets": {}}
    for path in args.prompts:
        prompts = chat_prompts(tokenizer, Path(path), args.num_prompts)
        say(f"[path-trees] {path}: {len(prompts)} prompts, greedy continuations (batched)")
        continuations = generate_batch(model, [p.ids for p in prompts], args.max_new_tokens,
                                       eos_ids=tokenizer.eos_ids, cuda_graphs=False)
        emitted = sum(len(c) - 1 for c in continuations)
        totals: dict = {}
        for number, (prompt, continuation) in enumerate(zip(prompts, continuations), 1):
            for key, steps in simulate(model, heads, prompt.ids, continuation, budgets, max_depth, args.beam,
                                       args.children, supersets).items():
                totals[key] = totals.get(key, 0) + steps
            say(f"[path-trees] {path} {number}/{len(prompts)}")
        accepted = {key: emitted / max(steps, 1) for key, steps in totals.items()}  # tokens a step, bonus included
        for n in budgets:
            static = accepted[("static", n)]
            rows.append([Path(path).stem, n, f"{static:.3f}"]
                        + [f"{accepted[(rule, n)]:.3f} ({accepted[(rule, n)] / static:.3f}x)" for rule in rules[1:]])
        out["sets"][path] = {"prompts": len(prompts), "tokens_after_the_first": emitted,
                             "rows": [{"nodes": n, **{rule: accepted[(rule, n)] for rule in rules}} for n in budgets]}
    print_table(f"Mean accepted (tokens a step) of greedy Medusa with {args.heads}: static trees against EAGLE-2's "
                f"expansion (beam {args.beam}, {args.children} guesses a node, {max_depth} deep) and the dynamic tree "
                f"over each superset, equal node counts (each rule also as a multiple of static)",
                ["prompts", "nodes", *rules], rows)
    if args.json:
        save(out, args.json)
    return out


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (default: the built-in one)")
    p.add_argument("--heads", default=HEADS, help=f"path-reading heads (default {HEADS})")
    p.add_argument("--prompts", nargs="+", default=PROMPTS, help="JSON lines with an \"id\" and a \"prompt\" each")
    p.add_argument("--num-prompts", type=int, default=None, help="the first N prompts of each file (default: all)")
    p.add_argument("--budgets", default="16,24,32,48,64", help="node counts, the root included")
    p.add_argument("--beam", type=int, default=8, help="expand: nodes expanded at each depth")
    p.add_argument("--children", type=int, default=8, help="expand: guesses per expanded node")
    p.add_argument("--supersets", default="256", help="dynamic: superset sizes, comma-separated ('' for none)")
    p.add_argument("--max-depth", type=int, default=None, help="heads used (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--json", default=None, help="write the numbers here")
    add_chat_format_flag(p)  # the prompts' format: the one the heads were trained on
    return p.parse_args(argv)


def superset_sizes(args) -> list[int]:
    """--supersets as ints in the order given ('' for none)."""
    return int_list("--supersets", args.supersets, 2, what="node counts", example="64,256") if args.supersets else []


def check_args(args) -> None:
    """The paths and every flag's value, before the model loads (a NanoMedusaError naming the fix)."""
    check_input_dir("--heads", args.heads)
    for path in args.prompts:
        check_input_file("--prompts", path)
    if heads_read_path(args.heads) is False:
        raise NanoMedusaError(f"--heads {args.heads} holds heads that do not read their path; this simulator is for "
                              f"those (python -m bench.dynamic_trees_offline models Medusa's).")
    int_list("--budgets", args.budgets, 2, what="node counts")
    superset_sizes(args)
    check_at_least(1, {"--beam": args.beam, "--children": args.children, "--max-depth": args.max_depth,
                       "--num-prompts": args.num_prompts, "--max-new-tokens": args.max_new_tokens})
    if args.json is not None:
        check_output_file("--json", args.json)


def main(argv=None) -> int:
    torch.manual_seed(0)
    args = parse_args(argv)
    return run_reporting_errors(lambda: (check_args(args), run(args)))


if __name__ == "__main__":
    exit_with(main())

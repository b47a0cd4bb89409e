"""End-to-end benchmark: our plain decoding vs Medusa vs Hugging Face transformers, plus 7B-shaped step times.

    python -m nanomedusa.bench                      # everything: default model, its shipped heads, GPU, bf16
    python -m nanomedusa.bench --heads m1=out/warmup/heads --heads m2=out/joint/heads@out/joint/model
    python -m nanomedusa.bench --tree chain4 --tree mc_sim_7b_63 --num-prompts 8 --no-hf --skip-7b
    python -m nanomedusa.bench --skip-e2e           # only the 7B-shaped step times
    python -m nanomedusa.bench --skip-e2e --skip-7b --sampling bench/prompts-chat-heldout.jsonl \
        bench/prompts-train-mix.jsonl              # only sampling: plain vs Medusa, on two prompt sets

Parts, each printed as a table when it finishes and all saved to --json (default bench/results.json):

  ar      our plain decoding (`generate`, CUDA graphs), on each backbone: tokens/s
  medusa  each --heads checkpoint x each --tree: tokens/s, mean accepted length, and how many prompts
          came out token for token equal to plain greedy decoding on the same backbone; per prompt
          category too, where the prompt file gives each prompt a "category"
  sizes   with --tree-sizes: the step time of the first --heads against the tree's node count (each
          size's tree built from the heads' measured rank accuracies), written to --step-times for
          `python -m nanomedusa.tree_tuning --step-times`, which sizes trees to the hardware
  hf      transformers' `generate(do_sample=False)` on the same prompts: tokens/s
  sampling with --sampling: plain greedy, plain sampling, lossless Medusa sampling (`--accept sample`) and
          typical acceptance at temperature 0.7 / top-p 0.9 with the first --heads and its own tree, on each
          prompt set given: mean accepted length, tokens/s and speedup over plain sampling
  7b      a randomly initialised Llama-7B-shaped model: 1-token decode and tree-verification step
          times (CUDA graphs, median of many replays), the memory-bandwidth floor of a step, and the
          Medusa speedup projected from the acceptance measured above
  summary the headline numbers, printed last

Method: greedy, batch 1, prompts from bench/prompts-train-mix.jsonl (held out: new prompts written
for this benchmark in the mix of the training prompts, mostly grade-school math word problems, plus
NLP-task and everyday-instruction prompts; bench/prompts-chat.jsonl is open-ended chat, outside that
mix, and shows how the heads carry over to text unlike their training data)
rendered with the model's chat template; decoding stops at --max-new-tokens or an eos token.
Tokens/s = total new tokens / total seconds, prefill included; decode tokens/s = the tokens after each
prompt's first / the seconds after its prefill, the decoding steps alone; mean accepted length = tokens
gained after each prompt's first / decoding steps; all summed over prompts. The decode steps' CUDA-graph
capture and KV-cache allocation happen before `generate`'s clock starts; a prefill graph is captured
inside the clock the first time its padded prompt length comes up (in the warm-up pass below);
transformers' `generate` is timed whole.
Warm-up: before its timed pass each of our methods runs every prompt once untimed, because Triton
compiles a kernel again for each new specialisation of its integer arguments (equal to 1, divisible
by 16), which one warm-up prompt does not cover; --quick-warmup uses the first prompt only, as the
transformers part always does (its eager kernels compile nothing).
The 7B projection times only the verification forward (the heads, acceptance and KV compaction add
a little) and borrows the acceptance of heads trained for the small model.

A --heads argument is `[LABEL=]HEADS_DIR[@MODEL_DIR]`. Heads from joint training (Medusa-2) go with
their fine-tuned backbone: MODEL_DIR, or else a `model/` directory beside HEADS_DIR (train.py writes
OUT/heads and OUT/model), or the base model with the LoRA adapter HEADS_DIR ships (`adapter.py`);
their outputs are checked against that backbone's plain decoding.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

import kernels

from .config import ModelConfig
from .cuda_graphs import GraphedStep
from .adapter import apply_adapter, has_adapter
from .cli import USAGE_ERROR, ArgumentParser, check_at_least, check_kernels, check_output_file
from .errors import NanoMedusaError
from .files import read_utf8
from .generation import GenerationResult, _sync, generate
from .heads import MedusaHeads
from .loading import load_model, resolve_device, resolve_dtype
from .medusa_generation import generate_medusa
from .sampling import Sampling
from .model import Transformer
from .tokenizer import Tokenizer
from .tree import PRESETS, TreeBuffers, parse_tree, tree_from_head_accuracies

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = REPO / "bench" / "prompts-train-mix.jsonl"
DEFAULT_JSON = REPO / "bench" / "results.json"
DEFAULT_STEP_TIMES = REPO / "bench" / "step-times.json"
# The Medusa-1 heads shipped for the default model (the directory generate.py uses too).
SHIPPED_HEADS = REPO / "weights" / "smollm2-135m-instruct-medusa"
DEFAULT_TREES = ("own", "chain4", "mc_sim_7b_63")  # "own": the heads' config.json medusa_choices
BASE = "base"  # label of the --model backbone
# Tree steps timed on the 7B shape besides the trees of the medusa part: the reference's default
# 63-path tree (T = 64 nodes) and its first 15 paths (T = 16), a small tree.
STEP_TREES = {"mc_sim_7b_63": PRESETS["mc_sim_7b_63"], "mc_sim_7b_63[:15]": PRESETS["mc_sim_7b_63"][:15]}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="checkpoint dir, .gguf or hub id (default: the built-in default model)")
    p.add_argument("--device", default="cuda", help="cpu, cuda (default), cuda:N or auto")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16, float32 or auto")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"),
                   help="kernel backend (default auto: Triton on CUDA)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                   help="JSONL file of {\"id\", \"prompt\"} (default bench/prompts-train-mix.jsonl)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default 128)")
    p.add_argument("--heads", action="append", default=[], metavar="[LABEL=]HEADS_DIR[@MODEL_DIR]",
                   help="Medusa heads to benchmark (repeatable; default: the shipped heads of the default model)")
    p.add_argument("--tree", action="append", default=[], metavar="NAME|JSON|FILE",
                   help="tree to benchmark, or \"own\" for the heads' own (repeatable; default: own, chain4 and "
                        "mc_sim_7b_63, each cut to the number of heads)")
    p.add_argument("--quick-warmup", action="store_true", help="warm our methods up on the first prompt only")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write all raw numbers (default bench/results.json)")
    p.add_argument("--skip-e2e", action="store_true", help="skip the ar, medusa and hf parts")
    p.add_argument("--no-medusa", action="store_true", help="skip the medusa part")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers part")
    p.add_argument("--skip-7b", action="store_true", help="skip the 7B-shaped step times")
    p.add_argument("--sampling", nargs="*", type=Path, default=None, metavar="PROMPTS",
                   help="also benchmark sampling (temperature 0.7, top-p 0.9) on these prompt files "
                        "(default: --prompts)")
    p.add_argument("--tree-sizes", default=None, metavar="T,T,...",
                   help="time Medusa steps of the first --heads with trees of these node counts (e.g. 16,32,64,128,256)")
    p.add_argument("--step-times", type=Path, default=DEFAULT_STEP_TIMES,
                   help="where --tree-sizes writes its step times (default bench/step-times.json)")
    g = p.add_argument_group("7B shape", "Llama-2-7B's by default (vocab 32000, dim 4096, 32 layers, 32 heads, "
                                         "32 KV heads, FFN 11008); smaller only for smoke tests")
    g.add_argument("--7b-vocab", dest="big_vocab", type=int, default=32000, metavar="N")
    g.add_argument("--7b-dim", dest="big_dim", type=int, default=4096, metavar="N")
    g.add_argument("--7b-layers", dest="big_layers", type=int, default=32, metavar="N")
    g.add_argument("--7b-heads", dest="big_heads", type=int, default=32, metavar="N")
    g.add_argument("--7b-kv-heads", dest="big_kv_heads", type=int, default=32, metavar="N")
    g.add_argument("--7b-ffn", dest="big_ffn", type=int, default=11008, metavar="N")
    g.add_argument("--7b-prefix", dest="big_prefix", type=int, default=1024, metavar="N",
                   help="tokens already in the cache (default 1024)")
    g.add_argument("--7b-reps", dest="big_reps", type=int, default=100, metavar="N",
                   help="timed replays per step, median taken (default 100)")
    g.add_argument("--copy-mib", type=int, default=1024, metavar="N",
                   help="tensor size for the copy-bandwidth test (default 1024 = 1 GiB)")
    return p.parse_args(argv)


def say(message: str) -> None:
    print(message, flush=True)


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    """A markdown table, columns padded to line up in a terminal."""
    cells = [headers] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    say(f"\n### {title}\n")
    say(line(cells[0]))
    say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        say(line(row))
    say("")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


# ---------------------------------------------------------------------------------------------------
# Inputs: prompts, heads, trees


@dataclass
class Prompt:
    id: str
    ids: list[int]  # the chat-templated prompt, tokenized
    category: str | None = None  # the prompt file's "category", if it gives one


def read_prompts(path: Path, limit: int | None) -> list[tuple[str, str, str | None]]:
    """(id, text, category) from a JSONL file of {"id", "prompt"[, "category"]} objects, the first `limit`."""
    if not path.is_file():
        raise NanoMedusaError(f"prompt file {path} does not exist; pass --prompts FILE.jsonl.")
    if limit is not None and limit < 1:
        raise NanoMedusaError(f"--num-prompts {limit} leaves nothing to run; pass 1 or more.")
    out = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines cuts at.
    for n, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out.append((str(record["id"]), record["prompt"], record.get("category")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NanoMedusaError(f"{path} line {n} is not a JSON object with \"id\" and \"prompt\"; "
                                  f"fix that line.") from None
    if not out:
        raise NanoMedusaError(f"{path} holds no prompts; add lines like {{\"id\": \"a\", \"prompt\": \"...\"}}.")
    return out[:limit]


def chat_prompts(tokenizer: Tokenizer, path: Path, limit: int | None) -> list[Prompt]:
    """The prompts of a JSONL file (`read_prompts`), each rendered with the chat template and tokenized."""
    return [Prompt(i, tokenizer.encode_chat([{"role": "user", "content": text}]), category)
            for i, text, category in read_prompts(path, limit)]


@dataclass
class HeadsSpec:
    label: str
    heads_dir: Path
    model_dir: Path | None  # the backbone these heads go with (Medusa-2); None: --model


def parse_heads_spec(text: str) -> HeadsSpec:
    """`[LABEL=]HEADS_DIR[@MODEL_DIR]`; without @MODEL_DIR a `model/` directory beside HEADS_DIR is used."""
    label, has_label, rest = text.partition("=")
    if not has_label:
        label, rest = "", text
    heads, has_model, model = rest.partition("@")
    heads_dir = Path(heads).expanduser()
    if not heads or (has_model and not model) or (has_label and not label):
        raise NanoMedusaError(f"--heads {text!r} is malformed; write [LABEL=]HEADS_DIR[@MODEL_DIR].")
    if has_model:
        model_dir = Path(model).expanduser()
    else:
        sibling = heads_dir.resolve().parent / "model"  # train.py's OUT/model beside OUT/heads
        model_dir = sibling if (sibling / "config.json").is_file() else None
    resolved = heads_dir.resolve()
    default_label = resolved.parent.name if resolved.name == "heads" else resolved.name  # train.py's OUT/heads: OUT
    return HeadsSpec(label or default_label, heads_dir, model_dir)


def heads_specs(args) -> list[HeadsSpec]:
    """The --heads to run, checked before anything slow starts."""
    specs = [parse_heads_spec(h) for h in args.heads]
    if not specs and args.model is None and (SHIPPED_HEADS / "config.json").is_file():
        specs = [HeadsSpec("shipped", SHIPPED_HEADS, None)]
    labels = [s.label for s in specs]
    for spec in specs:
        if labels.count(spec.label) > 1:
            raise NanoMedusaError(f"two --heads are both labelled {spec.label!r}; name them apart with LABEL=HEADS_DIR.")
        for kind, path in (("heads", spec.heads_dir), ("model", spec.model_dir)):
            if path is not None and not path.is_dir():
                raise NanoMedusaError(f"{kind} directory {path} of --heads {spec.label} does not exist; fix the path.")
    for spec in args.tree:
        if spec != "own":
            parse_tree(spec)  # a typo fails now, not after the first backbone's runs
    return specs


def trees_for(heads: MedusaHeads, tree_args: list[str]) -> list[tuple[str, list[list[int]]]]:
    """(label, paths) of each tree to run with these heads, paths deeper than the heads cut off."""
    depth = heads.config.num_heads
    out, seen = [], set()
    for i, spec in enumerate(tree_args or DEFAULT_TREES):
        if spec == "own":
            if not heads.config.medusa_choices:
                continue
            label, paths = "own", parse_tree(heads.config.medusa_choices)
        else:
            paths = parse_tree(spec)
            label = spec if spec in PRESETS else Path(spec).stem if spec.endswith(".json") else f"tree{i}"
        cut = [p for p in paths if len(p) <= depth]
        if len(cut) < len(paths):
            label = f"{label}<={depth}"
        key = tree_key(cut)
        if cut and key not in seen:  # the heads' own tree may well be one of the others
            seen.add(key)
            out.append((label, cut))
    return out


def tree_key(paths) -> tuple:
    return tuple(sorted(tuple(p) for p in paths))


# ---------------------------------------------------------------------------------------------------
# Measuring decoding on the prompts


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first token where two outputs differ (None when equal)."""
    if got == want:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def measure(label: str, run_one: Callable[[list[int]], GenerationResult], prompts: list[Prompt],
            warmup: list[Prompt], reference: list[list[int]] | None = None) -> tuple[dict, list[list[int]]]:
    """Run the `warmup` prompts untimed, then each prompt once: (per-prompt rows and totals, outputs).

    With `reference` (plain greedy outputs, one per prompt) each row says whether the output matched."""
    say(f"  [{label}] warm-up: {len(warmup)} prompt(s), untimed")
    for prompt in warmup:
        run_one(prompt.ids)
    rows, outputs = [], []
    for n, prompt in enumerate(prompts, 1):
        r = run_one(prompt.ids)
        row = {"id": prompt.id, "category": prompt.category, "prompt_tokens": len(prompt.ids), "new_tokens": len(r.tokens), "seconds": r.seconds,
               "prefill_seconds": r.prefill_seconds or None, "steps": r.steps,
               "tokens_per_second": r.tokens_per_second, "mean_accepted": r.mean_accepted}
        note = f", mean accepted {r.mean_accepted:.2f}" if r.mean_accepted != 1.0 else ""
        if reference is not None:
            diff = first_difference(r.tokens, reference[n - 1])
            row.update(matches_ar=diff is None, first_difference=diff)
            note += ", = AR" if diff is None else f", DIFFERS from AR at token {diff}"
        say(f"  [{label}] {n}/{len(prompts)} {prompt.id}: {len(r.tokens)} tokens in {r.seconds:.2f} s "
            f"({r.tokens_per_second:.1f} tokens/s{note})")
        rows.append(row)
        outputs.append(r.tokens)
    summary = {**totals(rows), "per_prompt": rows}
    categories = sorted({r["category"] for r in rows if r["category"]})
    if categories:
        summary["by_category"] = {c: totals([r for r in rows if r["category"] == c]) for c in categories}
    return summary, outputs


def warmup_prompts(prompts: list[Prompt], args) -> list[Prompt]:
    """What our methods run untimed first (see the module docstring for why all prompts)."""
    return prompts[:1] if args.quick_warmup else prompts


def totals(rows: list[dict]) -> dict:
    tokens, seconds, steps = (sum(r[k] for r in rows) for k in ("new_tokens", "seconds", "steps"))
    decode_seconds = seconds - sum(r["prefill_seconds"] or 0.0 for r in rows)
    out = {"prompts": len(rows), "new_tokens": tokens, "seconds": seconds, "steps": steps,
           "tokens_per_second": tokens / seconds if seconds else 0.0,
           # the decoding steps alone: the tokens after each prompt's first, over the time after its prefill
           "decode_tokens_per_second": (tokens - len(rows)) / decode_seconds if decode_seconds > 0 else 0.0,
           "mean_accepted": (tokens - len(rows)) / steps if steps else 1.0}
    if "matches_ar" in rows[0]:
        out["matches_ar"] = sum(r["matches_ar"] for r in rows)
    return out


def bench_ar(label: str, model, prompts: list[Prompt], args, eos_ids) -> tuple[dict, list[list[int]]]:
    """Our plain greedy decoding (CUDA graphs on a GPU)."""
    say(f"[ar] {label}: plain decoding, {len(prompts)} prompts")
    return measure(f"ar {label}", lambda ids: generate(model, ids, args.max_new_tokens, eos_ids=eos_ids),
                   prompts, warmup_prompts(prompts, args))


def bench_medusa(spec: HeadsSpec, backbone: str, model, prompts: list[Prompt], args, eos_ids,
                 reference: list[list[int]]) -> list[dict]:
    """Each tree with these heads: greedy Medusa decoding, checked against plain decoding's outputs."""
    heads = MedusaHeads.load(spec.heads_dir, model.config, device=model.device, dtype=model.dtype)
    results = []
    for tree_label, paths in trees_for(heads, args.tree):
        tree = TreeBuffers.from_choices(paths, device=model.device)
        say(f"[medusa] {spec.label} ({heads.config.num_heads} heads) on {backbone}, tree {tree_label} "
            f"({tree.num_nodes} nodes)")

        def run(ids: list[int]) -> GenerationResult:
            return generate_medusa(model, heads, tree, ids, args.max_new_tokens, eos_ids=eos_ids)

        summary, _ = measure(f"medusa {spec.label}/{tree_label}", run, prompts, warmup_prompts(prompts, args),
                             reference)
        results.append({"heads": spec.label, "heads_dir": str(spec.heads_dir), "backbone": backbone,
                        "num_heads": heads.config.num_heads, "tree": tree_label, "tree_nodes": tree.num_nodes,
                        "tree_paths": paths, **summary})
    return results


@dataclass
class Workload:
    """What the hf part reuses from the ar part."""
    ckpt: Path  # the --model checkpoint directory
    prompts: list[Prompt]
    eos_ids: list[int]
    reference: list[list[int]]  # plain greedy outputs of the base model, one per prompt


def bench_hf(work: Workload, ours_ar: float, args, device, dtype) -> dict:
    """transformers' own greedy `generate` on the same checkpoint, as users run it out of the box."""
    try:
        import transformers  # only here: transformers is no dependency of nanomedusa
    except ImportError:
        return {"skipped": "transformers is not installed (pip install transformers to run this part)"}
    say(f"[hf] transformers {transformers.__version__}: AutoModelForCausalLM.generate, {len(work.prompts)} prompts")
    hf = transformers.AutoModelForCausalLM.from_pretrained(work.ckpt, dtype=dtype).to(device).eval()
    eos = list(work.eos_ids) or None

    def run_one(ids: list[int]) -> GenerationResult:
        x = torch.tensor([ids], device=device)  # [1, P]
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None)
        _sync(device)
        tokens = out[0, len(ids):].tolist()
        return GenerationResult(tokens, time.perf_counter() - start, steps=max(len(tokens) - 1, 0))

    summary, _ = measure("hf", run_one, work.prompts, work.prompts[:1], work.reference)
    return {"transformers": transformers.__version__, **summary,
            "ours_ar_vs_hf": ours_ar / summary["tokens_per_second"]}


def run_ours(args, device, dtype, results: dict) -> Workload:
    """The ar and medusa parts: each backbone is loaded once and its heads run right after its AR."""
    specs = [] if args.no_medusa else heads_specs(args)
    if not args.no_medusa and not specs:
        say("[medusa] no --heads given and no shipped heads for this model: medusa part skipped.")
    backbones: dict[str, HeadsSpec | None] = {BASE: None}  # label -> the heads whose backbone it is
    for spec in specs:
        backbones.setdefault(spec_backbone(spec), spec)
    results.update(ar={}, medusa=[])
    work = None
    for backbone, owner in backbones.items():
        model, ckpt = load_backbone(backbone, owner, args, device, dtype)
        if work is None:  # every backbone gets the base model's tokenization of the prompts
            tokenizer = Tokenizer.from_dir(ckpt)
            prompts = chat_prompts(tokenizer, args.prompts, args.num_prompts)
            results["prompts"] = [{"id": p.id, "prompt_tokens": len(p.ids)} for p in prompts]
            work = Workload(ckpt, prompts, tokenizer.eos_ids, [])
        results["ar"][backbone], reference = bench_ar(backbone, model, work.prompts, args, work.eos_ids)
        if backbone == BASE:
            work.reference = reference
        for spec in specs:
            if spec_backbone(spec) == backbone:
                results["medusa"] += bench_medusa(spec, backbone, model, work.prompts, args, work.eos_ids, reference)
        del model
        free_memory(device)
    for m in results["medusa"]:
        ar = results["ar"][m["backbone"]]
        m["vs_ar"] = m["tokens_per_second"] / ar["tokens_per_second"]
        m["decode_vs_ar"] = m["decode_tokens_per_second"] / ar["decode_tokens_per_second"]
        for category, c in m.get("by_category", {}).items():
            c["vs_ar"] = c["tokens_per_second"] / ar["by_category"][category]["tokens_per_second"]
    return work


def load_backbone(label: str, owner: HeadsSpec | None, args, device, dtype):
    """-> (model, checkpoint dir): --model, or the backbone the heads `owner` were trained with."""
    model_dir = owner.model_dir if owner else None
    say(f"[load] {label}: {model_dir or args.model or 'the default model'} on {device} in {dtype}")
    model, ckpt = load_model(model_dir if model_dir is not None else args.model, device, dtype)
    if owner and model_dir is None and has_adapter(owner.heads_dir):
        say(f"[load] {apply_adapter(model, owner.heads_dir)}")
    return model, ckpt


def spec_backbone(spec: HeadsSpec) -> str:
    """The label of the backbone a heads checkpoint runs on."""
    if spec.model_dir is None:
        return f"{BASE}+{spec.label} adapter" if has_adapter(spec.heads_dir) else BASE
    path = spec.model_dir.resolve()
    return f"{path.parent.name}/{path.name}"


def first_heads(args, device, dtype, why: str) -> tuple[HeadsSpec, Transformer, MedusaHeads, Tokenizer]:
    """The first --heads on its backbone, for a part that needs heads (`why` it does, for the error)."""
    specs = heads_specs(args)
    if not specs:
        raise NanoMedusaError(f"{why}; pass --heads HEADS_DIR.")
    spec = specs[0]
    model, ckpt = load_backbone(spec_backbone(spec), spec, args, device, dtype)
    heads = MedusaHeads.load(spec.heads_dir, model.config, device=model.device, dtype=model.dtype)
    return spec, model, heads, Tokenizer.from_dir(ckpt)


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Step time against tree size (for sizing trees to the hardware)


def rank_accuracy(heads_dir: Path, num_heads: int) -> list[list[float]]:
    """The heads' measured rank accuracies (tree_tuning.py --write stores them), else a generic decay."""
    stored = json.loads((heads_dir / "config.json").read_text()).get("rank_accuracy")
    return stored or [[0.6 ** (k + 1) * 0.5 ** i for i in range(10)] for k in range(num_heads)]


@torch.inference_mode()
def bench_tree_sizes(args, device, dtype) -> dict:
    """Mean decoding-step time of plain decoding and of Medusa with trees of each --tree-sizes node
    count (the whole step: forward, acceptance, compaction, next guesses), over the first prompts."""
    spec, model, heads, tokenizer = first_heads(args, device, dtype, "--tree-sizes times the steps of Medusa heads")
    prompts = chat_prompts(tokenizer, args.prompts, args.num_prompts or 4)
    acc = rank_accuracy(spec.heads_dir, heads.config.num_heads)

    def decode_step_ms(summary: dict) -> float:  # the decoding steps alone, prefill excluded
        decode_seconds = summary["seconds"] - sum(r["prefill_seconds"] or 0.0 for r in summary["per_prompt"])
        return 1e3 * decode_seconds / max(summary["steps"], 1)

    plain, _ = measure("sizes plain", lambda ids: generate(model, ids, args.max_new_tokens, eos_ids=tokenizer.eos_ids),
                       prompts, prompts)
    sizes = []
    for nodes in sorted({int(t) for t in args.tree_sizes.split(",")}):
        paths = tree_from_head_accuracies(acc, nodes - 1)
        tree = TreeBuffers.from_choices(paths, device=device)

        def run(ids: list[int]) -> GenerationResult:
            return generate_medusa(model, heads, tree, ids, args.max_new_tokens, eos_ids=tokenizer.eos_ids)

        summary, _ = measure(f"sizes T={nodes}", run, prompts, prompts)
        sizes.append({"nodes": nodes, "step_ms": decode_step_ms(summary), "mean_accepted": summary["mean_accepted"],
                      "paths": paths})
    out = {"device": metadata(args, device, dtype)["device"], "heads": str(spec.heads_dir),
           "plain_step_ms": decode_step_ms(plain), "trees": sizes}
    save(out, args.step_times)
    del model
    free_memory(device)
    return out


# ---------------------------------------------------------------------------------------------------
# Sampling: plain against lossless Medusa sampling and typical acceptance

SAMPLING = Sampling(temperature=0.7, top_p=0.9)
PLAIN_SAMPLING = "plain sampling"  # the baseline of the speedups


@torch.inference_mode()
def bench_sampling(args, device, dtype) -> dict:
    """Each method at SAMPLING on each --sampling prompt set, with the first --heads and its first tree
    (its own, unless --tree says otherwise). Every prompt is sampled with its own seed, the same for every
    method; plain greedy decoding is there for the cost of sampling itself."""
    spec, model, heads, tokenizer = first_heads(args, device, dtype,
                                                "--sampling compares Medusa heads with plain sampling")
    tree_label, paths = trees_for(heads, args.tree)[0]
    tree = TreeBuffers.from_choices(paths, device=device)
    n, eos = args.max_new_tokens, tokenizer.eos_ids
    methods = {  # label -> decode(prompt ids, generator)
        "plain greedy": lambda ids, gen: generate(model, ids, n, eos_ids=eos),
        PLAIN_SAMPLING: lambda ids, gen: generate(model, ids, n, SAMPLING, eos_ids=eos, generator=gen),
        "Medusa lossless": lambda ids, gen: generate_medusa(model, heads, tree, ids, n, SAMPLING, accept="sample",
                                                            eos_ids=eos, generator=gen),
        "Medusa typical": lambda ids, gen: generate_medusa(model, heads, tree, ids, n, SAMPLING, accept="typical",
                                                           eos_ids=eos, generator=gen),
    }
    sets = {}
    for path in args.sampling or [args.prompts]:
        prompts = chat_prompts(tokenizer, path, args.num_prompts)
        seeds = {tuple(p.ids): seed for seed, p in enumerate(prompts)}
        say(f"[sampling] {path.stem}: {len(prompts)} prompts, {spec.label} heads, tree {tree_label}")
        rows = {}
        for label, decode in methods.items():
            def run(ids: list[int], decode=decode) -> GenerationResult:
                return decode(ids, torch.Generator(device).manual_seed(seeds[tuple(ids)]))

            rows[label], _ = measure(f"sampling {path.stem} {label}", run, prompts, warmup_prompts(prompts, args))
        for row in rows.values():
            row["vs_plain_sampling"] = row["tokens_per_second"] / rows[PLAIN_SAMPLING]["tokens_per_second"]
            row["decode_vs_plain_sampling"] = (row["decode_tokens_per_second"]
                                               / rows[PLAIN_SAMPLING]["decode_tokens_per_second"])
        sets[path.stem] = rows
    del model
    free_memory(device)
    return {"temperature": SAMPLING.temperature, "top_p": SAMPLING.top_p, "heads": spec.label, "tree": tree_label,
            "tree_nodes": tree.num_nodes, "sets": sets}


def print_sampling_tables(sampling: dict) -> None:
    for name, rows in sampling["sets"].items():
        print_table(f"Sampling: {name} (temperature {sampling['temperature']}, top-p {sampling['top_p']}; "
                    f"{sampling['heads']} heads, tree {sampling['tree']}, T={sampling['tree_nodes']})",
                    ["method", "mean accepted", "tokens/s", "vs plain sampling", "decode tokens/s",
                     "decode vs plain sampling"],
                    [[label, r["mean_accepted"], r["tokens_per_second"], f"{r['vs_plain_sampling']:.2f}x",
                      r["decode_tokens_per_second"], f"{r['decode_vs_plain_sampling']:.2f}x"]
                     for label, r in rows.items()])


# ---------------------------------------------------------------------------------------------------
# 7B-shaped step times


def median_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of `fn` over `reps` timed calls after a few untimed ones (CUDA events on GPU)."""
    for _ in range(max(3, reps // 10)):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def build_7b(args, device, dtype, cache_len: int) -> Transformer:
    """A Llama-7B-shaped model with random weights, made directly on `device` in `dtype`."""
    config = ModelConfig(vocab_size=args.big_vocab, dim=args.big_dim, n_layers=args.big_layers,
                         n_heads=args.big_heads, n_kv_heads=args.big_kv_heads, intermediate_size=args.big_ffn,
                         max_position_embeddings=max(4096, cache_len))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # matrices get small random values; the norms keep their ones
                p.normal_(0.0, 0.02)
    model.eval()
    model.setup_cache(cache_len)
    return model


def step_ms(model: Transformer, prefix: int, tree: TreeBuffers | None, reps: int) -> float:
    """One CUDA-graphed forward of T new tokens (1 for decode, else the tree's nodes) after `prefix`
    cached ones, lm_head included: median milliseconds."""
    device = model.device
    mask = tree.attn_mask if tree else torch.ones(1, 1, dtype=torch.bool, device=device)  # [T, T]
    depths = tree.depths if tree else torch.zeros(1, dtype=torch.long, device=device)  # [T]

    def step(tokens, prefix_len):  # [1, T] -> logits [1, T, V]
        return model(tokens, prefix_len=prefix_len, positions=prefix_len + depths, tree_mask=mask)

    tokens = torch.randint(model.config.vocab_size, (1, depths.numel()), device=device)
    prefix_len = torch.tensor(prefix, device=device)
    graphed = GraphedStep(step, tokens, prefix_len)
    return median_ms(lambda: graphed(tokens, prefix_len), device, reps)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s: each copy reads and writes `nbytes`."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device, reps)
    return 2 * nbytes / (ms / 1e3)


def step_trees(medusa: list[dict]) -> list[tuple[str, list[list[int]]]]:
    """The trees to time on the 7B shape: STEP_TREES and every tree of the medusa part, once each."""
    trees = {tree_key(paths): (label, paths) for label, paths in STEP_TREES.items()}
    for entry in medusa:
        label = f"{entry['heads']}/own" if entry["tree"] == "own" else entry["tree"]
        trees.setdefault(tree_key(entry["tree_paths"]), (label, entry["tree_paths"]))
    return list(trees.values())


@torch.inference_mode()
def bench_7b(args, device, dtype, medusa: list[dict]) -> dict:
    """Step times of a random 7B-shaped model, its bandwidth floor and the projected Medusa speedup."""
    trees = [(label, TreeBuffers.from_choices(paths, device=device)) for label, paths in step_trees(medusa)]
    prefix = args.big_prefix
    cache_len = max(2048, prefix + max(t.num_nodes for _, t in trees)) + 128
    say(f"[7b] building a random {args.big_layers}-layer, {args.big_dim}-wide model on {device} in {dtype}")
    model = build_7b(args, device, dtype, cache_len)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    say(f"[7b] {weight_bytes / 1e9:.2f} GB of weights; prefill of {prefix} tokens, cache of {cache_len}")
    model.forward_hidden(torch.randint(args.big_vocab, (1, prefix), device=device), prefix_len=0)
    decode = step_ms(model, prefix, None, args.big_reps)
    say(f"[7b] decode step (T = 1): {decode:.3f} ms")
    tree_steps, tree_ms = [], {}
    for label, tree in trees:
        ms = tree_ms[tree_key(tree.paths[1:])] = step_ms(model, prefix, tree, args.big_reps)
        say(f"[7b] tree step {label} (T = {tree.num_nodes}): {ms:.3f} ms")
        tree_steps.append({"tree": label, "nodes": tree.num_nodes, "ms": ms, "vs_decode": ms / decode})
    del model
    free_memory(device)
    bandwidth = copy_bandwidth(device, args.copy_mib << 20, args.big_reps)
    # The floor counts every weight once (the embedding table too, of which a step reads only T rows)
    # and not the KV cache; the real step must also read the cache.
    floor = weight_bytes / bandwidth * 1e3
    say(f"[7b] copy bandwidth {bandwidth / 1e12:.3f} TB/s -> floor {floor:.3f} ms per step")
    projected = []
    for m in medusa:
        ms = tree_ms[tree_key(m["tree_paths"])]
        projected.append({"heads": m["heads"], "tree": m["tree"], "tree_nodes": m["tree_nodes"],
                          "mean_accepted": m["mean_accepted"], "tree_ms": ms,
                          "speedup": m["mean_accepted"] * decode / ms})
    return {"config": {"vocab_size": args.big_vocab, "dim": args.big_dim, "n_layers": args.big_layers,
                       "n_heads": args.big_heads, "n_kv_heads": args.big_kv_heads,
                       "intermediate_size": args.big_ffn},
            "prefix": prefix, "cache_len": cache_len, "reps": args.big_reps, "weight_bytes": weight_bytes,
            "decode_ms": decode, "tree_steps": tree_steps, "copy_bytes": 2 * (args.copy_mib << 20),
            "copy_bandwidth_bytes_per_s": bandwidth, "floor_ms": floor, "decode_vs_floor": decode / floor,
            "projected": projected}


# ---------------------------------------------------------------------------------------------------
# Reporting


def print_ours_tables(results: dict) -> None:
    print_table("Plain decoding (ours)",
                ["backbone", "prompts", "new tokens", "seconds", "tokens/s", "mean prefill ms", "decode tokens/s"],
                [[b, r["prompts"], r["new_tokens"], r["seconds"], r["tokens_per_second"],
                  1e3 * statistics.mean(p["prefill_seconds"] or 0.0 for p in r["per_prompt"]),
                  r["decode_tokens_per_second"]] for b, r in results["ar"].items()])
    if results["medusa"]:
        print_table("Medusa (ours, greedy)",
                    ["heads", "backbone", "tree", "T", "tokens/s", "vs AR", "mean accepted", "= AR",
                     "decode tokens/s", "decode vs AR"],
                    [[m["heads"], m["backbone"], m["tree"], m["tree_nodes"], m["tokens_per_second"],
                      f"{m['vs_ar']:.2f}x", m["mean_accepted"], f"{m['matches_ar']}/{m['prompts']}",
                      m["decode_tokens_per_second"], f"{m['decode_vs_ar']:.2f}x"] for m in results["medusa"]])


def print_category_table(results: dict) -> None:
    """Mean accepted length and speedup over plain decoding, per prompt category."""
    medusa = [m for m in results["medusa"] if "by_category" in m]
    if not medusa:
        return
    categories = list(medusa[0]["by_category"])
    print_table("Medusa by prompt category (mean accepted / vs AR)", ["heads", "tree"] + categories,
                [[m["heads"], m["tree"]] + [f"{m['by_category'][c]['mean_accepted']:.2f} / "
                                            f"{m['by_category'][c]['vs_ar']:.2f}x" for c in categories]
                 for m in medusa])


def print_sizes_table(sizes: dict) -> None:
    plain = sizes["plain_step_ms"]
    print_table(f"Step time against tree size ({sizes['device']}; plain step {plain:.3f} ms)",
                ["nodes", "step ms", "vs plain step", "mean accepted", "accepted per ms"],
                [[t["nodes"], f"{t['step_ms']:.3f}", f"{t['step_ms'] / plain:.2f}x", t["mean_accepted"],
                  f"{t['mean_accepted'] / t['step_ms']:.2f}"] for t in sizes["trees"]])


def print_hf_table(results: dict) -> None:
    hf = results["hf"]
    if "skipped" in hf:
        say(f"[hf] skipped: {hf['skipped']}")
    else:
        print_table("Hugging Face transformers generate (greedy)",
                    ["transformers", "prompts", "new tokens", "seconds", "tokens/s", "ours AR / HF", "= our AR"],
                    [[hf["transformers"], hf["prompts"], hf["new_tokens"], hf["seconds"], hf["tokens_per_second"],
                      f"{hf['ours_ar_vs_hf']:.2f}x",
                      f"{hf['matches_ar']}/{hf['prompts']}"]])


def print_7b_tables(big: dict) -> None:
    rows = [["decode", 1, big["decode_ms"], 1.0]] + [
        [f"tree {s['tree']}", s["nodes"], s["ms"], s["vs_decode"]] for s in big["tree_steps"]]
    rows.append(["floor: weights / copy bandwidth", "-", big["floor_ms"], big["floor_ms"] / big["decode_ms"]])
    print_table(f"7B-shaped steps (prefix {big['prefix']}, lm_head included, CUDA graphs, median of {big['reps']})",
                ["step", "T", "ms", "vs decode"], rows)
    if big["projected"]:
        print_table("Projected Medusa speedup on the 7B shape (mean accepted x t_decode / t_tree)",
                    ["heads", "tree", "T", "mean accepted", "tree ms", "speedup"],
                    [[p["heads"], p["tree"], p["tree_nodes"], p["mean_accepted"], p["tree_ms"],
                      f"{p['speedup']:.2f}x"]
                     for p in big["projected"]])


def print_summary(results: dict) -> None:
    rows = []
    for backbone, r in results.get("ar", {}).items():
        rows.append([f"AR, ours ({backbone})", f"{r['tokens_per_second']:.1f} tokens/s"])
    projected = {(p["heads"], p["tree"]): p["speedup"] for p in results.get("7b", {}).get("projected", [])}
    for m in results.get("medusa", []):
        proj = projected.get((m["heads"], m["tree"]))
        rows.append([f"Medusa {m['heads']} / {m['tree']}",
                     f"{m['tokens_per_second']:.1f} tokens/s, {m['vs_ar']:.2f}x AR, "
                     f"mean accepted {m['mean_accepted']:.2f}, {m['matches_ar']}/{m['prompts']} = AR"
                     + (f", 7B projected {proj:.2f}x" if proj else "")])
    hf = results.get("hf", {})
    if "tokens_per_second" in hf:
        rows.append(["HF transformers",
                     f"{hf['tokens_per_second']:.1f} tokens/s (ours AR is {hf['ours_ar_vs_hf']:.2f}x that)"])
    big = results.get("7b")
    if big:
        steps = ", ".join(f"{s['tree']} (T={s['nodes']}) {s['ms']:.2f}" for s in big["tree_steps"])
        rows.append(["7B step ms", f"decode {big['decode_ms']:.2f}, {steps}"])
        rows.append(["7B floor (weights / copy bandwidth)",
                     f"{big['floor_ms']:.2f} ms ({big['weight_bytes'] / 1e9:.1f} GB at "
                     f"{big['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s)"])
    print_table(f"Summary ({results['meta']['device']})", ["", ""], rows)


def metadata(args, device: torch.device, dtype: torch.dtype) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "dtype": str(dtype).removeprefix("torch."),
            "kernels": args.kernels,
            "args": json.loads(json.dumps(vars(args), default=str))}  # paths (--sampling's too) as strings


def save(results: dict, path: Path) -> None:
    """Written after each part, so a long run that fails late keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def check_args(args) -> None:
    """Flag values and output paths before anything slow starts (heads_specs and read_prompts check the inputs)."""
    check_at_least(1, {"--max-new-tokens": args.max_new_tokens, "--7b-vocab": args.big_vocab, "--7b-dim": args.big_dim,
                       "--7b-layers": args.big_layers, "--7b-heads": args.big_heads, "--7b-kv-heads": args.big_kv_heads,
                       "--7b-ffn": args.big_ffn, "--7b-reps": args.big_reps, "--copy-mib": args.copy_mib})
    check_at_least(0, {"--7b-prefix": args.big_prefix})
    if args.tree_sizes is not None and not re.fullmatch(r"\d+(,\d+)*", args.tree_sizes):
        raise NanoMedusaError(f"--tree-sizes {args.tree_sizes!r} is not a comma-separated list of node counts; "
                              f"pass e.g. 16,32,64.")
    check_at_least(2, {"--tree-sizes": min(int(t) for t in args.tree_sizes.split(",")) if args.tree_sizes else None})
    check_output_file("--json", args.json)
    check_output_file("--step-times", args.step_times)
    for path in args.sampling or ():
        read_prompts(path, args.num_prompts)  # a missing or malformed prompt file fails now
    check_kernels(args.kernels, resolve_device(args.device))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        kernels.set_backend(args.kernels)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        results = {"meta": metadata(args, device, dtype)}
        say(f"[bench] {results['meta']['device']}, torch {torch.__version__}, {results['meta']['dtype']}")
        if not args.skip_e2e:
            work = run_ours(args, device, dtype, results)
            print_ours_tables(results)
            print_category_table(results)
            save(results, args.json)
            results["hf"] = {"skipped": "--no-hf"} if args.no_hf else bench_hf(
                work, results["ar"][BASE]["tokens_per_second"], args, device, dtype)
            print_hf_table(results)
            save(results, args.json)
            free_memory(device)
        if args.tree_sizes:
            results["sizes"] = bench_tree_sizes(args, device, dtype)
            print_sizes_table(results["sizes"])
            save(results, args.json)
        if args.sampling is not None:
            results["sampling"] = bench_sampling(args, device, dtype)
            print_sampling_tables(results["sampling"])
            save(results, args.json)
        if not args.skip_7b:
            results["7b"] = bench_7b(args, device, dtype, results.get("medusa", []))
            print_7b_tables(results["7b"])
        save(results, args.json)
        print_summary(results)
        say(f"[bench] raw numbers written to {args.json}")
    except NanoMedusaError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())

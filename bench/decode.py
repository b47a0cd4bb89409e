"""End-to-end benchmark: our plain decoding vs Medusa vs Hugging Face transformers, plus step times and sampling.

    python -m bench.decode                          # everything: default model, its shipped heads, GPU, bf16
    python -m bench.decode --heads m1=out/warmup/heads --heads m2=out/joint/heads@out/joint/model
    python -m bench.decode --tree chain4 --tree mc_sim_7b_63 --num-prompts 8 --no-hf --skip-7b
    python -m bench.decode --skip-e2e               # only the 7B-shaped step times
    python -m bench.decode --skip-e2e --skip-7b --sampling bench/prompts-chat-heldout.jsonl \
        bench/prompts-train-mix.jsonl               # only sampling: plain vs Medusa, on two prompt sets

Parts, each printed as a table when it finishes and all saved to --json (default work/bench/results.json, in the
repository's ignored work/ folder; bench/ keeps the records of past runs, which a rerun should not overwrite):

  ar      our plain decoding (`generate`, CUDA graphs), on each backbone: tokens/s
  medusa  each --heads checkpoint x each --tree: tokens/s, mean accepted length, and how many prompts
          came out token for token equal to plain greedy decoding on the same backbone; per prompt
          category too, where the prompt file gives each prompt a "category"
  sizes   with --tree-sizes: the step time of the first --heads against the tree's node count
          (bench/steps.py), written to --step-times (default work/bench/step-times.json) for
          `python -m nanomedusa.tree_tuning --step-times`
  hf      transformers' `generate(do_sample=False)` on the same prompts: tokens/s
  sampling with --sampling: plain and Medusa sampling on each prompt set given (bench/sampling.py)
  7b      a randomly initialised Llama-7B-shaped model: decode and tree-verification step times, the
          bandwidth floor of a step, and the Medusa speedup projected from the acceptance measured above
          (bench/steps.py)
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

A --heads argument is `[LABEL=]HEADS_DIR[@MODEL_DIR]` (bench/checkpoints.py says which backbone heads go
with); the outputs of Medusa-2 heads are checked against their own backbone's plain decoding.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanomedusa.cli import (ArgumentParser, add_chat_format_flag, add_kernel_flags, check_at_least, check_kernels,
                            check_output_file, exit_with, run_reporting_errors, use_kernels)
from nanomedusa.decoder import Decoder, sync
from nanomedusa.generation import GenerationResult, generate
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import resolve_device, resolve_dtype
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.tokenizer import load_tokenizer
from nanomedusa.tree import TreeBuffers

from .checkpoints import BASE, HeadsSpec, free_memory, heads_specs, load_backbone, spec_backbone, trees_for
from .checks import int_list
from .prompts import DEFAULT_PROMPTS, Prompt, chat_prompts, measure, read_prompts, warmup_prompts
from .report import DEFAULT_OUT, metadata, print_table, save, say
from .sampling import bench_sampling, print_sampling_tables
from .steps import SHAPES, bench_7b, bench_tree_sizes, check_7b_shape, print_7b_tables, print_sizes_table

DEFAULT_JSON = DEFAULT_OUT / "results.json"
DEFAULT_STEP_TIMES = DEFAULT_OUT / "step-times.json"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="checkpoint dir, .gguf or hub id (default: the built-in default model)")
    p.add_argument("--device", default="cuda", help="cpu, cuda (default), cuda:N or auto")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16, float32 or auto")
    add_kernel_flags(p)
    add_chat_format_flag(p)  # the prompts' format: the one the heads were trained on
    p.add_argument("--prompts", type=Path, nargs="+", default=[DEFAULT_PROMPTS], metavar="FILE",
                   help="JSONL files of {\"id\", \"prompt\"}, their prompts run in order "
                        "(default bench/prompts-train-mix.jsonl)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="use the first N prompts of each --prompts and --sampling file (default: all; --tree-sizes: "
                        "4 of each)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default 128)")
    p.add_argument("--heads", action="append", default=[], metavar="[LABEL=]HEADS_DIR[@MODEL_DIR]",
                   help="Medusa heads to benchmark (repeatable; default: the shipped heads of the default model)")
    p.add_argument("--tree", action="append", default=[], metavar="NAME|JSON|FILE",
                   help="tree to benchmark, or \"own\" for the heads' own (repeatable; default: own, chain4 and "
                        "mc_sim_7b_63, each cut to the number of heads)")
    p.add_argument("--quick-warmup", action="store_true", help="warm our methods up on the first prompt only")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write all raw numbers (default work/bench/results.json, git-ignored)")
    p.add_argument("--skip-e2e", action="store_true", help="skip the ar, medusa and hf parts")
    p.add_argument("--no-medusa", action="store_true", help="skip the medusa part")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers part")
    p.add_argument("--skip-7b", action="store_true", help="skip the 7B-shaped step times")
    p.add_argument("--sampling", nargs="*", type=Path, default=None, metavar="PROMPTS",
                   help="also benchmark sampling (temperature 0.7, top-p 0.9) on these prompt files "
                        "(default: --prompts)")
    p.add_argument("--tree-sizes", default=None, metavar="T,T,...",
                   help="time Medusa steps of the first --heads with trees of these node counts "
                        "(e.g. 16,32,64,128,256)")
    p.add_argument("--step-times", type=Path, default=DEFAULT_STEP_TIMES,
                   help="where --tree-sizes writes its step times (default work/bench/step-times.json, git-ignored; "
                        "bench/step-times.json is the H200's record)")
    g = p.add_argument_group("7B shape", "Llama-2-7B's by default (vocab 32000, dim 4096, 32 layers, 32 heads, "
                                         "32 KV heads, FFN 11008); smaller only for smoke tests")
    g.add_argument("--7b-vocab", dest="big_vocab", type=int, default=SHAPES["7b"]["big_vocab"], metavar="N")
    g.add_argument("--7b-dim", dest="big_dim", type=int, default=SHAPES["7b"]["big_dim"], metavar="N")
    g.add_argument("--7b-layers", dest="big_layers", type=int, default=SHAPES["7b"]["big_layers"], metavar="N")
    g.add_argument("--7b-heads", dest="big_heads", type=int, default=SHAPES["7b"]["big_heads"], metavar="N")
    g.add_argument("--7b-kv-heads", dest="big_kv_heads", type=int, default=SHAPES["7b"]["big_kv_heads"], metavar="N")
    g.add_argument("--7b-ffn", dest="big_ffn", type=int, default=SHAPES["7b"]["big_ffn"], metavar="N")
    g.add_argument("--7b-prefix", dest="big_prefix", type=int, default=1024, metavar="N",
                   help="tokens already in the cache (default 1024)")
    g.add_argument("--7b-reps", dest="big_reps", type=int, default=100, metavar="N",
                   help="timed replays per step, median taken (default 100)")
    g.add_argument("--copy-mib", type=int, default=1024, metavar="N",
                   help="tensor size for the copy-bandwidth test (default 1024 = 1 GiB)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# The ar, medusa and hf parts


def bench_ar(label: str, model, prompts: list[Prompt], args, eos_ids) -> tuple[dict, list[list[int]]]:
    """Our plain greedy decoding (CUDA graphs on a GPU)."""
    say(f"[ar] {label}: plain decoding, {len(prompts)} prompts")
    decoder = Decoder(model)  # one for all prompts: the warm-up prompts capture the graphs the timed ones replay
    return measure(f"ar {label}", lambda ids: generate(decoder, ids, args.max_new_tokens, eos_ids=eos_ids),
                   prompts, warmup_prompts(prompts, args.quick_warmup))


def bench_medusa(spec: HeadsSpec, backbone: str, model, prompts: list[Prompt], args, eos_ids,
                 reference: list[list[int]]) -> list[dict]:
    """Each tree with these heads: greedy Medusa decoding, checked against plain decoding's outputs."""
    heads = MedusaHeads.load(spec.heads_dir, model.config, device=model.device, dtype=model.dtype)
    decoder = Decoder(model)  # one for all trees and prompts (see bench_ar)
    results = []
    for tree_label, paths in trees_for(heads, args.tree):
        tree = TreeBuffers.from_choices(paths, device=model.device)
        say(f"[medusa] {spec.label} ({heads.config.num_heads} heads) on {backbone}, tree {tree_label} "
            f"({tree.num_nodes} nodes)")

        def run(ids: list[int]) -> GenerationResult:
            return generate_medusa(decoder, heads, tree, ids, args.max_new_tokens, eos_ids=eos_ids)

        summary, _ = measure(f"medusa {spec.label}/{tree_label}", run, prompts,
                             warmup_prompts(prompts, args.quick_warmup), reference)
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
            tokenizer = load_tokenizer(ckpt, args.chat_format)
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


def bench_hf(work: Workload, ours_ar: float, args, device, dtype) -> dict:
    """transformers' own greedy `generate` on the same checkpoint, as users run it out of the box."""
    try:
        import transformers  # only here: transformers is no dependency of nanomedusa
    except ImportError:
        return {"skipped": 'transformers is not installed (pip install "transformers>=5,<5.25" to run this part: '
                           'later ones bring a package named kernels that hides ours)'}
    say(f"[hf] transformers {transformers.__version__}: AutoModelForCausalLM.generate, {len(work.prompts)} prompts")
    hf = transformers.AutoModelForCausalLM.from_pretrained(work.ckpt, dtype=dtype).to(device).eval()
    eos = list(work.eos_ids) or None

    def run_one(ids: list[int]) -> GenerationResult:
        # The wall clock around one whole generation, as our `generate` reports its own: not bench/timer.py,
        # which times a repeated call of a fixed shape, not a generation.
        x = torch.tensor([ids], device=device)  # [1, P]
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                              do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None)
        sync(device)
        tokens = out[0, len(ids):].tolist()
        return GenerationResult(tokens, time.perf_counter() - start, steps=max(len(tokens) - 1, 0))

    summary, _ = measure("hf", run_one, work.prompts, work.prompts[:1], work.reference)
    return {"transformers": transformers.__version__, **summary,
            "ours_ar_vs_hf": ours_ar / summary["tokens_per_second"]}


# ---------------------------------------------------------------------------------------------------
# Tables


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


# ---------------------------------------------------------------------------------------------------
# The command line


def check_args(args) -> None:
    """Flag values, prompt files and output paths before anything slow starts (heads_specs checks the heads)."""
    check_at_least(1, {"--max-new-tokens": args.max_new_tokens, "--num-prompts": args.num_prompts,
                       "--7b-reps": args.big_reps, "--copy-mib": args.copy_mib})
    check_7b_shape(args)
    if args.tree_sizes is not None:
        int_list("--tree-sizes", args.tree_sizes, 2, what="node counts")
    check_output_file("--json", args.json)
    check_output_file("--step-times", args.step_times)
    for flag, paths in (("--prompts", args.prompts), ("--sampling", args.sampling or ())):
        for path in paths:
            read_prompts(path, args.num_prompts, flag)  # a missing or malformed prompt file fails now
    check_kernels(args.kernels, resolve_device(args.device), args.exact)


def run(args) -> None:
    """Every part the flags ask for, in order; the JSON file is rewritten after each."""
    check_args(args)
    device = resolve_device(args.device)
    use_kernels(args.kernels, args.exact, device)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: run(args))


if __name__ == "__main__":
    exit_with(main())

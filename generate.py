"""Stream text from a Llama-family model, with or without Medusa heads.

    python generate.py --prompt "Explain how a bicycle works."                 # default model (+ its heads)
    python generate.py --model path/or/hub-id --medusa heads_dir --tree mc_sim_7b_63 --prompt "..."
    python generate.py --prompt "..." --compare                                 # AR vs Medusa, with speedup

The path of one token: tokenizer (nanomedusa/tokenizer.py) -> model (nanomedusa/model.py, whose
attention and norms are kernels/) -> plain decoding (nanomedusa/generation.py) or Medusa
(nanomedusa/medusa_generation.py: heads.py guesses, tree.py shapes the guesses, kernels/ verify them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import kernels
from nanomedusa.errors import NanoMedusaError
from nanomedusa.generation import GenerationResult, generate
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.medusa_generation import ACCEPT_MODES, generate_medusa
from nanomedusa.sampling import Sampling
from nanomedusa.tokenizer import Tokenizer
from nanomedusa.tree import TreeBuffers, parse_tree

DEFAULT_TREE = "mc_sim_7b_63"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="the user message (rendered with the model's chat template)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--model", default=None, help="checkpoint dir, .gguf file or hub id (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--medusa", default=None, help="Medusa heads directory (default: the shipped heads of the default model)")
    p.add_argument("--no-medusa", action="store_true", help="plain autoregressive decoding")
    p.add_argument("--tree", default=None, help=f"tree preset name or JSON list of paths (default: the heads' own, else {DEFAULT_TREE})")
    p.add_argument("--accept", default=None, choices=ACCEPT_MODES,
                   help="greedy (default at temperature 0), typical, or sample (lossless, default at temperature > 0)")
    p.add_argument("--posterior-threshold", type=float, default=0.09, help="typical acceptance epsilon")
    p.add_argument("--posterior-alpha", type=float, default=0.3, help="typical acceptance alpha")
    p.add_argument("--compare", action="store_true", help="run plain decoding and Medusa on the prompt and print the speedup")
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"), help="kernel backend")
    p.add_argument("--quiet", action="store_true", help="do not stream the text")
    return p.parse_args(argv)


# Medusa-1 heads trained for the built-in default model and committed with the project.
SHIPPED_HEADS = Path(__file__).resolve().parent / "weights" / "smollm2-135m-instruct-medusa"


def default_heads_dir(args, device: torch.device) -> Path | None:
    """The shipped heads, when the model is the built-in default, they are present and the device is a GPU.

    On a CPU decoding is compute-bound: verifying a tree of T candidates costs about T times a plain step,
    so Medusa is slower there (measured: 6 vs 16 tokens/s on 2 cores). It still runs with --medusa DIR."""
    if args.model is not None or not (SHIPPED_HEADS / "config.json").is_file():
        return None
    if device.type == "cpu" and not args.compare:
        print("[note] on a CPU the default is plain decoding (Medusa pays off on a GPU, where decoding is "
              f"memory-bound); pass --medusa {SHIPPED_HEADS} to use the shipped heads anyway.", file=sys.stderr)
        return None
    return SHIPPED_HEADS


def load_heads(args, model):
    if args.no_medusa and not args.compare:
        return None, None
    path = args.medusa or default_heads_dir(args, model.device)
    if path is None:
        if args.compare:
            raise NanoMedusaError("--compare needs Medusa heads for this model; pass --medusa HEADS_DIR.")
        return None, None
    heads = MedusaHeads.load(path, model.config, device=model.device, dtype=model.dtype)
    tree_spec = args.tree or heads.config.medusa_choices or DEFAULT_TREE
    choices = parse_tree(tree_spec)
    if args.tree is None:  # a default tree deeper than the heads: drop the paths the heads cannot fill
        choices = [c for c in choices if len(c) <= heads.config.num_heads]
    return heads, TreeBuffers.from_choices(choices, device=model.device)


def run_one(label, args, model, tokenizer, prompt_ids, heads, tree) -> GenerationResult:
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    stream = tokenizer.stream_decoder()

    def on_tokens(ids):
        if not args.quiet:
            sys.stdout.write("".join(stream.push(i) for i in ids))
            sys.stdout.flush()

    common = dict(sampling=sampling, eos_ids=tokenizer.eos_ids, on_tokens=on_tokens, generator=generator)
    if heads is None:
        result = generate(model, prompt_ids, args.max_new_tokens, **common)
    else:
        accept = args.accept or ("greedy" if sampling.greedy else "sample")
        result = generate_medusa(model, heads, tree, prompt_ids, args.max_new_tokens, accept=accept,
                                 posterior_threshold=args.posterior_threshold,
                                 posterior_alpha=args.posterior_alpha, **common)
    if not args.quiet:
        sys.stdout.write(stream.flush() + "\n")
    print(f"[{label}] {len(result.tokens)} tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s "
          f"(prefill {result.prefill_seconds * 1000:.0f} ms, {result.steps} decoding steps, "
          f"mean accepted length {result.mean_accepted:.2f})", file=sys.stderr, flush=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        kernels.set_backend(args.kernels)
        model, ckpt = load_model(args.model, device=args.device, dtype=args.dtype)
        tokenizer = Tokenizer.from_dir(ckpt)
        if args.raw:
            prompt_ids = tokenizer.encode(args.prompt)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            prompt_ids = tokenizer.encode_chat(messages)
        heads, tree = load_heads(args, model)
        if args.compare:
            ar = run_one("plain", args, model, tokenizer, prompt_ids, None, None)
            med = run_one("medusa", args, model, tokenizer, prompt_ids, heads, tree)
            print(f"[compare] Medusa {med.tokens_per_second:.1f} vs plain {ar.tokens_per_second:.1f} tokens/s: "
                  f"{med.tokens_per_second / max(ar.tokens_per_second, 1e-9):.2f}x speedup, "
                  f"mean accepted length {med.mean_accepted:.2f}", file=sys.stderr)
        else:
            run_one("medusa" if heads is not None else "plain", args, model, tokenizer, prompt_ids, heads, tree)
    except NanoMedusaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stream text from a Llama-family model, with or without Medusa heads.

    python generate.py --prompt "Explain how a bicycle works."                 # default model (+ its heads)
    python generate.py --model path/or/hub-id --medusa heads_dir --tree mc_sim_7b_63 --prompt "..."
    python generate.py --prompt "..." --compare                                 # AR vs Medusa, with speedup
    python generate.py --prompt "..." --tree dynamic --tree-nodes 48            # trees from the heads' confidence
    python generate.py --interactive                                            # a chat (nanomedusa/chat.py)

The path of one token: tokenizer (nanomedusa/tokenizer.py) -> a Decoder (nanomedusa/decoder.py: the KV
cache, the prefill, the CUDA graphs) over the model (nanomedusa/model.py, whose attention, RoPE, SwiGLU and
norms are kernels/; under --exact, the default on Hopper and datacenter Blackwell GPUs, its linear layers too:
kernels/linear.py, into which a narrow model like the default one folds its RMSNorms,
TransformerBlock.forward_fused) -> plain decoding
(nanomedusa/generation.py) or Medusa (nanomedusa/medusa_generation.py: verify, accept, keep, propose;
heads.py guesses and tree.py lays the guesses out as a tree, or dynamic_tree.py chooses each step's tree;
heads that read their path, the default ones, guess the tree depth by depth in path_tree.py;
kernels/ again for the heads, the acceptance and the KV compaction).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # before the heavy imports below: --verbose reports what they cost

import torch

import kernels
from nanomedusa.cli import (ArgumentParser, add_chat_format_flag, add_kernel_flags, check_at_least,
                            check_input_dir, check_kernels, check_positive, check_sampling, check_seed, check_text,
                            drop_default_exact_beyond_reach, exit_with, run_reporting_errors, use_kernels)
from nanomedusa.errors import NanoMedusaError
from nanomedusa.decoder import Decoder
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.generation import GenerationResult, generate
from nanomedusa.heads import base_model_note, load_heads_and_adapter
from nanomedusa.loading import check_dtype, load_model, resolve_device
from nanomedusa.medusa_generation import ACCEPT_MODES, Acceptance, check_acceptance, check_medusa, generate_medusa
from nanomedusa.sampling import Sampling
from nanomedusa.tokenizer import load_tokenizer
from nanomedusa.tree import PRESETS, TreeBuffers, cut_to_depth, parse_tree
from weights import SHIPPED_HEADS

DEFAULT_TREE = "mc_sim_7b_63"  # for heads without a tree of their own
CPU_TREE = "chain1"  # the default on a CPU (load_heads says why)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default=None,
                   help="the user message (rendered with the model's chat template); --interactive: the first turn")
    p.add_argument("--interactive", action="store_true",
                   help="a multi-turn chat in the terminal (or one line per turn from a pipe)")
    p.add_argument("--context", type=int, default=None,
                   help="--interactive: tokens of conversation kept, rounded up to a multiple of 256 "
                        "(default: the model's context; at most 2048 on a CPU)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    add_chat_format_flag(p)
    p.add_argument("--model", default=None,
                   help="checkpoint dir, .gguf file or hub id (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated at most (per turn in a chat)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling's random draws")
    p.add_argument("--medusa", default=None,
                   help="Medusa heads directory (default: the shipped heads of the default model)")
    p.add_argument("--no-medusa", action="store_true", help="plain autoregressive decoding")
    p.add_argument("--tree", default=None,
                   help=f"tree preset name (cut to the heads' depth), JSON list of paths, own (the heads' own tree, "
                        f"else {DEFAULT_TREE}), or dynamic: each step verifies the --tree-nodes likeliest nodes by "
                        f"the heads' calibrated confidence (default: own on a GPU, {CPU_TREE} on a CPU)")
    p.add_argument("--tree-nodes", type=int, default=None,
                   help="--tree dynamic: nodes verified per step, the root included (default: as many as the heads' "
                        "own tree has, else 64; tune it on the GPU with python -m bench.dynamic_trees)")
    p.add_argument("--accept", default=None, choices=ACCEPT_MODES,
                   help="greedy (default at temperature 0), typical (at a temperature > 0), or sample (lossless, "
                        "default at temperature > 0)")
    p.add_argument("--posterior-threshold", type=float, default=0.09, help="typical acceptance epsilon")
    p.add_argument("--posterior-alpha", type=float, default=0.3, help="typical acceptance alpha")
    p.add_argument("--compare", action="store_true",
                   help="run plain decoding and Medusa on the prompt, each warmed up untimed first, and print their "
                        "prefill and decode times, the speedup and (greedy) whether Medusa gave plain's tokens")
    add_kernel_flags(p)
    p.add_argument("--quiet", action="store_true", help="do not stream the text")
    p.add_argument("--verbose", action="store_true",
                   help="print where the time goes: imports, load, first-call setup, prefill, decode")
    return p.parse_args(argv)


def default_heads_dir(args) -> Path | None:
    """The shipped heads, when the model is the built-in default and they are present."""
    if args.model is not None or not (SHIPPED_HEADS / "config.json").is_file():
        return None
    return SHIPPED_HEADS


def heads_dir(args) -> str | Path | None:
    """The heads this run decodes with (--compare: besides plain decoding), or None for plain decoding."""
    return None if args.no_medusa and not args.compare else args.medusa or default_heads_dir(args)


def load_heads(args, model):
    """The heads and their tree for this run, or (None, None) for plain decoding.

    Without --tree the tree is the heads' own (else DEFAULT_TREE), except on a CPU, where it is CPU_TREE, the root
    and one guess, whatever the heads: a CPU's products of several rows cost much more than a plain step's one row
    (the default model's 32-node step is 2.2-2.7 plain steps on a 16-core Xeon, 3.9 on our 2-core EPYC), so the
    shipped heads' own tree decodes slower than plain decoding there (0.5-0.9x), while the root and one guess was
    1.05-1.18x plain decoding on both CPUs at 1 to 16 threads; a 4-node tree ran 0.99x on the 2-core machine,
    though the Xeon's step times put it at 1.16-1.19x (bench/RESULTS.md)."""
    path = heads_dir(args)
    if path is None:  # (--compare without heads was refused by check_args)
        given = [flag for flag, value in (("--medusa", args.medusa), ("--tree", args.tree), ("--accept", args.accept))
                 if value is not None]
        if given:  # not an error: a Medusa command line with --no-medusa added, or for a model without shipped
            # heads, should run plainly, not be refused
            several = len(given) > 1
            print(f"[note] {' and '.join(given)} {'apply' if several else 'applies'} to Medusa decoding; this run "
                  f"decodes plainly (no heads), so {'they do' if several else 'it does'} nothing here.",
                  file=sys.stderr)
        return None, None
    heads = load_heads_and_adapter(path, model, say=lambda line: print(f"[note] {line}.", file=sys.stderr))
    if args.tree == "dynamic":
        return heads, DynamicTree.for_heads(heads.config, args.tree_nodes, device=model.device,
                                            vocab_size=model.config.vocab_size)
    spec = args.tree
    if spec is None and model.device.type == "cpu":
        spec = CPU_TREE
        print(f"[note] on a CPU the default tree is {CPU_TREE}, the root and one guess (larger trees cost more than "
              f"they gain there); pass --tree own for the heads' own tree, or --no-medusa.", file=sys.stderr)
    depth = heads.config.num_heads
    if spec in (None, "own"):  # a default tree deeper than the heads: drop the paths the heads cannot fill
        choices = cut_to_depth(parse_tree(heads.config.medusa_choices or DEFAULT_TREE), depth)
    else:
        choices = parse_tree(spec)
        preset_depth = max(map(len, choices))
        if spec in PRESETS and preset_depth > depth:  # (a tree of one's own that is too deep is refused)
            choices = cut_to_depth(choices, depth)
            print(f"[note] the preset {spec} is {preset_depth} deep and these heads guess {depth} tokens, so it runs "
                  f"cut to its {len(choices) + 1} nodes at most {depth} deep.", file=sys.stderr)
    return heads, TreeBuffers.from_choices(choices, device=model.device, vocab_size=model.config.vocab_size)


def make_decode(args, decoder, tokenizer, heads, tree):
    """generate or generate_medusa on `decoder`, with all but (prompt_ids, max_new_tokens, on_tokens=, cached_len=)
    bound."""
    rule = acceptance(args)
    generator = torch.Generator(device=decoder.device).manual_seed(args.seed)
    common = dict(sampling=rule.sampling, eos_ids=tokenizer.eos_ids, generator=generator)
    if heads is None:
        return functools.partial(generate, decoder, **common)
    return functools.partial(generate_medusa, decoder, heads, tree, accept=rule.mode,
                             posterior_threshold=rule.posterior_threshold, posterior_alpha=rule.posterior_alpha,
                             **common)


def acceptance(args) -> Acceptance:
    """The sampling flags and how Medusa accepts: --accept, else greedy at temperature 0 and lossless sampling
    above it."""
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    return Acceptance(args.accept or ("greedy" if sampling.greedy else "sample"), sampling, args.posterior_threshold,
                      args.posterior_alpha)


def run_one(label, args, decoder, tokenizer, prompt_ids, heads, tree) -> GenerationResult:
    stream = tokenizer.stream_decoder()
    first_token = 0.0  # seconds from the start of the process

    def on_tokens(ids):
        nonlocal first_token
        first_token = first_token or time.perf_counter() - STARTED
        if not args.quiet:
            sys.stdout.write("".join(stream.push(i) for i in ids))
            sys.stdout.flush()

    called = time.perf_counter()
    result = make_decode(args, decoder, tokenizer, heads, tree)(prompt_ids, args.max_new_tokens, on_tokens=on_tokens)
    setup = time.perf_counter() - called - result.seconds  # before the clock starts: graph capture, compilation
    if not args.quiet:
        sys.stdout.write(stream.flush() + "\n")
    steps = f"{result.steps} decoding step{'' if result.steps == 1 else 's'}"
    print(f"[{label}] {len(result.tokens)} tokens in {result.seconds:.2f} s = {result.tokens_per_second:.1f} tokens/s "
          f"(prefill {result.prefill_seconds * 1000:.0f} ms, {steps}, mean accepted length {result.mean_accepted:.2f})",
          file=sys.stderr, flush=True)
    if args.verbose:
        print(f"[time] first-call setup {setup:.2f} s, prefill {result.prefill_seconds * 1000:.0f} ms, decode "
              f"{result.seconds - result.prefill_seconds:.2f} s; first token {first_token:.2f} s after start",
              file=sys.stderr, flush=True)
    return result


def compare(args, decoder, tokenizer, prompt_ids, heads, tree) -> None:
    """Plain decoding against Medusa on the prompt. Each runs once untimed first, so that neither clock holds
    graph capture, kernel compilation or a first prefill's setup; then each runs timed. With greedy acceptance,
    also whether their tokens are the same."""
    for warm_heads, warm_tree in ((None, None), (heads, tree)):
        make_decode(args, decoder, tokenizer, warm_heads, warm_tree)(prompt_ids, args.max_new_tokens)
    ar = run_one("plain", args, decoder, tokenizer, prompt_ids, None, None)
    med = run_one("medusa", args, decoder, tokenizer, prompt_ids, heads, tree)

    def ratio(a: float, b: float) -> str:
        return f"{a / max(b, 1e-9):.2f}x"

    print(f"[compare] prefill: Medusa {med.prefill_seconds * 1000:.1f} ms, plain {ar.prefill_seconds * 1000:.1f} ms; "
          f"decode: Medusa {med.decode_tokens_per_second:.1f} vs plain {ar.decode_tokens_per_second:.1f} tokens/s = "
          f"{ratio(med.decode_tokens_per_second, ar.decode_tokens_per_second)}; wall clock: Medusa "
          f"{med.tokens_per_second:.1f} vs plain {ar.tokens_per_second:.1f} tokens/s = "
          f"{ratio(med.tokens_per_second, ar.tokens_per_second)} speedup, mean accepted length {med.mean_accepted:.2f}",
          file=sys.stderr)
    if Sampling(args.temperature, args.top_k, args.top_p).greedy and args.accept in (None, "greedy"):
        # one text in exact arithmetic; in bf16 only with --exact's row-invariant kernels
        parted = _first_difference(med.tokens, ar.tokens)
        same = ("yes" if med.tokens == ar.tokens else f"no, they part at token {parted}"
                f"{'' if kernels.row_invariant() else ' (--exact makes them equal)'}")
        print(f"[compare] same tokens as plain greedy decoding: {same}", file=sys.stderr)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def chat_session(args, decoder, tokenizer, heads, tree):
    """The --interactive conversation (nanomedusa/chat.py), answering as a one-shot run would."""
    from nanomedusa.chat import ChatSession  # only this path needs it

    return ChatSession(decoder.model, tokenizer, make_decode(args, decoder, tokenizer, heads, tree),
                       args.max_new_tokens, extra=tree.num_nodes if tree is not None else 0, context=args.context,
                       system=args.system)


def check_args(args) -> None:
    """Every flag's value, before the model loads (a NanoMedusaError naming the fix)."""
    if args.prompt is None and not args.interactive:
        raise NanoMedusaError("pass --prompt TEXT, or --interactive for a chat.")
    if args.raw and (args.system is not None or args.chat_format != "auto"):
        flag = "--system" if args.system is not None else "--chat-format"
        raise NanoMedusaError(f"--raw feeds the prompt without the chat template, which is where {flag} goes; drop "
                              f"one of them.")
    if args.interactive and (args.raw or args.compare):
        flag = "--raw" if args.raw else "--compare"
        raise NanoMedusaError(f"--interactive chats through the chat template with one decoder; drop {flag}.")
    if args.interactive and args.quiet:
        raise NanoMedusaError("--interactive streams its answers, which --quiet would silence; drop --quiet.")
    if args.context is not None and not args.interactive:  # (a one-shot run sizes its cache to what it needs)
        raise NanoMedusaError("--context sets how much of a chat is kept; pass it with --interactive, or drop it.")
    check_at_least(1, {"--context": args.context})
    check_text("--prompt", args.prompt)
    check_text("--system", args.system)
    check_at_least(0, {"--max-new-tokens": args.max_new_tokens, "--posterior-alpha": args.posterior_alpha})
    check_positive({"--posterior-threshold": args.posterior_threshold})
    check_sampling(args.temperature, args.top_p, args.top_k)
    check_seed(args.seed)
    check_dtype(args.dtype)
    if args.compare and heads_dir(args) is None:
        raise NanoMedusaError("--compare needs Medusa heads for this model; pass --medusa HEADS_DIR.")
    if args.accept is not None and heads_dir(args) is not None:  # (without heads it does nothing: load_heads says so)
        check_acceptance(acceptance(args))
    check_kernels(args.kernels, resolve_device(args.device), args.exact)
    check_input_dir("--medusa", args.medusa)
    if args.tree_nodes is not None and args.tree != "dynamic":
        raise NanoMedusaError("--tree-nodes sizes a dynamic tree; add --tree dynamic, or drop --tree-nodes.")
    check_at_least(1, {"--tree-nodes": args.tree_nodes})
    if args.tree not in (None, "dynamic", "own"):
        parse_tree(args.tree)  # a typo fails now, not after the model has loaded


def prepare(args):
    """Everything a run decodes with, from checked flags: the kernels chosen, then the model, its tokenizer, the heads
    and their tree (None, None: plain decoding) -> (decoder, tokenizer, heads, tree)."""
    use_kernels(args.kernels, args.exact, resolve_device(args.device))
    imported = time.perf_counter()
    model, ckpt = load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer = load_tokenizer(ckpt, args.chat_format, note=not args.raw)  # (--raw uses no chat format)
    heads, tree = load_heads(args, model)
    if heads is not None:  # a tree deeper than the heads fails now, not in a chat's every turn
        check_medusa(model, heads, tree, acceptance(args))
    if heads is not None and (note := base_model_note(heads_dir(args), heads.config.base_model, ckpt)):
        print(f"[note] {note}.", file=sys.stderr)
    if heads is not None and (note := drop_default_exact_beyond_reach(args.exact, tree.num_nodes, tree.depth_max)):
        print(f"[note] {note}.", file=sys.stderr)
    decoder = Decoder(model)  # one for the process: its CUDA graphs serve every run (--compare, chat turns)
    if args.verbose:
        print(f"[time] imports {imported - STARTED:.2f} s, load {time.perf_counter() - imported:.2f} s "
              f"(model, tokenizer, heads: {model.device}, {model.dtype})", file=sys.stderr, flush=True)
    return decoder, tokenizer, heads, tree


def run(args) -> None:
    check_args(args)
    decoder, tokenizer, heads, tree = prepare(args)
    if args.interactive:
        from nanomedusa.chat import run_chat

        run_chat(chat_session(args, decoder, tokenizer, heads, tree), first=args.prompt, verbose=args.verbose)
        return
    prompt_ids = encode_prompt(args, tokenizer)
    if args.compare:
        compare(args, decoder, tokenizer, prompt_ids, heads, tree)
    else:
        run_one("medusa" if heads is not None else "plain", args, decoder, tokenizer, prompt_ids, heads, tree)


def encode_prompt(args, tokenizer) -> list[int]:
    """--prompt as the model reads it: through the chat template, with --system when given (even empty, as
    --interactive does), or as it is with --raw."""
    if args.raw:
        return tokenizer.encode(args.prompt)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return tokenizer.encode_chat(system + [{"role": "user", "content": args.prompt}])


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting_errors(lambda: run(args))


if __name__ == "__main__":
    exit_with(main())

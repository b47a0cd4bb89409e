"""The sampling part of the decoding benchmark (bench/decode.py, --sampling): plain greedy, plain sampling,
lossless Medusa sampling (`--accept sample`) and typical acceptance at temperature 0.7 / top-p 0.9, with
the first --heads and its own tree, on each prompt set given: mean accepted length, tokens/s and the
speedup over plain sampling.
"""

from __future__ import annotations

import torch

from nanomedusa.decoder import Decoder
from nanomedusa.generation import GenerationResult, generate
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.sampling import Sampling
from nanomedusa.tree import TreeBuffers

from .checkpoints import first_heads, free_memory, trees_for
from .prompts import chat_prompts, measure, warmup_prompts
from .report import print_table, say

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
    decoder = Decoder(model)  # one for every method and prompt: the warm-up captures the graphs the runs replay
    methods = {  # label -> decode(prompt ids, generator)
        "plain greedy": lambda ids, gen: generate(decoder, ids, n, eos_ids=eos),
        PLAIN_SAMPLING: lambda ids, gen: generate(decoder, ids, n, SAMPLING, eos_ids=eos, generator=gen),
        "Medusa lossless": lambda ids, gen: generate_medusa(decoder, heads, tree, ids, n, SAMPLING, accept="sample",
                                                            eos_ids=eos, generator=gen),
        "Medusa typical": lambda ids, gen: generate_medusa(decoder, heads, tree, ids, n, SAMPLING, accept="typical",
                                                           eos_ids=eos, generator=gen),
    }
    sets = {}
    for path in args.sampling or args.prompts:
        prompts = chat_prompts(tokenizer, path, args.num_prompts)
        seeds = {tuple(p.ids): seed for seed, p in enumerate(prompts)}
        say(f"[sampling] {path.stem}: {len(prompts)} prompts, {spec.label} heads, tree {tree_label}")
        rows = {}
        for label, decode in methods.items():
            def run(ids: list[int], decode=decode) -> GenerationResult:
                return decode(ids, torch.Generator(device).manual_seed(seeds[tuple(ids)]))

            rows[label], _ = measure(f"sampling {path.stem} {label}", run, prompts,
                                     warmup_prompts(prompts, args.quick_warmup))
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

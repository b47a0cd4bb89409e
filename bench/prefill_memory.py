"""What the prefill graphs keep on a GPU: a model of one of bench/steps.py's shapes (random weights, bf16) prefills a
prompt of each --lengths token count through the decoder's CUDA graphs (decoder.py: one graph per length, prompts
padded to multiples of 64), and the memory held is read after each new graph. Then every length is prefilled
again, longest first: graphs that share their working memory must still give each prompt its own result, the
bits its first prefill gave (and about an eager prefill's; to the bit with --exact).

    python -m bench.prefill_memory                                  # the 7B shape, 64 to 2,048 tokens: ~1 minute
    python -m bench.prefill_memory --shape smollm2-135m --lengths 64,512,1024 --exact

The table: per length, the memory held beyond the model and its cache once its graph exists (torch.cuda.memory_reserved
after empty_cache: the graphs' pools, not what the eager warm-up runs left cached), and the time of that first,
capturing prefill.
"""

from __future__ import annotations

import argparse
import time

import torch

import kernels
from nanomedusa.cli import ArgumentParser, check_output_file, exit_with, run_reporting_errors
from nanomedusa.decoder import PREFILL_BUCKET, Decoder, round_up

from .checks import int_list, require_cuda
from .report import DEFAULT_OUT, device_name, print_table, save, say
from .steps import SHAPES, build_7b


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="the model's shape")
    p.add_argument("--lengths", default=",".join(str(n) for n in range(64, 2049, 64)),
                   help="prompt lengths in tokens, comma-separated (default 64, 128, .., 2048)")
    p.add_argument("--exact", action="store_true", help="with the row-invariant kernels (kernels.set_row_invariant)")
    p.add_argument("--json", default=str(DEFAULT_OUT / "prefill-memory.json"),
                   help="where the rows are written (default work/bench/prefill-memory.json, git-ignored)")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args))


@torch.inference_mode()
def run(args) -> dict:
    lengths = int_list("--lengths", args.lengths, 1, what="token counts", example="64,512,1024")
    check_output_file("--json", args.json)
    require_cuda("prefill_memory")
    device = torch.device("cuda")
    kernels.set_row_invariant(args.exact)
    cache_len = round_up(max(lengths), PREFILL_BUCKET) + PREFILL_BUCKET
    model = build_7b(argparse.Namespace(**SHAPES[args.shape]), device, torch.bfloat16, cache_len)
    graphed, eager = Decoder(model), Decoder(model, cuda_graphs=False)
    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths}
    before = held_bytes()
    rows, first = [], {}
    for n in lengths:
        start = time.perf_counter()
        first[n] = graphed.prefill(prompts[n]).clone()  # [1, dim] (a copy: the graph's output is overwritten later)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"tokens": n, "held_mb": (held_bytes() - before) / 2**20, "first_s": seconds})
        say(f"[prefill-memory] {n} tokens: {rows[-1]['held_mb']:.0f} MB held, first prefill {seconds:.2f} s")
    changed, worst = [], 0.0
    for n in sorted(lengths, reverse=True):  # each graph replayed after the others were captured
        got = graphed.prefill(prompts[n]).float()  # (read before the next prefill replays)
        if not torch.equal(got, first[n].float()):
            changed.append(n)
        want = eager.prefill(prompts[n]).float()
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    graphs = sum(1 for key in graphed.graphs if key[0][0] == "prefill")
    out = {"device": device_name(device), "shape": args.shape, "exact": args.exact, "graphs": graphs, "rows": rows,
           "replays_unlike_their_first": changed, "worst_relative_difference_from_eager": worst}
    print_table(f"Memory the prefill graphs hold on {out['device']} ({args.shape}, bf16"
                f"{', row-invariant kernels' if args.exact else ''}): {graphs} graphs; replayed again longest first, "
                f"{len(lengths) - len(changed)} of {len(lengths)} gave their first prefill's bits, and all differ from "
                f"eager prefills' by at most {worst:.2e} (relative)",
                ["tokens", "held MB", "first prefill s"],
                [[r["tokens"], f"{r['held_mb']:.0f}", f"{r['first_s']:.2f}"] for r in rows])
    save(out, args.json)
    return out


def held_bytes() -> int:
    """The memory the allocator holds once what it merely keeps cached is given back."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


if __name__ == "__main__":
    exit_with(main())

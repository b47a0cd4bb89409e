"""The linear kernel's tree-step tiles loaded by the TMA (tensor descriptors) against per-thread loads, per matrix.

    python -m bench.linear_tma [--models 7B SmolLM2-135M] [--json [FILE]]      # on a Hopper GPU, bf16

kernels/linear.py loads a call's tiles by the tensor memory accelerator when the call fills a tile of rows (a
64-node tree step, a prefill) and its config allows it (`TileConfig.tma`); a 1-row decode keeps the per-thread
loads either way. For each matrix of bench/linear.py: the tile config without and with TMA at M = BLOCK_M rows
(the two outputs compared bit for bit first, there and at one row more), and with TMA at one pipeline stage less
and more (a stage count only pipelines the loads, it leaves the arithmetic alone). Timing as bench/linear.py's
table: CUDA graphs of calls over weight copies that together exceed the L2.
"""

from __future__ import annotations


import torch

from kernels.linear import _tile_config, linear_triton
from nanomedusa.cli import ArgumentParser, check_output_file, exit_with, run_reporting_errors

from .linear import MODELS, TABLE_REPS, config_label, fits_smem, make_case, triton_call, us_per_call
from .report import DEFAULT_OUT, device_name, metadata, print_table, save
from .timer import copy_bandwidth

DEFAULT_JSON = str(DEFAULT_OUT / "linear-tma.json")  # --json alone (git-ignored: bench/linear-tma.json is a record)


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["7B", "SmolLM2-135M"], choices=sorted(MODELS))
    parser.add_argument("--json", nargs="?", const=DEFAULT_JSON, default=None,
                        help="save the rows here (--json alone: work/bench/linear-tma.json, git-ignored)")
    args = parser.parse_args(argv)
    if args.json is not None and (status := run_reporting_errors(lambda: check_output_file("--json", args.json))):
        return status  # a --json that cannot be written is refused before the GPU's time is spent, not after
    if not torch.cuda.is_available():
        parser.error("this benchmark times the GPU's TMA loads: run it on a CUDA machine (sm_90 or newer)")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    bw = copy_bandwidth(device)
    rows = []
    for model in args.models:
        for m in MODELS[model]:
            loads = _tile_config(m.N, m.K, torch.bfloat16, True)._replace(tma=False)
            M = loads.block_m  # the smallest call that loads by TMA
            case = make_case(m, (M, M + 1), torch.bfloat16, device, props.L2_cache_size)
            by_tma = [loads._replace(tma=True, num_stages=s) for s in (loads.num_stages, loads.num_stages - 1,
                                                                       loads.num_stages + 1)
                      if s >= 2 and fits_smem(loads._replace(num_stages=s), props.shared_memory_per_block_optin, 2)]
            w = case.weights[0]
            same = all(torch.equal(linear_triton(case.x[r], w, config=loads),
                                   linear_triton(case.x[r], w, config=by_tma[0]))
                       for r in (M, M + 1))  # a full tile of rows, and one row past it
            base = us_per_call(triton_call(loads), case, M, TABLE_REPS)
            for cfg in by_tma:
                us = us_per_call(triton_call(cfg), case, M, TABLE_REPS)
                rows.append(dict(matrix=f"{model} {m.name}", rows=M, config=config_label(cfg), loads_us=base,
                                 tma_us=us, change=us / base - 1, loads_copy=case.weight_bytes / (base * 1e-6) / bw,
                                 tma_copy=case.weight_bytes / (us * 1e-6) / bw, same_bits=same))
            del case
    print_table(f"{device_name(device)}, copy {bw / 1e9:.0f} GB/s: per-thread loads against TMA, one tile of rows",
                ["matrix", "M", "TMA config", "loads µs", "TMA µs", "change", "loads % copy", "TMA % copy",
                 "bitwise same"],
                [[r["matrix"], r["rows"], r["config"], f"{r['loads_us']:.2f}", f"{r['tma_us']:.2f}",
                  f"{r['change']:+.1%}", f"{r['loads_copy']:.1%}", f"{r['tma_copy']:.1%}",
                  "yes" if r["same_bits"] else "NO"] for r in rows])
    if args.json:
        save(dict(metadata(args, device, torch.bfloat16), copy_bandwidth=bw, rows=rows), args.json)
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    exit_with(main())

"""Compile the intricate Triton kernels for a Hopper GPU (sm_90: H100, H200) on a machine without one.

Triton's interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) executes a kernel's Python, not
its compiled form, so it accepts code the compiler refuses: an early `return` inside an `if`, or a variable
whose tile shape differs between the branches of an `if`. Both reached a GPU run here before. This module
runs Triton's real compiler, front end to cubin (ptxas ships with Triton), for the specialisations the engine
launches (with programmatic dependent launch, checking that each waits, griddepcontrol.wait, before it touches
global memory other than by loads through the L2: kernels/dependent_launch.py), and needs no GPU and no CUDA
driver:

    TRITON_INTERPRET=0 python -m kernels.compile_check        # exit status 1 when any kernel fails to compile

tests/test_compile_check.py runs it on every CI push. Launch arguments are described by name: pointers as
`*dtype`, integers as i32, scale factors as fp32; pointers and strides are marked divisible by 16, as Triton
specialises them at a real launch (so the compiled loads are the real ones: wide, pipelined).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(kernel, pointers: dict[str, str], constexprs: dict, floats=("qk_scale",), aligned=("D",),
                       **options):
    """Compile the @triton.jit `kernel` for sm_90: `pointers` maps each pointer argument to its type ("*bf16"),
    `constexprs` gives every constexpr; other arguments are i32 (those in `floats`: fp32), marked divisible by 16
    if named in `aligned` or "stride...", as a real launch specialises them. Returns the compiled kernel (its
    `.asm` holds ttir, ttgir, ptx, cubin); raises triton's CompilationError where it does not compile."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    divisible = [i for i, name in enumerate(kernel.arg_names)
                 if name in pointers or name.startswith("stride") or name in aligned]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=HOPPER, options=options)


def _tree_attention_cases():
    from . import tree_attention as ta

    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "tree_mask_ptr": "*u8", "key_valid_ptr": "*u8",
                "prefix_len": "*i64", "out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_m_ptr": "*fp32",
                "part_l_ptr": "*fp32"}
    block_m, block_n, _, warps = ta._tile_config(64, 128, torch.bfloat16, True, row_invariant=True)
    dots = dict(EVEN_D=True, DOT_PRECISION="tf32")

    def common(has_mask, has_key_valid):
        return dict(GROUP=4, PREFIX_IS_PTR=True, HAS_MASK=has_mask, HAS_KEY_VALID=has_key_valid, BLOCK_D=128,
                    PDL=True)

    def row_invariant(has_mask, has_key_valid, chunks):  # what the row-invariant bodies and tails share
        return dict(common(has_mask, has_key_valid), BODY_CHUNKS=chunks.count, CHUNK_TILES=chunks.max_tiles,
                    BLOCK_N=block_n, TAIL_GRAIN=ta.TAIL_GRAIN, BLOCK_T=64)

    def bodies(where, shared, chunks, group):  # with the group's pipeline depth (`_body_stages`)
        return (f"tree attention, row-invariant bodies, {where}", ta._ri_bodies_kernel, pointers,
                dict(shared, **dots, GROUP=group, BLOCK_M=block_m),
                # (fixed chunks wait first; with a count, only L2 reads of the prefix and mask come before)
                dict(num_warps=warps, num_stages=ta._body_stages(group), enable_fp_fusion=False,
                     l2_reads_first=chunks.count > 0))

    for has_mask in (True, False):
        for has_key_valid in (False, True):
            label = f"mask={has_mask} key_valid={has_key_valid}"
            yield (f"tree attention, default mode, {label}", ta._attend_chunk_kernel, pointers,
                   dict(common(has_mask, has_key_valid), **dots, WRITE_OUT=False, BLOCK_M=64, BLOCK_N=64),
                   dict(num_warps=8))
            # chunks whose length follows the body's (8 KV heads or more), and fixed chunks (fewer)
            for chunks in (ta.body_chunks(True, n_kv_heads=8), ta.body_chunks(True, n_kv_heads=2)):
                shared = row_invariant(has_mask, has_key_valid, chunks)
                where = f"{label}, {chunks}"
                yield bodies(where, shared, chunks, group=4)
                # the tails of a 7B without grouped queries, computed before their wait (after a bodies kernel),
                # and of a group of 4 (Llama-3 8B) waiting first (no bodies kernel before them)
                for group, before_wait in ((1, True), (4, False)):
                    yield (f"tree attention, row-invariant tails, group {group}, {where}", ta._ri_tails_kernel,
                           pointers, dict(shared, GROUP=group, TAIL_M=group, MERGE_CHUNKS=ta.MERGE_CHUNKS,
                                          TAIL_BEFORE_WAIT=before_wait),
                           dict(num_warps=ta._tail_warps(group, 128), enable_fp_fusion=False,
                                l2_reads_first=before_wait))
    # a 7B's bodies: no grouped queries and 32 KV heads' chunks
    chunks = ta.body_chunks(True, n_kv_heads=32)
    yield bodies(f"a 7B's, {chunks}", row_invariant(True, False, chunks), chunks, group=1)
    yield ("tree attention, chunk merge", ta._combine_chunks_kernel, pointers,
           dict(GROUP=4, BLOCK_M=64, BLOCK_D=128, PDL=True), dict(num_warps=8))


def _rope_cases():
    from . import rope_cache

    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                "q_out_ptr": "*bf16", "cache_ptr": "*bf16", "prefix_len": "*i64"}
    yield ("RoPE + cache, head_dim 128", rope_cache._rope_and_cache_kernel, pointers,
           dict(PREFIX_IS_PTR=True, HEADS=rope_cache.HEADS_PER_PROGRAM, BLOCK_HALF=64, PDL=True), dict(num_warps=1))


def _rmsnorm_cases():
    from . import rmsnorm

    pointers = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "h_ptr": "*bf16"}
    for has_residual in (False, True):  # a 7B's width; its weight read early, through the L2
        yield (f"RMSNorm, width 4096, residual={has_residual}", rmsnorm._rmsnorm_kernel, pointers,
               dict(HAS_RESIDUAL=has_residual, BLOCK_D=4096, PDL=True),
               dict(num_warps=8, floats=("eps",), l2_reads_first=True))


def _sample_token_cases():
    from . import sample_token

    for top_k, top_p in ((False, True), (True, True)):  # plain sampling's draw over the default model's vocabulary
        yield (f"sample token, 49,152 tokens, top-k={top_k}, top-p={top_p}", sample_token._sample_token_kernel,
               {"logits_ptr": "*bf16", "kth_ptr": "*fp32", "u_ptr": "*fp32", "out_ptr": "*i64"},
               dict(TOP_K=top_k, TOP_P=top_p, PROPOSALS=sample_token.PROPOSALS, BLOCK=sample_token.BLOCK, PDL=True),
               dict(num_warps=sample_token.warps(sample_token.BLOCK), floats=("inv_temperature", "top_p")))


# A plain linear layer's epilogue constexprs: linear_case's `mode` changes some of them.
LINEAR_PLAIN = dict(NORM_IN_TILES=0, ADD_RESIDUAL=False, NORM_OUT=False, ROPE_HEAD_DIM=0, GATE_UP=False)


def linear_case(cfg, tma: bool, pdl: bool = True, mode: dict | None = None) -> tuple[object, dict, dict, dict]:
    """(kernel, pointers, constexprs, options) for `compile_for_hopper` of the linear layer in bf16 without a bias, as
    `linear._run_linear` launches it with the tile config `cfg` (a `linear.TileConfig`), loading by the TMA or not,
    under PDL or not. mode: the epilogue's NORM_IN_TILES, ADD_RESIDUAL, NORM_OUT and GATE_UP, or ROPE_HEAD_DIM (then the
    kernel is `_linear_rope_kernel`; those not given: LINEAR_PLAIN's)."""
    from . import linear

    mode = {**LINEAR_PLAIN, **(mode or {})}
    kernel = linear._linear_rope_kernel if mode["ROPE_HEAD_DIM"] else linear._linear_kernel
    pointers = {**dict.fromkeys(["x_ptr", "w_ptr", "b_ptr", "out_ptr", "residual_ptr", "norm_w_ptr", "h_ptr",
                                 "cache_ptr"], "*bf16"),
                **dict.fromkeys(["partial_ptr", "sumsq_in_ptr", "sumsq_out_ptr", "cos_ptr", "sin_ptr"], "*fp32"),
                "counter_ptr": "*i32", "prefix_len": "*i64"}
    if tma:  # the descriptors' boxes are the x and weight tiles
        pointers.update(x_desc=f"tensordesc<bf16[{cfg.block_m}, {cfg.block_k}]>",
                        w_desc=f"tensordesc<bf16[{cfg.block_n}, {cfg.block_k}]>")
    else:
        pointers.update(x_desc="*bf16", w_desc="*bf16")  # stand-ins the kernel never reads
    constexprs = dict(HAS_BIAS=False, SPLIT_K=cfg.split_k, DOT_PRECISION="tf32", BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PREFETCH_LINES=linear.PREFETCH_BYTES // 128, LINE=64,
                      PDL=pdl, NORM_IN_BLOCK=triton.next_power_of_2(max(mode["NORM_IN_TILES"], 1)), TMA=tma,
                      PREFIX_IS_PTR=True, **mode)
    # (a 7B's 32 query and 32 KV heads are multiples of 16, as a real launch specialises them)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                   aligned=("N", "K", "k_per_split", "n_q_heads", "n_kv_heads"), floats=("eps",))
    return kernel, pointers, {k: v for k, v in constexprs.items() if k in kernel.arg_names}, options


def _linear_cases():
    from . import linear

    # a 7B's w13, wo and w2 (split-K: the last-arriving program sums the partials), Llama-3 8B's wqkv (5 stages),
    # a 135M model's w2; then, as --exact runs them for such a narrow model (model.py's FOLD_NORMS_MAX_DIM), its wo
    # and w2 adding into the residual stream and making the next RMSNorm's stream, and its wqkv and w13 applying
    # that norm (from the 18 feature tiles of w2's and wo's outputs); a 7B's wqkv rotating q and k and writing the
    # cache in its epilogue; SwiGLU in the gate/up projections' epilogues (a 7B's and Llama-3 8B's w13)
    plain = LINEAR_PLAIN
    into_stream = dict(plain, ADD_RESIDUAL=True, NORM_OUT=True)
    for N, K, mode in [(22016, 4096, plain), (4096, 4096, plain), (4096, 11008, plain), (6144, 4096, plain),
                       (576, 1536, plain), (576, 576, into_stream), (576, 1536, into_stream),
                       (960, 576, dict(plain, NORM_IN_TILES=18)), (3072, 576, dict(plain, NORM_IN_TILES=18)),
                       (12288, 4096, dict(plain, ROPE_HEAD_DIM=128)), (22016, 4096, dict(plain, GATE_UP=True)),
                       (28672, 4096, dict(plain, GATE_UP=True))]:
        cfg = (linear._swiglu_tile_config if mode["GATE_UP"] else linear._tile_config)(N, K, torch.bfloat16, True)
        label = "".join([f", split-K {cfg.split_k}" if cfg.split_k > 1 else "",
                         ", into the residual stream" if mode["ADD_RESIDUAL"] else "",
                         f", normed input ({mode['NORM_IN_TILES']} tiles)" if mode["NORM_IN_TILES"] else "",
                         ", RoPE + cache" if mode["ROPE_HEAD_DIM"] else "", ", SwiGLU" if mode["GATE_UP"] else ""])
        for tma in sorted({False, cfg.tma}):  # a tree step's loads by the TMA, where the config has them
            yield (f"linear, {N} x {K}{label}{', TMA' if tma else ''}", *linear_case(cfg, tma, mode=mode))


def _path_heads_cases():
    from . import path_heads

    yield ("path-reading heads' inputs, depth 4", path_heads._path_input_kernel,
           {"hidden_ptr": "*bf16", "tokens_ptr": "*i64", "lineage_ptr": "*i64", "embed_ptr": "*bf16",
            "proj_ptr": "*bf16", "out_ptr": "*bf16"},
           dict(D=576, DEPTH=4, DOT_PRECISION="tf32", BLOCK_M=path_heads.ROWS, BLOCK_N=32, BLOCK_K=64, PDL=True),
           dict(num_warps=4))
    yield ("path-reading heads' guesses placed", path_heads._place_guesses_kernel,
           {"tokens_ptr": "*i64", "logprobs_ptr": "*fp32", "ids_ptr": "*i64", "id_logprobs_ptr": "*fp32",
            "children_ptr": "*i64", "parent_row_ptr": "*i64", "rank_ptr": "*i64"},
           dict(TOPK=10, WITH_LOGPROBS=True, BLOCK_C=64, PDL=True), dict(num_warps=4))


def _medusa_heads_cases():
    from . import medusa_heads

    vocab_pointers = {"x_ptr": "*bf16", "w_ptr": "*bf16", "logits_ptr": "*bf16", "temperatures_ptr": "*fp32",
                      "slice_max_ptr": "*fp32", "tempered_max_ptr": "*fp32", "slice_sum_ptr": "*fp32"}
    for rows, warps in ((medusa_heads.ROWS, 4), (medusa_heads.VOCAB_ROWS, 8)):  # a decode step; a path proposal
        yield (f"Medusa heads' vocab logits, {rows} rows, with the log-partition", medusa_heads._vocab_logits_kernel,
               vocab_pointers, dict(V=49152, D=576, DOT_PRECISION="tf32", LOG_PARTITION=True, BLOCK_M=rows,
                                    BLOCK_V=128, BLOCK_K=64, PDL=True), dict(num_warps=warps))
    yield ("Medusa heads' top-10, with log-probabilities", medusa_heads._topk_kernel,
           {"logits_ptr": "*bf16", "slice_max_ptr": "*fp32", "out_ptr": "*i64", "temperatures_ptr": "*fp32",
            "tempered_max_ptr": "*fp32", "slice_sum_ptr": "*fp32", "logprobs_ptr": "*fp32"},
           dict(V=49152, TOPK=10, LOG_PARTITION=True, BLOCK_V=128, BLOCK_S=512, BLOCK_T=16, PDL=True),
           dict(num_warps=8))


# A global memory access in PTX: a load, store or atomic on global memory, or an async copy from it (a predicate
# may precede it). L2 prefetches are not accesses: they read nothing into the program.
_GLOBAL_ACCESS = re.compile(r"^(@!?%p\d+\s+)?((ld|st|atom|red)(\.\w+)*\.global|cp\.async\.)")
# A load through the L2 only (cache modifier ".cg"), which no SM's L1 can answer with an older copy.
_L2_LOAD = re.compile(r"^(@!?%p\d+\s+)?ld\.global(\.\w+)*\.cg\b")


def waits_before_memory(ptx: str, l2_reads_first: bool = False) -> str | None:
    """None if the kernel touches no global memory before its griddepcontrol.wait (what programmatic dependent
    launch needs, kernels/dependent_launch.py), else what is wrong. `l2_reads_first`: loads through the L2 are
    allowed there too, for a kernel that reads early only what kernels before the previous one wrote (the
    row-invariant attention tails) or what no kernel writes (the RMSNorm's weight): whether that holds is the
    launch order's business, not the PTX's."""
    lines = [line.strip() for line in ptx.splitlines()]
    wait = next((i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")), None)
    if wait is None:
        return "no griddepcontrol.wait"
    access = next((i for i, line in enumerate(lines[:wait])
                   if _GLOBAL_ACCESS.match(line) and not (l2_reads_first and _L2_LOAD.match(line))), None)
    if access is not None:
        return f"global memory accessed before griddepcontrol.wait: {lines[access]}"
    return None


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)  # --help; no flags
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        print("compile_check: run with TRITON_INTERPRET=0 (under the interpreter @triton.jit compiles nothing)")
        return 2
    failed = 0
    for name, kernel, pointers, constexprs, options in [*_tree_attention_cases(), *_rope_cases(), *_rmsnorm_cases(),
                                                        *_linear_cases(), *_path_heads_cases(),
                                                        *_medusa_heads_cases(), *_sample_token_cases()]:
        options = dict(options)
        l2_reads_first = options.pop("l2_reads_first", False)  # a case's own flag, not a compiler option
        try:
            ptx = compile_for_hopper(kernel, pointers, constexprs, **options).asm["ptx"]
            problem = waits_before_memory(ptx, l2_reads_first)
            if problem:
                failed += 1
                print(f"FAILED  {name}: {problem}")
                continue
            print(f"ok      {name}")
        except Exception as error:  # a CompilationError names the line; show its last lines
            failed += 1
            print(f"FAILED  {name}: {type(error).__name__}: {str(error)[-600:]}")
    print(f"{failed} of the kernels failed to compile for sm_90 or to wait before touching memory" if failed
          else "every kernel compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The kernels compile for a Hopper GPU (kernels/compile_check.py), checked without one: the interpreter the
other kernel tests run under accepts code Triton's compiler refuses. Each check runs in a subprocess with
TRITON_INTERPRET=0, since under the interpreter @triton.jit compiles nothing."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_compiled(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_kernels_compile_for_sm90():
    result = run_compiled("-m", "kernels.compile_check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every kernel compiled for sm_90" in result.stdout


def test_the_check_catches_what_the_interpreter_lets_through(tmp_path):
    # A tile whose shape differs between the branches of an `if`: the interpreter runs it, the compiler refuses.
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def bad(x_ptr, n):
            if n > 0:
                a = tl.zeros([64], tl.float32)
            else:
                a = tl.zeros([16], tl.float32)
            tl.store(x_ptr, tl.sum(a, 0))
    """))
    (tmp_path / "check_bad.py").write_text(textwrap.dedent("""
        from bad_kernel import bad
        from kernels.compile_check import compile_for_hopper
        try:
            compile_for_hopper(bad, {"x_ptr": "*fp32"}, {})
        except Exception as error:
            print("refused:", type(error).__name__)
        else:
            print("compiled")
    """))
    result = run_compiled("check_bad.py", cwd=tmp_path)
    assert "refused: CompilationError" in result.stdout, result.stdout + result.stderr


def test_dependent_launch_waits_before_reading_and_prefetches_weights_first():
    # Under programmatic dependent launch a kernel starts before the previous one has finished: it must wait
    # (griddepcontrol.wait) before its first load of anything an earlier kernel wrote. The linear layer's only
    # earlier work is the L2 prefetch of its weights; without PDL neither instruction is there. Both ways of loading
    # the tiles: per-thread copies to shared memory (a decode step) and the TMA (a tree step).
    script = textwrap.dedent("""
        import itertools
        import torch
        from kernels import linear
        from kernels.compile_check import compile_for_hopper, linear_case
        LOADS = {False: "cp.async.cg.shared.global",  # per-thread copies; and a tile by TMA:
                 True: "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"}
        cfg = linear._tile_config(22016, 4096, torch.bfloat16, True)
        for pdl, tma in itertools.product((True, False), (False, True)):
            kernel, pointers, constexprs, options = linear_case(cfg, tma, pdl)
            ptx = compile_for_hopper(kernel, pointers, constexprs, **options).asm["ptx"]
            lines = [line.strip() for line in ptx.splitlines()]
            def first(instruction):  # the first line issuing it (after any predicate)
                return next((i for i, line in enumerate(lines) if instruction in line.split()[:2]), None)
            print(pdl, tma, first("prefetch.global.L2"), first("griddepcontrol.wait;"),
                  first("griddepcontrol.launch_dependents;"), first(LOADS[tma]))
    """)
    result = run_compiled("-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split() for line in result.stdout.strip().splitlines()[-4:]]
    assert [line[:2] for line in lines] == [["True", "False"], ["True", "True"], ["False", "False"], ["False", "True"]]
    for with_pdl in lines[:2]:  # load: the first copy of x or w to shared memory
        prefetch, wait, launch, load = (int(i) for i in with_pdl[2:])
        assert prefetch < wait < launch < load, with_pdl
    for without in lines[2:]:
        assert without[2:5] == ["None", "None", "None"] and without[5] != "None", without


def test_the_check_catches_a_kernel_that_reads_before_it_waits(tmp_path):
    (tmp_path / "early_read.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        from kernels.dependent_launch import wait_for_previous_kernels

        @triton.jit
        def early(x_ptr, PDL: tl.constexpr):
            x = tl.load(x_ptr)  # may read what the kernel before is still writing
            wait_for_previous_kernels(PDL)
            tl.store(x_ptr + 1, x)

        @triton.jit
        def waits(x_ptr, PDL: tl.constexpr):
            wait_for_previous_kernels(PDL)
            tl.store(x_ptr + 1, tl.load(x_ptr))

        @triton.jit
        def early_through_l2(x_ptr, PDL: tl.constexpr):  # allowed only with l2_reads_first (attention tails, RMSNorm)
            x = tl.load(x_ptr, cache_modifier=".cg")
            wait_for_previous_kernels(PDL)
            tl.store(x_ptr + 1, x)

        @triton.jit
        def early_store(x_ptr, PDL: tl.constexpr):
            tl.store(x_ptr + 1, tl.load(x_ptr, cache_modifier=".cg"))  # may overwrite what the kernel before reads
            wait_for_previous_kernels(PDL)
    """))
    (tmp_path / "check_early.py").write_text(textwrap.dedent("""
        from early_read import early, waits, early_through_l2, early_store
        from kernels.compile_check import compile_for_hopper, waits_before_memory
        for kernel in (early, waits, early_through_l2, early_store):
            ptx = compile_for_hopper(kernel, {"x_ptr": "*fp32"}, {"PDL": True}).asm["ptx"]
            print(kernel.fn.__name__, waits_before_memory(ptx), "|", waits_before_memory(ptx, l2_reads_first=True))
    """))
    result = run_compiled("check_early.py", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    early, waits, through_l2, store = [line.split(" | ") for line in result.stdout.strip().splitlines()[-4:]]
    # by default nothing may touch memory before the wait; with l2_reads_first, loads through the L2 may
    assert early[0].startswith("early global memory accessed before griddepcontrol.wait"), early
    assert early[1].startswith("global memory accessed before griddepcontrol.wait: ld.global"), early  # L1-cached
    assert waits == ["waits None", "None"], waits
    assert through_l2[0].startswith("early_through_l2 global memory accessed before"), through_l2
    assert through_l2[1] == "None", through_l2
    assert store[0].startswith("early_store global memory accessed before griddepcontrol.wait"), store
    assert "global memory accessed before griddepcontrol.wait" in store[1] and "st.global" in store[1], store

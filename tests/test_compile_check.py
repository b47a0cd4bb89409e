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

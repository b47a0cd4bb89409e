"""The input checks the ops share (kernels/checks.py): a `prefix_len` of any kind is taken or refused alike by every
path of tree attention, RoPE and KV compaction (the dispatcher on each backend, the kernel called directly); and the
"triton" backend without a GPU or Triton's interpreter says what to do instead of failing inside Triton.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from kernels.errors import KernelInputError
from kernels.kv_compaction import compact_kv, compact_kv_triton
from kernels.rope_cache import rope_and_cache, rope_and_cache_triton
from kernels.tree_attention import tree_attention, tree_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def attention(op, prefix_len):
    return (op(randn(1, 4, 3, 16), randn(1, 2, 40, 16, seed=1), randn(1, 2, 40, 16, seed=2), prefix_len, None),)


def rope(op, prefix_len):
    cache = torch.zeros(2, 1, 2, 40, 16, device=DEVICE)
    q = op(randn(1, 3, 4, 16), randn(1, 3, 2, 16, seed=1), randn(1, 3, 2, 16, seed=2), randn(3, 16, seed=3),
           randn(3, 16, seed=4), cache, prefix_len)
    return q, cache


def compaction(op, prefix_len):
    kv = randn(2, 2, 1, 2, 40, 16)
    op(kv, prefix_len, torch.tensor([0, 2], device=DEVICE))
    return (kv,)


OPS = {"tree attention": (attention, tree_attention, tree_attention_triton),
       "rope_and_cache": (rope, rope_and_cache, rope_and_cache_triton),
       "compact_kv": (compaction, compact_kv, compact_kv_triton)}


def every_path(name):
    """(call, op) for the op's dispatcher on the torch and the triton backend, then for its kernel itself."""
    call, dispatcher, kernel = OPS[name]
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)  # (tests/conftest.py restores it)
        yield call, dispatcher
    yield call, kernel


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("prefix_len", [5.0, True, np.float32(5)])
def test_a_prefix_len_that_is_not_an_integer_is_refused_on_every_path(name, prefix_len):
    # The interpreter failed on them (an InterpreterError), where the CPU dispatcher took them.
    for call, op in every_path(name):
        with pytest.raises(KernelInputError, match=f"{name} needs prefix_len as an int or a 0-d integer tensor, not "
                                                   f"{type(prefix_len).__name__} "):
            call(op, prefix_len)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("prefix_len", [np.int64(5), np.int32(5)])
def test_an_integral_prefix_len_of_any_type_is_an_int(name, prefix_len):
    for call, op in every_path(name):
        assert all(torch.equal(got, want) for got, want in zip(call(op, prefix_len), call(op, 5)))


def test_the_triton_backend_without_gpu_or_interpreter_names_the_fix():
    # Triton failed with "RuntimeError: 0 active drivers ([]). There should only be one." (on a CPU; on a GPU, CPU
    # tensors fail in Triton's launcher).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, kernels\nfrom kernels.rmsnorm import rmsnorm\nkernels.set_backend('triton')\n"
            "rmsnorm(torch.randn(2, 8), torch.ones(8), 1e-5)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "kernels.errors.KernelInputError: the Triton kernels run on CUDA tensors, or on CPU tensors in Triton's "
        "interpreter: set TRITON_INTERPRET=1 before anything imports triton (slow, for checking kernels), or use the "
        "torch backend (kernels.set_backend('torch')).")

"""--exact (row-invariant kernels): a Medusa tree step computes every accepted token bit for bit as plain
decoding computes it, so greedy Medusa's text is plain greedy's in any dtype.

On a CPU the Triton kernels run in Triton's interpreter (fp32); the GPU run (bf16) is in bench/gpu_run.sh
(`exact` stage) and bench/RESULTS.md. Each kernel's own row-invariance tests are beside its other tests
(test_kernel_linear.py, test_kernel_tree_attention.py).
"""

import re

import pytest
import torch

import kernels
import nanomedusa.model
from kernels.tree_attention import MAX_ROW_INVARIANT_TREE, TAIL_GRAIN
from nanomedusa.cli import check_kernels, exact_by_default, exact_fits, use_kernels
from nanomedusa.decoder import Decoder
from nanomedusa.errors import NanoMedusaError
from nanomedusa.generation import generate
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.medusa_generation import generate_medusa, verify
from nanomedusa.tree import TreeBuffers
from tests.helpers import make_hf_checkpoint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = ["float32"] + (["bfloat16"] if DEVICE == "cuda" else [])  # the interpreter cannot run bf16
# Node 1 is a wrong guess; the accepted path root -> 2 -> 3 -> 4 sits at tree slots 0, 2, 3, 4, not at
# 0..3 where plain decoding keeps the same tokens: the case row-invariant attention must gather.
CHOICES = [[0], [1], [1, 0], [1, 0, 0]]
PATH = [0, 2, 3, 4]


@pytest.fixture
def triton_exact():
    kernels.set_backend("triton")
    kernels.set_row_invariant(True)  # tests/conftest.py restores both afterwards


def tiny_model(tmp_path, dtype):
    make_hf_checkpoint(tmp_path, seed=5, num_key_value_heads=2, vocab_size=61)
    return load_model(tmp_path, device=DEVICE, dtype=dtype)[0]


@pytest.fixture(params=[True, False], ids=["rope-in-projection", "rope-kernel"])
def rope_in_projection(request, monkeypatch):
    """Both ways the attention rotates q and k and writes the cache: in the q/k/v projection's epilogue, as the tiny
    model's whole-head tiles (head_dim 16, the interpreter's 16-feature tiles) and a 7B's take it, or in the RoPE
    kernel after the projection, as the default model's narrower tiles do (kernels/linear.py,
    `fuses_rope_and_cache`). The fused case checks that it did fuse."""
    fused = []
    decide = nanomedusa.model.fuses_rope_and_cache
    monkeypatch.setattr(nanomedusa.model, "fuses_rope_and_cache",
                        lambda *args: fused.append(request.param and decide(*args)) or fused[-1])
    yield
    assert fused and all(fused) == request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prompt_len", [5, 30])  # the tree inside one key tile / straddling tiles and chunks
@torch.inference_mode()
def test_tree_step_computes_accepted_tokens_as_plain_decoding(tmp_path, triton_exact, rope_in_projection, dtype,
                                                              prompt_len):
    model = tiny_model(tmp_path, dtype)
    prompt = [(7 * i + 3) % 61 for i in range(prompt_len)]
    decoder = Decoder(model, cuda_graphs=False)

    # Plain decoding: the prompt, then one token per forward; each step's logits and K/V.
    decoder.size_cache(prompt_len, 8)
    logits = model.logits(decoder.prefill(prompt))[0]
    greedy, plain_logits = [int(logits.argmax())], []
    for position in range(prompt_len, prompt_len + len(PATH)):
        step = model(torch.tensor([[greedy[-1]]], device=DEVICE), prefix_len=position)[0, 0]
        plain_logits.append(step)
        greedy.append(int(step.argmax()))
    plain_kv = model.kv_cache.buffer[:, :, :, :, prompt_len:prompt_len + len(PATH)].clone()  # [L, 2, B, Hkv, 4, Dh]

    # One tree step over the same prompt: the greedy tokens on the path, a wrong guess on node 1.
    tree = TreeBuffers.from_choices(CHOICES, device=DEVICE)
    assert [tree.paths[n] for n in PATH] == [[], [1], [1, 0], [1, 0, 0]]
    tree_tokens = torch.tensor([greedy[0], (greedy[1] + 1) % 61] + greedy[1:len(PATH)], device=DEVICE)
    decoder.size_cache(prompt_len, 8, extra=tree.num_nodes)
    decoder.prefill(prompt)
    _, tree_logits = verify(model, tree, tree_tokens, torch.tensor(prompt_len, device=DEVICE))

    for depth, node in enumerate(PATH):
        assert torch.equal(tree_logits[node], plain_logits[depth]), f"logits of node {node} differ"
        assert torch.equal(model.kv_cache.buffer[:, :, :, :, prompt_len + node], plain_kv[:, :, :, :, depth]), \
            f"K/V of node {node} differ"


@pytest.mark.parametrize("tree_choices", [CHOICES, [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]]])
def test_exact_medusa_output_equals_plain_greedy(tmp_path, triton_exact, tree_choices):
    model = tiny_model(tmp_path, "float32")
    prompt = [5, 17, 42, 8, 9, 33]
    expected = generate(Decoder(model), prompt, max_new_tokens=16).tokens
    heads = MedusaHeads.from_base(model, num_heads=3).eval()
    tree = TreeBuffers.from_choices(tree_choices, device=DEVICE)
    got = generate_medusa(Decoder(model), heads, tree, prompt, max_new_tokens=16)
    assert got.tokens == expected
    assert got.steps < len(got.tokens) - 1  # some steps accepted guesses: tree steps, not only roots, were kept


@torch.inference_mode()
def test_exact_blocks_fold_their_norms_into_the_linear_layers(tmp_path, triton_exact, monkeypatch):
    # Under --exact a narrow model runs only two RMSNorm kernels (layer 0's, before the first stream exists, and the
    # final one); the hidden states are the unfused blocks' up to rounding. A wider model keeps its norms.
    model = tiny_model(tmp_path, torch.float32)
    tokens = torch.tensor([[(5 * i + b) % 61 for i in range(9)] for b in (2, 7)], device=DEVICE)  # 18 rows
    norms = []
    real_rmsnorm = nanomedusa.model.rmsnorm
    monkeypatch.setattr(nanomedusa.model, "rmsnorm", lambda *a, **k: norms.append(1) or real_rmsnorm(*a, **k))
    fused = model.forward_hidden(tokens)
    assert len(norms) == 2 and len(model.layers) > 1
    monkeypatch.setattr(nanomedusa.model, "FOLD_NORMS_MAX_DIM", model.config.dim - 1)
    unfused = model.forward_hidden(tokens)
    assert len(norms) == 2 + 2 * len(model.layers) + 1
    assert (fused - unfused).abs().max() <= 1e-5 * unfused.abs().max()


def test_exact_needs_the_triton_kernels():
    # the fix named is one for the device and the flags given: no "drop --kernels torch" to who passed none
    on_a_cpu = "on a CPU pass --kernels triton with TRITON_INTERPRET=1 (slow, for checking kernels), or drop --exact."
    with pytest.raises(NanoMedusaError, match=re.escape(f"--kernels torch on cpu runs the torch ones; {on_a_cpu}")):
        check_kernels("torch", torch.device("cpu"), exact=True)
    with pytest.raises(NanoMedusaError, match=re.escape(f"--kernels auto on cpu runs the torch ones; {on_a_cpu}")):
        check_kernels("auto", torch.device("cpu"), exact=True)
    with pytest.raises(NanoMedusaError, match=re.escape("--kernels torch on cuda runs the torch ones; drop --kernels "
                                                        "torch.")):
        check_kernels("torch", torch.device("cuda"), exact=True)
    check_kernels("auto", torch.device("cpu"), exact=False)  # --no-exact is always fine
    check_kernels("auto", torch.device("cpu"), exact=None)  # and so is the default


@pytest.mark.parametrize("backend,device,capability,expected", [
    ("auto", "cpu", None, False),  # the torch kernels: nothing to make row-invariant
    ("triton", "cpu", None, False),  # the interpreter: opt-in only
    ("auto", "cuda", (9, 0), True),  # Hopper: every kernel launches while the last one ends (measured faster)
    ("auto", "cuda", (10, 0), True),
    ("auto", "cuda", (8, 0), False),  # Ampere: no programmatic dependent launch, tiles tuned on Hopper
    ("auto", "cuda", (12, 0), False),  # consumer Blackwell: less shared memory than the tiles tuned on Hopper
    ("torch", "cuda", (9, 0), False),
    ("auto", "rocm", (9, 4), False),  # an AMD MI300 reports (9, 4): no griddepcontrol there
])
def test_exact_is_on_by_default_on_hopper_gpus_only(monkeypatch, backend, device, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", "6.2" if device == "rocm" else None)
    device = "cuda" if device == "rocm" else device  # (ROCm builds of torch call their GPUs cuda too)
    assert exact_by_default(backend, torch.device(device)) is expected
    use_kernels(backend, None, torch.device(device))  # the default: as exact_by_default says
    assert kernels.row_invariant() is expected
    use_kernels(backend, not expected, torch.device(device))  # --exact / --no-exact win over it
    assert kernels.row_invariant() is (not expected)


def test_exact_by_default_steps_aside_for_trees_its_kernels_cannot_take():
    assert exact_fits(64, 5) and exact_fits(MAX_ROW_INVARIANT_TREE, TAIL_GRAIN - 1)
    assert not exact_fits(MAX_ROW_INVARIANT_TREE + 1, 5)  # too many nodes for the tails' mask rows
    assert not exact_fits(64, TAIL_GRAIN)  # a node that deep, off the first-child chain, is refused

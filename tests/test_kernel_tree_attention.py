"""The Triton tree-attention kernel against its torch reference (kernels/tree_attention.py), and its
row-invariant mode against its contract: every query row bit for bit what a one-token call over that
token's own keys, laid out contiguously, computes.

Without a GPU the kernels run in Triton's CPU interpreter: tiny shapes, fp32 and fp16 (bf16 is broken
in the interpreter, so it is only checked on CUDA).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when a kernel is decorated, i.e. when kernels/ is imported:
    # this must be set before that import.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels.errors import KernelInputError  # noqa: E402
from kernels.testing import rel_error, tree_attention_inputs  # noqa: E402
from kernels.tree_attention import (  # noqa: E402
    MAX_ROW_INVARIANT_TREE,
    MERGE_CHUNKS,
    TAIL_GRAIN,
    _tile_config,
    body_chunks,
    tree_attention,
    tree_attention_reference,
    tree_attention_triton,
)
from nanomedusa.tree import TreeBuffers  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_tree_mask(T: int) -> torch.Tensor:
    """Ancestor mask [T, T] of a random tree: node i > 0 hangs under a random earlier node of depth below
    TAIL_GRAIN - 1 (the row-invariant mode refuses deeper nodes off the first-child chain; Medusa trees are
    about 5 deep)."""
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        shallow = (mask[:i].sum(1) < TAIL_GRAIN).nonzero().flatten()  # depth + 1 < TAIL_GRAIN
        mask[i] |= mask[shallow[torch.randint(shallow.numel(), ())].item()]
    return mask


def make_mask(kind: str, T: int) -> torch.Tensor | None:
    if kind == "none":  # causal, as the op reads tree_mask=None
        return None
    if kind == "causal":
        return torch.ones(T, T, dtype=torch.bool).tril()
    if kind == "tree":
        return random_tree_mask(T)
    # "any": the op allows any mask; keep the diagonal so every query sees at least one key
    return (torch.rand(T, T) < 0.5) | torch.eye(T, dtype=torch.bool)


def random_qkv(B, Hq, Hkv, T, S, D, dtype):
    """Random q [B, Hq, T, D] and caches k, v [B, Hkv, S, D] on DEVICE."""
    return (torch.randn(B, Hq, T, D, dtype=dtype, device=DEVICE), torch.randn(B, Hkv, S, D, dtype=dtype, device=DEVICE),
            torch.randn(B, Hkv, S, D, dtype=dtype, device=DEVICE))


def run_case(B, Hq, Hkv, T, S, D, prefix, mask_kind, dtype, prefix_as_tensor=False, num_splits=None,
             key_valid=None, row_invariant=False):
    """Kernel output and the float64 reference on fresh random inputs. Cache slots the op must ignore
    (past prefix+T, or hidden by key_valid) hold NaN for the kernel: it must never use them."""
    q, k, v = random_qkv(B, Hq, Hkv, T, S, D, dtype)
    tree_mask = make_mask(mask_kind, T)
    tree_mask = None if tree_mask is None else tree_mask.to(DEVICE)
    ref = tree_attention_reference(q.double(), k.double(), v.double(), prefix, tree_mask, key_valid)
    unused = (torch.arange(S, device=DEVICE) >= prefix + T).expand(B, S)  # [B, S]
    if key_valid is not None:
        unused = unused | ~key_valid
    k = k.masked_fill(unused[:, None, :, None], float("nan"))
    v = v.masked_fill(unused[:, None, :, None], float("nan"))
    p = torch.tensor(prefix, device=DEVICE) if prefix_as_tensor else prefix
    out = tree_attention_triton(q, k, v, p, tree_mask, key_valid, num_splits=num_splits, row_invariant=row_invariant)
    return out, ref


# (B, Hq, Hkv, T, S, D, prefix, mask, prefix as tensor, num_splits)
FP32_CASES = [
    (1, 4, 4, 1, 37, 16, 36, "causal", False, None),  # MHA decode, heuristic splits
    (1, 8, 2, 1, 37, 32, 20, "causal", True, 2),  # GQA decode, device prefix_len, trailing slots unused
    (2, 4, 2, 3, 37, 32, 0, "causal", False, 1),  # prefill from empty: single chunk writes out directly
    (1, 6, 2, 7, 37, 64, 17, "tree", True, None),  # group of 3 (M rows not a power of two)
    (1, 2, 2, 13, 37, 16, 24, "tree", False, 3),  # tree ends exactly at S
    (1, 4, 1, 13, 37, 16, 5, "any", True, 8),  # more chunks than key tiles: empty chunks
    (1, 4, 2, 40, 40, 16, 0, "causal", False, 2),  # long T: several query-row blocks
    # Prefixes longer than a GPU key tile (64), so whole prefix-only tiles take the mask-free path:
    (1, 8, 2, 9, 200, 64, 170, "tree", False, None),  # head_dim = the tile's: unmasked K/V loads
    (1, 4, 2, 5, 150, 24, 130, "tree", True, 3),  # head_dim 24 < its 32-wide tile: loads keep a dim mask
    (2, 4, 2, 6, 37, 16, 9, "none", True, 2),  # tree_mask None: causal
]


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,prefix,mask_kind,prefix_as_tensor,num_splits", FP32_CASES)
def test_fp32_matches_float64_reference(poisoned_allocations, B, Hq, Hkv, T, S, D, prefix, mask_kind,
                                        prefix_as_tensor, num_splits):
    out, ref = run_case(B, Hq, Hkv, T, S, D, prefix, mask_kind, torch.float32, prefix_as_tensor, num_splits)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert not out.isnan().any()
    assert rel_error(out, ref) <= 1e-5


HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,prefix,mask_kind,prefix_as_tensor,num_splits", [
    (1, 4, 2, 1, 37, 64, 31, "causal", True, None),
    (1, 6, 3, 7, 37, 32, 11, "tree", False, 2),
])
def test_half_precision_matches_reference(poisoned_allocations, dtype, B, Hq, Hkv, T, S, D, prefix,
                                          mask_kind, prefix_as_tensor, num_splits):
    out, ref = run_case(B, Hq, Hkv, T, S, D, prefix, mask_kind, dtype, prefix_as_tensor, num_splits)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_error(out, ref) <= 1e-2


def test_reference_query_heads_read_their_kv_head():
    """The reference's grouped queries against attention written out per query head: head h reads KV head
    h // group, over the prefix and its tree ancestors."""
    B, Hq, Hkv, T, S, D, prefix = 2, 6, 2, 4, 11, 8, 5
    q, k, v = random_qkv(B, Hq, Hkv, T, S, D, torch.float64)
    tree_mask = random_tree_mask(T).to(DEVICE)
    out = tree_attention_reference(q, k, v, prefix, tree_mask)  # [B, T, Hq, D]
    for h in range(Hq):
        for i in range(T):
            seen = torch.cat([torch.arange(prefix, device=DEVICE), prefix + tree_mask[i].nonzero().flatten()])
            kh, vh = k[:, h // (Hq // Hkv), seen], v[:, h // (Hq // Hkv), seen]  # [B, keys, D]
            probs = (torch.einsum("bd,bkd->bk", q[:, h, i], kh) / D ** 0.5).softmax(-1)
            torch.testing.assert_close(out[:, i, h], torch.einsum("bk,bkd->bd", probs, vh))


@pytest.mark.parametrize("prefix_as_tensor", [False, True])
@pytest.mark.parametrize("with_key_valid", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_cpu_dispatch_reads_no_slot_past_the_tree(prefix_as_tensor, with_key_valid, causal, T):
    """On a CPU the torch path reads only slots < prefix_len + T, with a mask of its own (a tree's, or causal as
    in a prefill; none for a plain decoding step, one causal token without key_valid, which sees every slot it
    reads): NaN past them changes nothing, and the output is the reference's over those slots bit for bit."""
    kernels.set_backend("torch")
    B, Hq, Hkv, S, D, prefix = 2, 6, 2, 30, 8, 9
    q, k, v = (t.cpu() for t in random_qkv(B, Hq, Hkv, T, S, D, torch.float32))
    tree_mask = None if causal else random_tree_mask(T)
    key_valid = torch.ones(B, S, dtype=torch.bool) if with_key_valid else None
    if with_key_valid:
        key_valid[1, :4] = False  # a left-padded row
    ref = tree_attention_reference(q, k, v, prefix, tree_mask, key_valid)
    end = prefix + T
    ref_read = tree_attention_reference(q, k[:, :, :end], v[:, :, :end], prefix, tree_mask,
                                        None if key_valid is None else key_valid[:, :end])
    k[:, :, end:], v[:, :, end:] = float("nan"), float("nan")
    out = tree_attention(q, k, v, torch.tensor(prefix) if prefix_as_tensor else prefix, tree_mask, key_valid)
    assert torch.equal(out, ref_read)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("prefix_as_tensor,num_splits", [(False, 1), (True, 3)])
def test_key_valid_hides_left_padding(poisoned_allocations, prefix_as_tensor, num_splits):
    B, S, prefix = 3, 37, 20
    key_valid = torch.arange(S, device=DEVICE)[None, :] >= torch.tensor([0, 5, 19], device=DEVICE)[:, None]
    key_valid[1, 9] = False  # and a hole that is not padding
    out, ref = run_case(B, 4, 2, 3, S, 16, prefix, "tree", torch.float32, prefix_as_tensor, num_splits, key_valid)
    assert not out.isnan().any()
    assert rel_error(out, ref) <= 1e-5


@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_query_that_sees_no_key_gets_zeros(poisoned_allocations, num_splits):
    # Row 1 hides every slot (a padding token of a left-padded batch): zeros, not NaN, from both sides.
    B, S, prefix, T = 2, 37, 20, 3
    key_valid = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    key_valid[1] = False
    out, ref = run_case(B, 4, 2, T, S, 16, prefix, "causal", torch.float32, False, num_splits, key_valid)
    assert (ref[1] == 0).all() and (out[1] == 0).all()
    assert rel_error(out, ref) <= 1e-5


def test_a_device_prefix_past_the_cache_reads_nothing_past_it(poisoned_allocations):
    # A device prefix_len is not checked on the host (that would cost a sync). One whose whole tiles reach past the
    # cache made the mask-free path read the tile that holds slot S - 1 whole, past S: NaN beyond it got in.
    S, D, T = 37, 16, 1
    block_n = _tile_config(T, D, torch.float32, DEVICE == "cuda")[1]
    assert S % block_n
    q, k, v, _, _ = tree_attention_inputs(4, 2, D, S - T, T, torch.float32, DEVICE)
    pad = block_n  # storage after slot S - 1, poisoned
    k_store, v_store = (torch.cat([x, torch.full_like(x[:, :, :pad], float("nan"))], dim=2) for x in (k, v))
    prefix = torch.tensor((S // block_n + 1) * block_n, device=DEVICE)
    out = tree_attention_triton(q, k_store[:, :, :S], v_store[:, :, :S], prefix, None, num_splits=1)
    assert torch.isfinite(out).all()


def test_chunking_does_not_change_the_result():
    q, k, v, prefix, tree_mask = tree_attention_inputs(4, 2, 16, 30, 5, torch.float32, DEVICE)
    one = tree_attention_triton(q, k, v, prefix, tree_mask, num_splits=1)
    for n in (2, 3):
        assert rel_error(tree_attention_triton(q, k, v, prefix, tree_mask, num_splits=n), one) <= 1e-6


def test_bad_inputs_name_the_fix():
    q = torch.randn(1, 6, 2, 16, device=DEVICE)
    k = torch.randn(1, 4, 8, 16, device=DEVICE)
    mask = torch.ones(2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(KernelInputError, match="multiple of the 4 KV heads"):
        tree_attention_triton(q, k, k, 3, mask)
    with pytest.raises(KernelInputError, match=r"bool tree_mask of shape \(2, 2\)"):
        tree_attention_triton(q[:, :4], k, k, 3, mask[:1])
    with pytest.raises(KernelInputError, match=r"key_valid as a bool \[B, S\] = \(1, 8\)"):
        tree_attention_triton(q[:, :4], k, k, 3, mask, torch.ones(1, 7, dtype=torch.bool, device=DEVICE))


def refusals(call) -> list[str]:
    """The message `call(backend)` raises, for the dispatcher on each backend and for the kernel called directly."""
    messages = []
    for backend in ("torch", "triton", None):
        if backend is not None:
            kernels.set_backend(backend)  # (tests/conftest.py restores it)
        with pytest.raises(KernelInputError) as refused:
            call(tree_attention_triton if backend is None else tree_attention)
        messages.append(str(refused.value))
    return messages


@pytest.mark.parametrize("case", ["v of another length", "past the cache", "negative prefix", "3-D q",
                                  "heads not grouped", "mask of another size", "float prefix tensor"])
def test_every_path_refuses_alike(case):
    # The CPU dispatcher validated nothing: a v cache of another length was taken, the rest failed inside torch.
    B, Hq, Hkv, T, S, D = 1, 4, 2, 3, 40, 16
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for H, L in ((Hq, T), (Hkv, S), (Hkv, S)))
    mask, prefix = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril(), 5
    if case == "v of another length":
        v = torch.randn(B, Hkv, S + 1, D, device=DEVICE)
    elif case == "past the cache":
        prefix = S - 1
    elif case == "negative prefix":
        prefix = -2
    elif case == "3-D q":
        q = q[0]
    elif case == "heads not grouped":
        k = v = torch.randn(B, 3, S, D, device=DEVICE)
    elif case == "mask of another size":
        mask = mask[:2, :2]
    else:
        prefix = torch.tensor(5.0, device=DEVICE)
    messages = refusals(lambda attention: attention(q, k, v, prefix, mask))
    assert len(set(messages)) == 1, messages


def test_a_dtype_mismatch_names_each_dtype():
    # Only v in fp16 read "got torch.float32 and torch.float32".
    q, k = torch.randn(1, 4, 3, 16, device=DEVICE), torch.randn(1, 2, 40, 16, device=DEVICE)
    messages = refusals(lambda attention: attention(q, k, k.half(), 5, None))
    assert set(messages) == {"tree attention needs q and the caches in one floating-point dtype, got q torch.float32, "
                             "k torch.float32 and v torch.float16; cast the cache to the model dtype."}


def test_no_new_tokens_give_an_empty_output_on_the_cpu_as_in_the_kernel():
    q, k = torch.randn(1, 4, 0, 16), torch.randn(1, 2, 40, 16)
    kernels.set_backend("torch")  # (tests/conftest.py restores it)
    assert tree_attention(q, k, k, 5, None).shape == (1, 0, 4, 16)
    assert tree_attention_triton(q.to(DEVICE), k.to(DEVICE), k.to(DEVICE), 5, None).shape == (1, 0, 4, 16)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_device_prefix_len_is_graph_capturable():
    q, k, v, _, tree_mask = tree_attention_inputs(8, 2, 64, 200, 4, torch.bfloat16, DEVICE)
    prefix = torch.tensor(100, device=DEVICE)
    tree_attention_triton(q, k, v, prefix, tree_mask)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention_triton(q, k, v, prefix, tree_mask)
    for p in (150, 7):
        prefix.fill_(p)
        graph.replay()
        assert rel_error(out, tree_attention_reference(q, k, v, p, tree_mask)) <= 1e-2


# ------------------------------------------------------------------------------------- row-invariant mode
# The contract (issue #16): with row_invariant=True, the output row of a query token equals, bit for bit,
# what a one-token (T=1) causal call computes over that token's logical keys: the cached prefix, then its
# ancestors in depth order and itself, at slots prefix .. prefix + depth. That is the plain decode of the
# same token, so a greedy Medusa step reproduces plain greedy decoding.

# A Medusa tree (nodes in BFS order) with branching at every depth, so that most nodes' ancestors are not
# contiguous tree slots: node 6 = [1, 0] sees tree slots 0, 2, 6, where its plain decode holds them at 0, 1, 2;
# node 13 = [0, 1, 0, 0] (depth 4) sees 0, 1, 5, 10, 13.
CHOICES = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0],
           [0, 0, 0, 0], [0, 1, 0, 0]]
INVARIANT_DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
S_CACHE, HEAD_DIM = 96, 16


def mode_block_n() -> int:
    """Keys per tile of the row-invariant mode on DEVICE, for fp32/bf16 with head_dim HEAD_DIM."""
    return _tile_config(1, HEAD_DIM, torch.float32, DEVICE == "cuda", row_invariant=True)[1]


def mode_chunks(n_kv_heads: int = 2):
    """The row-invariant mode's BodyChunks on DEVICE for a model of n_kv_heads KV heads."""
    return body_chunks(DEVICE == "cuda", n_kv_heads)


def mode_lengths(n_kv_heads: int = 2) -> int:
    """Body keys of the row-invariant mode on DEVICE (fp32/bf16, head_dim HEAD_DIM, n_kv_heads KV heads) at whose
    multiples its chunks change: a tile longer each (up to mode_chunks().max_tiles), or, with fixed chunks
    (count 0), one chunk more."""
    chunks = mode_chunks(n_kv_heads)
    return mode_block_n() * (chunks.count or chunks.max_tiles)


def logical_layout(cache, prefix, ancestors):
    """A copy of cache [B, Hkv, S, D] laid out as the plain decode of a node sees it: its ancestors' tree slots
    prefix + a (a in depth order, the node last) moved to prefix .. prefix + depth; NaN after (never read)."""
    out = cache.clone()
    n = len(ancestors)
    out[:, :, prefix:prefix + n] = cache[:, :, prefix + ancestors]
    out[:, :, prefix + n:] = float("nan")
    return out


def rows_unlike_one_token_calls(q, k, v, prefix, tree_mask, row_invariant, prefix_as_tensor=False):
    """The tree call, then for every node t the one-token call over its logical keys; returns the nodes whose
    row differs in any bit (torch.equal), the one-token calls always row-invariant (the contract's side)."""
    T = q.shape[2]
    as_prefix = (lambda p: torch.tensor(p, device=DEVICE)) if prefix_as_tensor else (lambda p: p)
    tree_out = tree_attention_triton(q, k, v, as_prefix(prefix), tree_mask, row_invariant=row_invariant)
    assert not tree_out.isnan().any()
    differ = []
    for t in range(T):
        ancestors = (tree_mask[t].nonzero().flatten() if tree_mask is not None
                     else torch.arange(t + 1, device=DEVICE))  # causal: the tokens before it, as they are
        depth = len(ancestors) - 1
        one = tree_attention_triton(q[:, :, t:t + 1], logical_layout(k, prefix, ancestors),
                                    logical_layout(v, prefix, ancestors), as_prefix(prefix + depth), None,
                                    row_invariant=True)
        if not torch.equal(one[:, 0], tree_out[:, t]):
            differ.append(t)
    return differ


# A row at logical position p: body = keys 0 .. B_p in chunks of whole tiles at absolute positions (B_p a multiple
# of TAIL_GRAIN, so the last body tile may be cut): up to mode_chunks().count of them, each a tile longer from every
# multiple of mode_lengths() on, up to max_tiles; past that, more chunks (fixed chunks: a chunk boundary at every
# multiple). Tail = B_p .. p in one tile. The prefixes put the tree's rows on every side of those boundaries: at
# "x + 13" the root and depths 1-2 have B_p = x (p = x + 13 .. x + 15), depths 3-4 x + TAIL_GRAIN, so the rows of
# one call take chunks of two lengths (or straddle a chunk boundary). On a GPU 2 and 8 KV heads cut differently
# (body_chunks), so both run there; the interpreter cuts both alike, and CI runs the 2.
PREFIXES = {  # name -> prefix for (block_n, mode_lengths(), BodyChunks)
    "at slot 0": lambda n, step, c: 0,  # tails from key 0, no body
    "depths apart by a grain": lambda n, step, c: 3 * TAIL_GRAIN - 1,  # depth 0 and depth 1 have different B_p
    "in tile 0": lambda n, step, c: n - 2,  # prefix % BLOCK_N = BLOCK_N - 2: bodies cut in tile 0, deeper later
    "at the first change of chunks": lambda n, step, c: step + 13,
    # (the interpreter's chunks are capped at 2 tiles by then: the rows straddle a change of chunk count instead)
    "at the second change of chunks": lambda n, step, c: 2 * step + 13,
    # B_p = x - TAIL_GRAIN for the root, x for depth 2 on, x = step + n: the bodies end either side of a tile's end
    "bodies across a tile boundary": lambda n, step, c: step + n + TAIL_GRAIN - 2,
    "more chunks than a merge reads at once": lambda n, step, c: (MERGE_CHUNKS + 1) * n * c.max_tiles + 5,
}


def mode_prefix(where: str, n_kv_heads: int = 2) -> int:
    """PREFIXES[where] for the row-invariant mode on DEVICE and a model of n_kv_heads KV heads."""
    return PREFIXES[where](mode_block_n(), mode_lengths(n_kv_heads), mode_chunks(n_kv_heads))


# On a GPU also a group of 1 (a 7B without grouped queries), whose bodies pipeline deeper (`_body_stages`).
@pytest.mark.parametrize("group", [3] + ([1] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("n_kv_heads", [2] + ([8] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("dtype", INVARIANT_DTYPES)
@pytest.mark.parametrize("where,prefix_as_tensor", [(name, i % 2 == 1) for i, name in enumerate(PREFIXES)]
                         + [("at the first change of chunks", False)])  # two lengths, the host's prefix too
def test_row_invariant_tree_rows_equal_plain_decode_of_their_tokens(poisoned_allocations, group, n_kv_heads, dtype,
                                                                    where, prefix_as_tensor):
    prefix = mode_prefix(where, n_kv_heads)
    tree_mask = TreeBuffers.from_choices(CHOICES, device=DEVICE).attn_mask
    T = tree_mask.shape[0]
    S = prefix + T + mode_lengths(n_kv_heads)  # keys past the tree: the grid covers them, the merge must skip them
    q, k, v = random_qkv(1, group * n_kv_heads, n_kv_heads, T, S, HEAD_DIM, dtype)
    assert rows_unlike_one_token_calls(q, k, v, prefix, tree_mask, True, prefix_as_tensor) == []


@pytest.mark.parametrize("where", ["at the first change of chunks", "more chunks than a merge reads at once"])
def test_fixed_chunks_rows_equal_plain_decode_of_their_tokens(poisoned_allocations, monkeypatch, where):
    """BodyChunks(0, max_tiles), the fixed chunks some shapes take: one chunk length for every row (and one set of
    body programs per call), the same contract."""
    import kernels.tree_attention as ta
    fixed = ta.BodyChunks(0, mode_chunks().max_tiles)
    monkeypatch.setattr(ta, "body_chunks", lambda on_gpu, n_kv_heads: fixed)
    prefix = PREFIXES[where](mode_block_n(), mode_block_n() * fixed.max_tiles, fixed)
    tree_mask = TreeBuffers.from_choices(CHOICES, device=DEVICE).attn_mask
    T = tree_mask.shape[0]
    q, k, v = random_qkv(1, 6, 2, T, prefix + T + mode_block_n() * fixed.max_tiles, HEAD_DIM, torch.float32)
    assert rows_unlike_one_token_calls(q, k, v, prefix, tree_mask, True, True) == []
    out = tree_attention_triton(q, k, v, prefix, tree_mask, row_invariant=True)
    ref = tree_attention_reference(q.double(), k.double(), v.double(), prefix, tree_mask)
    assert rel_error(out, ref) <= 1e-5


@pytest.mark.parametrize("prefix_as_tensor", [False, True])
def test_row_invariant_mask_row_without_its_own_key(poisoned_allocations, prefix_as_tensor):
    """A mask row may be empty (this token sees the prefix only): its body ends a grain before the others' and
    can take shorter chunks than any other row of the call, which the bodies kernel must still launch for (it
    takes the call's shortest length from the prefix alone, for a mask from an empty row's)."""
    prefix = mode_lengths() + 2 * TAIL_GRAIN  # the empty row: B_p = mode_lengths(); the others a grain past it
    T = 4
    tree_mask = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    tree_mask[0, 0] = False
    q, k, v = random_qkv(1, 6, 2, T, prefix + T + 8, HEAD_DIM, torch.float32)
    assert rows_unlike_one_token_calls(q, k, v, prefix, tree_mask, True, prefix_as_tensor) == []
    as_prefix = torch.tensor(prefix, device=DEVICE) if prefix_as_tensor else prefix
    out = tree_attention_triton(q, k, v, as_prefix, tree_mask, row_invariant=True)
    ref = tree_attention_reference(q.double(), k.double(), v.double(), prefix, tree_mask)
    assert rel_error(out, ref) <= 1e-5


def test_causal_rows_over_three_chunk_lengths(poisoned_allocations, monkeypatch):
    """A causal call whose rows' bodies span three chunk lengths (chunks a tile longer every tile of body: one
    chunk per body up to 8 tiles), so the bodies kernel needs its third set of length programs."""
    import kernels.tree_attention as ta
    monkeypatch.setattr(ta, "body_chunks", lambda on_gpu, n_kv_heads: ta.BodyChunks(1, 8))
    T = 3 * mode_block_n() + 8
    prefix = mode_block_n() - 8  # bodies of 1 to 3 tiles (B_p = TAIL_GRAIN .. 3 * BLOCK_N)
    q, k, v = random_qkv(1, 4, 2, T, prefix + T + 8, HEAD_DIM, torch.float32)
    assert rows_unlike_one_token_calls(q, k, v, prefix, None, True, True) == []


def test_default_mode_is_not_row_invariant():
    """The check above bites: without the mode, rows of the same tree differ from the one-token calls (the
    split into chunks follows prefix + T, and the ancestors sit apart)."""
    prefix = mode_lengths() - 3
    tree_mask = TreeBuffers.from_choices(CHOICES, device=DEVICE).attn_mask
    q, k, v = random_qkv(1, 6, 2, tree_mask.shape[0], prefix + 40, HEAD_DIM, torch.float32)
    assert len(rows_unlike_one_token_calls(q, k, v, prefix, tree_mask, False)) > 0


@pytest.mark.parametrize("lengths,offset,tiles,prefix_as_tensor", [
    (0, 0, 0, False), (0, 27, 0, True), (0, 3, 3, False),
    (1, -10, 3, True),  # the rows' chunks change length (interpreter: 1 tile, then 2; fixed chunks: a boundary)
])
def test_row_invariant_causal_rows_equal_one_token_calls(poisoned_allocations, lengths, offset, tiles,
                                                         prefix_as_tensor):
    """A prefill's rows (tree_mask None) are the plain decodes of its tokens; an explicit causal mask gives
    the same bits (every row of it is contiguous, so no row is gathered). With `tiles` key tiles of new tokens,
    the later rows' bodies hold new tokens too (contiguous rows have no depth limit)."""
    prefix = lengths * mode_lengths() + offset
    T = 12 if tiles == 0 else tiles * mode_block_n() - 8
    S = prefix + T + 40
    q, k, v = random_qkv(2 if tiles == 0 else 1, 4, 2, T, S, HEAD_DIM, torch.float32)
    assert rows_unlike_one_token_calls(q, k, v, prefix, None, True, prefix_as_tensor) == []
    causal = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    assert torch.equal(tree_attention_triton(q, k, v, prefix, causal, row_invariant=True),
                       tree_attention_triton(q, k, v, prefix, None, row_invariant=True))


# (B, Hq, Hkv, T, S, D, prefix, mask, prefix as tensor): the reference still holds in the mode
ROW_INVARIANT_CASES = [
    (1, 4, 4, 1, 37, 16, 36, "none", False),  # MHA decode
    (2, 8, 2, 1, 37, 32, 20, "none", True),  # GQA decode, trailing slots unused
    (1, 6, 2, 7, 70, 64, 33, "tree", True),  # group of 3
    (1, 4, 1, TAIL_GRAIN, 37, 16, 5, "any", True),  # any mask (of at most TAIL_GRAIN rows): gathered whatever its shape
    (1, 2, 2, 40, 90, 24, 30, "tree", False),  # tree over 3 chunks; head_dim below its tile
    (1, 4, 2, 40, 40, 16, 0, "none", False),  # prefill: several query-row blocks
    (1, 4, 2, 5, 400, 16, 330, "tree", True),  # a long body (interpreter: 10 chunks of 2 tiles)
]


@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,prefix,mask_kind,prefix_as_tensor", ROW_INVARIANT_CASES)
def test_row_invariant_matches_float64_reference(poisoned_allocations, B, Hq, Hkv, T, S, D, prefix, mask_kind,
                                                 prefix_as_tensor):
    out, ref = run_case(B, Hq, Hkv, T, S, D, prefix, mask_kind, torch.float32, prefix_as_tensor, row_invariant=True)
    assert out.shape == ref.shape and not out.isnan().any()
    assert rel_error(out, ref) <= 1e-5


@pytest.mark.parametrize("mask_kind", ["tree", "none"])
def test_row_invariant_key_valid_and_blind_rows(poisoned_allocations, mask_kind):
    # Row 0 of the batch has left padding and a hole; row 2 hides every slot (a padding token): zeros.
    B, S, prefix = 3, 50, 30
    key_valid = torch.arange(S, device=DEVICE)[None, :] >= torch.tensor([5, 0, 0], device=DEVICE)[:, None]
    key_valid[0, 9] = False
    key_valid[2] = False
    out, ref = run_case(B, 4, 2, 6, S, 16, prefix, mask_kind, torch.float32, True, key_valid=key_valid,
                        row_invariant=True)
    assert (out[2] == 0).all() and not out.isnan().any()
    assert rel_error(out, ref) <= 1e-5


def test_dispatcher_follows_the_row_invariant_switch():
    kernels.set_backend("triton")
    q, k, v, prefix, _ = tree_attention_inputs(4, 2, 16, 30, 5, torch.float32, DEVICE)
    mask = random_tree_mask(5).to(DEVICE)
    for flag in (True, False):
        kernels.set_row_invariant(flag)
        assert torch.equal(tree_attention(q, k, v, prefix, mask),
                           tree_attention_triton(q, k, v, prefix, mask, row_invariant=flag))


def test_a_long_prefill_under_row_invariance_does_not_depend_on_the_cache_size(monkeypatch):
    # More tokens than a row-invariant tree may have: the default kernel, in one key chunk. Its split
    # heuristic reads the cache length when prefix_len is on the device (a graphed prefill), and plain and
    # Medusa decoding size their caches differently: split by it, a prompt's K/V would differ between them.
    import kernels.tree_attention as tree_attention_module

    monkeypatch.setattr(tree_attention_module, "_sm_count", lambda device: 132)  # a GPU's wish to split
    kernels.set_backend("triton")
    kernels.set_row_invariant(True)
    T = MAX_ROW_INVARIANT_TREE + 8
    q, k, v, _, _ = tree_attention_inputs(2, 1, 16, 0, T, torch.float32, DEVICE)
    prefix = torch.tensor(0, device=DEVICE)
    outs = []
    for spare_slots in (0, 512):  # two runs' cache sizes
        spare = torch.randn(1, 1, spare_slots, 16, device=DEVICE)
        outs.append(tree_attention(q, torch.cat([k, spare], 2), torch.cat([v, spare], 2), prefix, None))
    assert torch.equal(outs[0], outs[1])


def test_row_invariant_bad_inputs_name_the_fix():
    q, k, v, prefix, _ = tree_attention_inputs(4, 2, 16, 3, MAX_ROW_INVARIANT_TREE + 1, torch.float32, DEVICE)
    with pytest.raises(KernelInputError, match="pass tree_mask=None for causal calls"):
        tree_attention_triton(q, k, v, prefix, random_tree_mask(q.shape[2]).to(DEVICE), row_invariant=True)
    with pytest.raises(KernelInputError, match="drop num_splits"):
        tree_attention_triton(q[:, :, :2], k, v, prefix, None, num_splits=2, row_invariant=True)


def chain_under_second_child(depth: int) -> torch.Tensor:
    """The mask of a root with children [0] and [1] and a chain under [1] down to depth `depth`: the chain's
    nodes sit after [0] in the tree, so their ancestors lie apart."""
    chain = [[1] + [0] * k for k in range(1, depth)]
    return TreeBuffers.from_choices([[0], [1]] + chain, device=DEVICE).attn_mask


def test_row_invariant_refuses_a_node_deeper_than_the_tail_grain(monkeypatch):
    """A node whose ancestors lie apart is gathered for its tail only, so it must be shallower than TAIL_GRAIN;
    contiguous rows (here a single chain, deeper still) have no limit. Where the host cannot check (inside a CUDA
    graph capture), such a node gets a NaN row rather than a wrong one."""
    grain = TAIL_GRAIN
    T = grain + 2
    q, k, v = random_qkv(1, 2, 1, T, 60 + grain, HEAD_DIM, torch.float32)
    prefix = 20
    with pytest.raises(KernelInputError, match=f"depth below {grain}.*at depth {grain}"):
        tree_attention_triton(q, k, v, prefix, chain_under_second_child(grain), row_invariant=True)
    chain = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    assert not tree_attention_triton(q, k, v, prefix, chain, row_invariant=True).isnan().any()
    assert not tree_attention_triton(q[:, :, :-1], k, v, prefix, chain_under_second_child(grain - 1),
                                     row_invariant=True).isnan().any()
    # The check is remembered per mask, and made again once the mask is written to.
    chain.copy_(chain_under_second_child(grain))
    with pytest.raises(KernelInputError, match=f"at depth {grain}"):
        tree_attention_triton(q, k, v, prefix, chain, row_invariant=True)

    monkeypatch.setattr(sys.modules["kernels.tree_attention"], "_check_row_invariant_depth", lambda *args: None)
    out = tree_attention_triton(q, k, v, prefix, chain_under_second_child(grain), row_invariant=True)
    assert out[:, -1].isnan().all() and not out[:, :-1].isnan().any()  # only the node at depth TAIL_GRAIN


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("n_kv_heads", [2, 8])  # fixed chunks; chunk lengths that follow the body (body_chunks)
def test_row_invariant_is_graph_capturable(n_kv_heads):
    # With programmatic dependent launch on, as a graphed step runs it: at prefix 7 every body program has no
    # rows, and with a chunk count (8 KV heads) all but one end before their wait
    kernels.set_row_invariant(True)
    kernels.set_dependent_launch(True)
    tree_mask = TreeBuffers.from_choices(CHOICES, device=DEVICE).attn_mask
    q, k, v, _, _ = tree_attention_inputs(8, n_kv_heads, 64, 300, tree_mask.shape[0], torch.bfloat16, DEVICE)
    prefix = torch.tensor(100, device=DEVICE)
    tree_attention_triton(q, k, v, prefix, tree_mask, row_invariant=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tree_attention_triton(q, k, v, prefix, tree_mask, row_invariant=True)
    for p in (250, 7):
        prefix.fill_(p)
        graph.replay()
        assert torch.equal(out, tree_attention_triton(q, k, v, p, tree_mask, row_invariant=True))

"""Tree attention: T new query tokens attend to a cached prefix plus each other under a tree mask.

One op serves every attention call at inference time:
  * prefill:      prefix_len = 0 (or the tokens already cached), tree_mask = None (causal)
  * plain decode: T = 1, tree_mask = None
  * Medusa step:  the T tree nodes, tree_mask[i, j] = node j is node i or one of its ancestors

The caller has already written the new keys/values into cache slots prefix_len .. prefix_len+T-1.
Queries come head-major, q [B, Hq, T, D]; the output is token-major, [B, T, Hq, D], so the attention's
output projection reads it as [B, T, Hq * D] without a transpose copy.
Query i sees every slot < prefix_len, and slot prefix_len+j exactly when tree_mask[i, j] (without a
mask: when j <= i, and no mask is read).
The optional `key_valid` [B, S] bool further hides slots from every query of a batch row (the left
padding of a batch of unequal prompts). A query that sees no slot at all (a padding token itself) gets
a zero output rather than the NaN of a softmax over nothing: a NaN there would flow into the next
layer's keys/values at the padding slots, and 0 * NaN poisons every real row that skips them.
`prefix_len` may be a Python int or a 0-d integer tensor on the device (no host sync, so the step can
be captured in a CUDA graph).

The Triton version is flash-decoding with grouped-query attention folded in:
  * One program owns one KV head and BLOCK_M "query rows"; the rows are the (token, query head) pairs
    of that KV head's group, row r = t * group + g. Stacking the group this way reads each K/V tile
    once per group instead of once per query head, and turns a T=1 decode into a matrix product.
  * The visible keys 0 .. prefix_len+T-1 are cut into `num_splits` chunks of whole BLOCK_N tiles,
    one program per chunk (split-K), so that a batch-1 decode still spreads over every SM. The tree
    keys are simply the last tiles; the tree mask is applied wherever a tile reaches them.
  * Each program runs an online softmax (in base 2: scores are pre-multiplied by log2(e)) and writes
    its unnormalised output with its running max and sum; a small second kernel merges the chunks.
    With a single chunk the first kernel normalises and writes the output itself.

Row-invariant mode (`row_invariant=True`; `tree_attention` passes `kernels.row_invariant()`). Greedy
Medusa must emit exactly the tokens of plain greedy decoding, so a tree node's row must come out bit
for bit as the plain decode of the same token computes it. Floating-point sums depend on how their
terms are grouped, and above, the grouping follows the call rather than the row: BLOCK_M, the split
count and the chunk bounds are derived from T and prefix_len + T. Worse, a node's keys sit elsewhere.
Take prefix_len P = 1000 and the tree of nanomedusa/tree.py's example, node 4 = path [0, 1] at depth 2:

    plain decode of its token (T = 1, prefix_len 1002): slots 0..999 prefix, 1000 root, 1001 [0], 1002 [0, 1]
    tree step (T = 5, prefix_len 1000):                  slots 0..999 prefix, 1000 root, 1001 [0],
                                                         1002 [1] masked, 1003 [0, 0] masked, 1004 [0, 1]

So the mode computes each row from its *logical* keys alone, the prefix, then its ancestors in depth order,
itself last (logical positions 0 .. p, p = P + depth), in a decomposition that depends on p only:
  * body: the keys below B_p = max(p // TAIL_GRAIN - 1, 0) * TAIL_GRAIN (TAIL_GRAIN = 8), cut into chunks at
    absolute positions c * L .. (c + 1) * L (the chunk holding B_p cut there), L a function of B_p alone
    (`_ri_chunk_keys`): whole tiles, B_p's tiles shared over the `count` chunks the model's shape asks for (about
    a wave of programs on a GPU), at most `max_tiles` tiles each, so a long body takes more chunks (`body_chunks`;
    count 0: always max_tiles tiles); each chunk one online-softmax pass over BLOCK_N-key tiles starting at
    multiples of BLOCK_N -> one partial per chunk;
  * tail: the keys B_p to p (9 to 16 of them; fewer while p < 8), one tile of 2 * TAIL_GRAIN keys, key
    B_p + j in column j -> one more partial;
  * merge: the body chunks, MERGE_CHUNKS at a time (each group one sum over a tile of fixed shape), then the tail.
So a decode at p and a tree node at p group the same terms alike. With a GPU's BLOCK_N = 64 and 4 chunks of at
most 8 tiles (a model of 32 KV heads), node 4 above (p = 1002, B_p = 992: 16 tiles, L = 256) has the body chunks
0..256, 256..512, 512..768 and 768..992 and the tail 992..1002, whose logical keys 1000, 1001, 1002 the tree step
gathers from slots 1000, 1001, 1004: the plain decode of its token computes the very same partials. For a node at
depth < TAIL_GRAIN, B_p <= p - TAIL_GRAIN < P: every body is cached prefix, the same slots for every row, and
only a tail can hold tree slots. Two kernels (programs per batch row and KV head):
  1. `_ri_bodies_kernel`, one program per (query-row block, chunk, chunk length): the chunk for every row of
     the block whose chunks have that length (one length for all but where the rows straddle a change), each
     row up to its own B_p. A key past a row's B_p is masked for that row, and a tile it sees nothing of leaves
     its running max, sum and output exactly as they were (alpha = exp2(0) = 1, or 0 while nothing was seen,
     and every p = exp2(-inf) = 0). Each writes its rows' partials.
  2. `_ri_tails_kernel`, one program per token: its GROUP query rows (a tile of TAIL_M rows, GROUP rounded up
     to a power of 2: the same tile in every call), its tail in one key tile, then the merge of its rows' body
     partials, MERGE_CHUNKS at a time, and tail. In a tree it reads logical key x from slot x below P and from
     slot P + a_(x-P) above, a_k its depth-k ancestor, the (k+1)-th set bit of its mask row (computed in the
     kernel from the row's running count: no per-layer preprocessing); a causal call reads the slots as they
     are. The tail is products summed on CUDA cores (a tensor-core tile would need 16 rows where a model without
     grouped queries has one), in a kernel of its own with few warps (`_tail_warps`; a 7B without grouped
     queries: one, of 128 registers), so that a 64-node tree's programs all fit the GPU at once; under
     programmatic dependent launch it computes the tail while the bodies still run and waits for them only to
     merge (`_ri_tails_kernel`).
A node whose ancestors lie apart (mask row other than 1..1 0..0; above: nodes 2, 3, 4) must therefore sit at
depth < TAIL_GRAIN (Medusa trees: about 5): `KernelInputError` otherwise, checked on the host for trees of more
than TAIL_GRAIN nodes (one read-back per mask) except during a CUDA graph capture, where such a node gets a NaN
row instead. Contiguous rows (causal calls, a tree's first-child chain) have no depth limit; trees have at most
MAX_ROW_INVARIANT_TREE nodes. Rounding alike on every path:
  * Tile shapes fixed whatever T: body tiles of BLOCK_M = 64 rows for 16-bit inputs on a GPU (16 for fp32 and
    the interpreter) and BLOCK_N keys, 4 warps; tail tiles of TAIL_M rows and 2 * TAIL_GRAIN keys, and merge
    tiles of MERGE_CHUNKS chunks, their warps set by the model's shape alone (`_tail_warps`). A tl.dot element
    depends only on its own row and column, not on where the row sits in the tile or what the other rows hold,
    and a tl.sum over a tile of fixed shape and warps reduces each row in one fixed order, so equal tile
    contents give equal bits. (A decode's body also runs 64-row tiles, so that it stays on the same wgmma
    instructions as a tree: with 16 rows Triton falls back to mma.sync.)
  * Visibility is always a runtime select on the scores before they are scaled, masked loads give zeros, and
    both kernels are compiled with enable_fp_fusion=False, so no mul + add is contracted into an FMA on one path
    (a whole or a cut body tile, a gathered tail or not, a variant compiled with or without a tree mask) and not
    on another.
The cost over the default mode: one small tile per token and KV head for the tails (the tree's nodes share
the bodies, and a tail is one tile of at most 16 keys), fixed 64-row body tiles for small T, and a second kernel
on every call (the default mode needs one only when it splits the keys); bench/tree_attention.py times it. Its
partials take batch * Hkv * n_body * T * group * D floats, n_body = max(count, cdiv(B_max's tiles, max_tiles)) but
at most B_max's tiles, B_max the body of the last key (prefix_len + T, or S for a device prefix_len): a 64-node
tree of a 7B with a 4,096-slot cache and a device prefix_len, 8 MB a layer; quadratic in T for a long causal call
(a 4096-token prefill of a 7B GQA layer: about half a GB, transient), where the default mode, with its single
split, needs none: so `tree_attention` runs causal calls of more than MAX_ROW_INVARIANT_TREE tokens (long
prefills) on the default kernel in one chunk, and only a direct `tree_attention_triton(..., row_invariant=True)`
call pays this.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import row_invariant, use_triton
from .checks import checked_prefix_len
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError


def tree_attention_reference(q, k_cache, v_cache, prefix_len, tree_mask, key_valid=None):
    """q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, S, D]; tree_mask [T, T] bool or None (causal); key_valid
    [B, S] bool or None -> out [B, T, Hq, D] (token-major: the output projection reads it as [B, T, Hq * D])."""
    T, S = q.shape[2], k_cache.shape[2]
    if tree_mask is None:
        tree_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    slots = torch.arange(S, device=q.device)
    rel = slots - prefix_len  # [S]: position of each slot relative to the first tree node
    in_tree = (rel >= 0) & (rel < T)
    tree_part = tree_mask[:, rel.clamp(0, T - 1)] & in_tree  # [T, S]
    mask = (rel < 0) | tree_part  # [T, S]
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]  # [B, 1, T, S]
    return attend(q, k_cache, v_cache, mask)


def attend(q, k_cache, v_cache, mask=None):
    """The reference's arithmetic: q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, S, D]; mask [T, S] or [B, 1, T, S]
    bool (None: every query sees every slot) -> out [B, T, Hq, D]. A query that sees no slot gets zeros."""
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    # Query head h reads KV head h // group: a KV head's group of query heads is one [group * T, D] block of
    # rows, so each K/V is read as it is, never copied per query head.
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 at least; a float64 reference stays float64
    qg = q.to(acc).reshape(B, Hkv, group * T, D)
    scores = (qg @ k_cache.to(acc).transpose(-1, -2)).view(B, Hkv, group, T, S) / math.sqrt(D)
    if mask is None:
        probs = scores.softmax(-1)
    else:
        mask = mask.view(mask.shape[0] if mask.dim() == 4 else 1, 1, 1, T, S)  # [B or 1, 1, 1, T, S]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.where(mask.any(-1, keepdim=True), scores.softmax(-1), 0.0)  # no visible key: zero output
    out = probs.view(B, Hkv, group * T, S) @ v_cache.to(acc)  # [B, Hkv, group * T, D]
    return out.view(B, Hq, T, D).to(q.dtype).transpose(1, 2)  # [B, T, Hq, D]


def tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, key_valid=None):
    """Dispatch: the Triton kernel on CUDA (row-invariant when `kernels.row_invariant()`), the reference
    elsewhere (see module docstring), each after the same input checks. tree_mask None: causal (prefill, plain
    decode).

    Under row invariance a causal call of more than MAX_ROW_INVARIANT_TREE tokens (a long prefill) runs the
    default kernel with one key chunk instead: the row-invariant merge would hold partials growing with the
    square of its length, and one chunk makes every row depend on the prompt alone, not on the cache size a
    run chose (plain and Medusa decoding size their caches differently, and the split heuristic reads it).
    No one-row call is compared with a long prefill's rows: plain and Medusa decoding both prefill the prompt.

    On a CPU the reference's arithmetic (`attend`) reads only the slots a query can see, up to prefix_len + T, where a
    GPU's call keeps the whole cache's shapes for its CUDA graph: a chat's cache is sized for its whole context (2,048
    slots on a CPU). Its mask is the prefix's slots, then the tree's, built from prefix_len read on the host; a plain
    decoding step's one token sees every slot read and needs none. (The reference's mask, built for any cache size
    without reading prefix_len, took 70 of a plain step's 100 µs there, at the default model's shapes.)"""
    prefix_len = _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, key_valid)
    if use_triton(q):
        if row_invariant() and tree_mask is None and q.shape[2] > MAX_ROW_INVARIANT_TREE:
            return _tree_attention_launch(q, k_cache, v_cache, prefix_len, None, key_valid, 1, False)
        return _tree_attention_launch(q, k_cache, v_cache, prefix_len, tree_mask, key_valid, None, row_invariant())
    if q.device.type == "cpu":  # no CUDA graph to keep whole: the host reads prefix_len and builds the mask
        T = q.shape[2]
        # (a tensor's value, read here, is checked as an int's: the GPU, which does not read it, masks instead)
        prefix = prefix_len if isinstance(prefix_len, int) else checked_prefix_len(
            "tree attention", int(prefix_len), q.device, T, k_cache.shape[2])
        k_cache, v_cache = k_cache[:, :, :prefix + T], v_cache[:, :, :prefix + T]  # [B, Hkv, prefix + T, D]
        if T == 1 and tree_mask is None and key_valid is None:
            return attend(q, k_cache, v_cache)  # one token sees every slot read
        if tree_mask is None:
            tree_mask = torch.ones(T, T, dtype=torch.bool).tril()
        mask = torch.cat([tree_mask.new_ones(T, prefix), tree_mask], 1)  # [T, prefix + T]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :prefix + T]  # [B, 1, T, prefix + T]
        return attend(q, k_cache, v_cache, mask)
    return tree_attention_reference(q, k_cache, v_cache, prefix_len, tree_mask, key_valid)


@triton.jit
def _query_row_offsets(bh, rows, T, D, GROUP: tl.constexpr):
    """[BLOCK_M] int64 offsets of query rows `rows` of (batch * kv head) `bh` in a contiguous [B, Hq, T, D]
    tensor: row r is token r // GROUP of query head bh * GROUP + r % GROUP (= b * Hq + the head in b)."""
    return ((bh * GROUP + rows % GROUP).to(tl.int64) * T + rows // GROUP) * D


@triton.jit
def _out_row_offsets(bh, rows, T, D, n_kv_heads, GROUP: tl.constexpr):
    """The same rows' offsets in the contiguous [B, T, Hq, D] output: written token-major, the output needs
    no transpose copy before the attention's output projection."""
    b, head = bh // n_kv_heads, (bh % n_kv_heads) * GROUP + rows % GROUP
    return ((b.to(tl.int64) * T + rows // GROUP) * (n_kv_heads * GROUP) + head) * D


@triton.jit
def _online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION: tl.constexpr):
    """Fold one key tile into the online softmax (m_i, l_i, acc) of its query rows: s [BLOCK_M, BLOCK_N] the
    tile's scores, masked (-inf where hidden) and scaled to log2 units; v [BLOCK_N, BLOCK_D] its values.
    A row that sees nothing of the tile keeps its state exactly: its max is unchanged, so alpha = exp2(0) = 1
    (or 0 while the max is still -inf, when l_i and acc are still 0) and every p = exp2(-inf) = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps max -inf; subtract 0 instead so that
    # exp2(-inf - -inf) never makes a NaN (its p and alpha are then exactly 0).
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)  # rescales what was accumulated under the old max
    p = tl.exp2(s - m_sub[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _read_prefix(prefix_len, PREFIX_IS_PTR: tl.constexpr, CACHE: tl.constexpr):
    """prefix_len, read on the device when it is a pointer (no host sync: graph-capturable). CACHE: the load's
    cache modifier (".cg": through the L2 only)."""
    if PREFIX_IS_PTR:
        prefix = tl.load(prefix_len, cache_modifier=CACHE).to(tl.int32)
    else:
        prefix = prefix_len
    return prefix


@triton.jit
def _program_setup(prefix_len, k_ptr, v_ptr, bh, n_kv_heads, T, S, stride_kb, stride_kh, stride_vb, stride_vh,
                  PREFIX_IS_PTR: tl.constexpr, CACHE: tl.constexpr):
    """What every attention program starts from: its batch row b, the prefix length (`_read_prefix`), kv_len (keys
    0 .. kv_len: the prefix and the tree) and the bases of its (batch row, KV head)'s K and V."""
    b, kv_head = bh // n_kv_heads, bh % n_kv_heads
    prefix = _read_prefix(prefix_len, PREFIX_IS_PTR, CACHE)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    return b, prefix, tl.minimum(prefix + T, S), k_base, v_base


@triton.jit
def _load_kv_tile(k_base, v_base, slots, d, d_ok, load_ok, stride_ks, stride_vs, EVEN_D: tl.constexpr,
                  UNMASKED: tl.constexpr):
    """K transposed [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D] at cache slots `slots` [BLOCK_N], zeros where
    not load_ok. UNMASKED (every key valid) with EVEN_D (the whole head_dim valid): plain loads. The compiler
    issues wide vector loads along head_dim as long as the mask is constant along it, as a per-key mask alone is
    (with EVEN_D); a head_dim mask against the runtime D would forbid them."""
    if EVEN_D and UNMASKED:
        k_t = tl.load(k_base + slots[None, :] * stride_ks + d[:, None])
        v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :])
    elif EVEN_D:
        k_t = tl.load(k_base + slots[None, :] * stride_ks + d[:, None], mask=load_ok[None, :], other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=load_ok[:, None], other=0.0)
    else:
        k_t = tl.load(k_base + slots[None, :] * stride_ks + d[:, None], mask=d_ok[:, None] & load_ok[None, :],
                      other=0.0)
        v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=load_ok[:, None] & d_ok[None, :],
                    other=0.0)
    return k_t, v


# ------------------------------------------------------------------------------------------ default mode

@triton.jit
def _attend_tile(q, m_i, l_i, acc, start, hi, prefix, b, t, d, d_ok, S, T, k_base, v_base, stride_ks, stride_vs,
                 tree_mask_ptr, key_valid_ptr, qk_scale, HAS_MASK: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
                 IN_PREFIX: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key tile start .. start + BLOCK_N (keys below hi) into the online softmax (m_i, l_i, acc) of the
    query rows q (row r is token t[r]).

    IN_PREFIX: the whole tile is cached prefix (visible to every row, below hi), so no key or tree mask is
    built and, with EVEN_D (D == BLOCK_D), K and V load unmasked: the compiler then issues wide vector loads,
    which a per-key mask against a runtime bound (a device prefix_len) would forbid.
    Otherwise query t sees tree slot prefix + j when tree_mask[t, j] (HAS_MASK), or when j <= t (causal).
    """
    keys = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] cache slots
    key_ok = tl.full([BLOCK_N], 1, tl.int1) if IN_PREFIX else keys < hi
    if HAS_KEY_VALID:  # hidden slots (a row's left padding) are neither seen nor even loaded
        key_ok &= tl.load(key_valid_ptr + b * S + keys, mask=key_ok, other=0) != 0
    k_t, v = _load_kv_tile(k_base, v_base, keys, d, d_ok, key_ok, stride_ks, stride_vs, EVEN_D,
                           IN_PREFIX and not HAS_KEY_VALID)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if IN_PREFIX:
        if HAS_KEY_VALID:
            s = tl.where(key_ok[None, :], s, float("-inf"))
    elif HAS_MASK:
        # Visible: every prefix slot, and tree slot prefix+j when tree_mask[t, j] (j < T since hi <= prefix+T).
        j = keys - prefix
        in_tree = tl.load(tree_mask_ptr + t[:, None] * T + j[None, :], mask=(key_ok & (j >= 0))[None, :], other=0)
        s = tl.where((key_ok & (j < 0))[None, :] | (in_tree != 0), s, float("-inf"))
    else:  # causal: query t sees the slots up to its own, prefix + t
        s = tl.where(key_ok[None, :] & ((keys - prefix)[None, :] <= t[:, None]), s, float("-inf"))
    s = s * qk_scale
    return _online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION)


@triton.jit
def _attend_keys(q, lo, mid, hi, prefix, b, t, d, d_ok, S, T, k_base, v_base, stride_ks, stride_vs, tree_mask_ptr,
                 key_valid_ptr, qk_scale, HAS_MASK: tl.constexpr, HAS_KEY_VALID: tl.constexpr, EVEN_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The online softmax of the query rows q over the key tiles lo .. hi -> (max, sum, unnormalised out).
    Tiles lo .. mid hold cached prefix only (the bulk of the keys): they take the mask-free path."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    for start in range(lo, mid, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, hi, prefix, b, t, d, d_ok, S, T, k_base, v_base,
                                     stride_ks, stride_vs, tree_mask_ptr, key_valid_ptr, qk_scale, HAS_MASK,
                                     HAS_KEY_VALID, True, EVEN_D, BLOCK_N, DOT_PRECISION)
    for start in range(mid, hi, BLOCK_N):  # the tile the prefix ends in, and the tree's own slots
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, start, hi, prefix, b, t, d, d_ok, S, T, k_base, v_base,
                                     stride_ks, stride_vs, tree_mask_ptr, key_valid_ptr, qk_scale, HAS_MASK,
                                     HAS_KEY_VALID, False, EVEN_D, BLOCK_N, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _store_partials(part_acc_ptr, part_m_ptr, part_l_ptr, bh, chunk, num_splits, n_rows, rows, d, D, ok, m_i, l_i,
                    acc):
    """Chunk `chunk`'s partials of query rows `rows` (where ok): [B * Hkv, num_splits, T * GROUP, (D)]."""
    part_rows = (bh * num_splits + chunk) * n_rows + rows
    tl.store(part_acc_ptr + part_rows.to(tl.int64)[:, None] * D + d[None, :], acc, mask=ok[:, None] & (d < D)[None, :])
    tl.store(part_m_ptr + part_rows, m_i, mask=ok)
    tl.store(part_l_ptr + part_rows, l_i, mask=ok)


@triton.jit
def _attend_chunk_kernel(
    q_ptr, k_ptr, v_ptr, tree_mask_ptr, key_valid_ptr, prefix_len, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    T, S, D, n_kv_heads, num_splits, qk_scale,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    GROUP: tl.constexpr, PREFIX_IS_PTR: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    WRITE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Program (pid, batch * kv head): query-row block pid % m_blocks against key chunk pid // m_blocks."""
    wait_for_previous_kernels(PDL)
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, prefix, kv_len, k_base, v_base = _program_setup(prefix_len, k_ptr, v_ptr, bh, n_kv_heads, T, S, stride_kb,
                                                      stride_kh, stride_vb, stride_vh, PREFIX_IS_PTR, "")
    n_rows = T * GROUP
    m_blocks = tl.cdiv(n_rows, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    pid_m, split = pid % m_blocks, pid // m_blocks
    # Whole tiles lo .. hi of the visible range, the split sized here from the real length, so that a grid
    # sized on the host from S still shares the work evenly; chunks past the end run no iteration and write
    # neutral partials (max -inf, sum 0).
    tiles_per_split = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), num_splits)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, kv_len)
    # (whole tiles below hi too: a device prefix past the cache, which no host check sees, must not make the mask-free
    # path read past S)
    mid = tl.maximum(lo, tl.minimum(hi // BLOCK_N * BLOCK_N, prefix // BLOCK_N * BLOCK_N))

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]: row r is token r // GROUP of head r % GROUP
    row_ok = rows < n_rows
    t = tl.minimum(rows // GROUP, T - 1)  # padding rows (never stored) repeat the last token's mask
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + _query_row_offsets(bh, rows, T, D, GROUP)[:, None] + d[None, :], mask=io_mask, other=0.0)
    m_i, l_i, acc = _attend_keys(q, lo, mid, hi, prefix, b, t, d, d_ok, S, T, k_base, v_base, stride_ks, stride_vs,
                                 tree_mask_ptr, key_valid_ptr, qk_scale, HAS_MASK, HAS_KEY_VALID, EVEN_D, BLOCK_M,
                                 BLOCK_N, BLOCK_D, DOT_PRECISION)

    if WRITE_OUT:  # a single chunk saw every key: finish here (a row that saw none has acc = 0: output 0)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out_offs = _out_row_offsets(bh, rows, T, D, n_kv_heads, GROUP)[:, None] + d[None, :]
        tl.store(out_ptr + out_offs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        _store_partials(part_acc_ptr, part_m_ptr, part_l_ptr, bh, split, num_splits, n_rows, rows, d, D, row_ok,
                        m_i, l_i, acc)


@triton.jit
def _fold_partial(num, den, m, l, acc, m_max):
    """Add one partial (max m, sum l, unnormalised out acc) of some rows to a merge's sums over their partials:
    w = exp2(m - m_max), den += w * l, num += w * acc. A partial with m = -inf adds exact zeros."""
    w = tl.exp2(m - m_max)
    return num + w[:, None] * acc, den + w * l


@triton.jit
def _load_partials(part_acc_ptr, part_m_ptr, part_l_ptr, part, ok, d, D):
    """The stored partials at rows `part` (any shape P, where ok): max m and sum l [P], out acc [P, BLOCK_D]
    (-inf, 0 and 0 elsewhere, so that a partial not read adds exact zeros to a merge)."""
    m = tl.load(part_m_ptr + part, mask=ok, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=ok, other=0.0)
    acc = tl.load(part_acc_ptr + tl.expand_dims(part.to(tl.int64), -1) * D + d,
                  mask=tl.expand_dims(ok, -1) & (d < D), other=0.0)
    return m, l, acc


@triton.jit
def _add_partial(num, den, part_acc_ptr, part_m_ptr, part_l_ptr, part, use, m_max, d, D):
    """`_fold_partial` of the stored partials at rows `part` (where use; elsewhere m = -inf: exact zeros)."""
    m, l, acc = _load_partials(part_acc_ptr, part_m_ptr, part_l_ptr, part, use, d, D)
    return _fold_partial(num, den, m, l, acc, m_max)


@triton.jit
def _combine_chunks_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, T, D, n_kv_heads, num_splits,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """One (query-row block, batch * kv head): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp2(m_s - max m),
    the chunks merged in order."""
    wait_for_previous_kernels(PDL)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    n_rows = T * GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (d < D)[None, :]
    first = bh * num_splits * n_rows + rows  # [BLOCK_M] partial row of chunk 0; chunk s is s * n_rows further

    # Padding rows (never stored) read m = 0 here and weigh 0 below (their den 0 becomes 1: no 0 / 0).
    m_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + first + s * n_rows, mask=row_ok, other=0.0))
    # Empty chunks have m = -inf and weigh exactly 0. A row with no visible key in any chunk keeps
    # m_max = -inf: subtract 0 instead, so every weight is 0 and its output 0, as in the reference.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    num = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    for s in range(num_splits):
        num, den = _add_partial(num, den, part_acc_ptr, part_m_ptr, part_l_ptr, first + s * n_rows, row_ok, m_max,
                                d, D)

    den = tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + _out_row_offsets(bh, rows, T, D, n_kv_heads, GROUP)[:, None] + d[None, :],
             (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)


# ------------------------------------------------------------------------------------ row-invariant mode

@triton.jit
def _ri_tail_start(end, TAIL_GRAIN: tl.constexpr):
    """B_p of a row whose logical keys are 0 .. end (exclusive), p = end - 1 its own position: the first key of
    its tail, max(p // TAIL_GRAIN - 1, 0) * TAIL_GRAIN, so that the tail B_p .. p holds at most 2 * TAIL_GRAIN
    keys. Its body is keys 0 .. B_p."""
    return tl.maximum(tl.maximum(end - 1, 0) // TAIL_GRAIN - 1, 0) * TAIL_GRAIN


@triton.jit
def _ri_chunk_keys(body_end, BLOCK_N: tl.constexpr, BODY_CHUNKS: tl.constexpr, CHUNK_TILES: tl.constexpr):
    """The length of a row's body chunks, from the end of its body B_p alone: its BLOCK_N-key tiles shared out over
    BODY_CHUNKS chunks (whole tiles each, at least one), at most CHUNK_TILES tiles. So a body up to BODY_CHUNKS *
    CHUNK_TILES tiles long is cut into about BODY_CHUNKS programs, a longer one into chunks of CHUNK_TILES tiles, and a
    decode at p and a tree node at p cut theirs alike. BODY_CHUNKS = 0: always CHUNK_TILES tiles (fixed chunks, one
    length for every row)."""
    if BODY_CHUNKS == 0:
        return body_end * 0 + CHUNK_TILES * BLOCK_N
    return tl.minimum(tl.maximum(tl.cdiv(tl.cdiv(body_end, BLOCK_N), BODY_CHUNKS), 1), CHUNK_TILES) * BLOCK_N


@triton.jit
def _ri_row_ends(prefix, kv_len, t, load_ok, tree_mask_ptr, T, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
                 CACHE: tl.constexpr):
    """Query rows of tokens t [BLOCK_M] -> end [BLOCK_M]: a row's logical keys are 0 .. end (its prefix, its
    ancestors in depth order, itself last). (Mask rows are read where load_ok, with cache modifier CACHE.)"""
    if HAS_MASK:
        jj = tl.arange(0, BLOCK_T)
        mask_rows = tl.load(tree_mask_ptr + t[:, None] * T + jj[None, :], mask=load_ok[:, None] & (jj < T)[None, :],
                            other=0, cache_modifier=CACHE)
        count = tl.sum(mask_rows.to(tl.int32), 1)  # depth + 1
    else:  # causal: token t sees tree slots 0 .. t
        count = t + 1
    return tl.minimum(prefix + count, kv_len)


@triton.jit
def _ri_body(q, lo, hi, row_hi, b, d, d_ok, S, k_base, v_base, stride_ks, stride_vs, key_valid_ptr, qk_scale,
             HAS_KEY_VALID: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A body chunk's online softmax -> (max, sum, unnormalised out) of the query rows q: key tiles lo .. hi (lo a
    multiple of BLOCK_N, hi of TAIL_GRAIN: a B_p may cut the last tile), cache slots as they are, row r seeing
    the keys below row_hi[r]. One loop for every tile: the visibility is a runtime select on the scores before
    they are scaled, so every tile rounds alike in every call, and a tile a row sees nothing of leaves its state
    exactly as it was (see _online_softmax_step)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] cache slots
        load_ok = keys < hi
        if HAS_KEY_VALID:  # hidden slots (a row's left padding) are neither seen nor even loaded
            load_ok &= tl.load(key_valid_ptr + b * S + keys, mask=load_ok, other=0) != 0
        k_t, v = _load_kv_tile(k_base, v_base, keys, d, d_ok, load_ok, stride_ks, stride_vs, EVEN_D, False)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        s = tl.where(load_ok[None, :] & (keys[None, :] < row_hi[:, None]), s, float("-inf"))  # mask, then scale
        s = s * qk_scale
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _ri_tail(q, lo, end, prefix, ancestors, b, d, d_ok, S, k_base, v_base, stride_ks, stride_vs, key_valid_ptr,
             qk_scale, GATHER: tl.constexpr, HAS_KEY_VALID: tl.constexpr, TAIL_N: tl.constexpr, CACHE: tl.constexpr):
    """One token's tail -> (max, sum, unnormalised out) of its query rows q [TAIL_M, BLOCK_D] (float32): its
    logical keys lo .. end (at most TAIL_N), one tile, key x in column x - lo whatever the call.
    GATHER (a tree): logical key x is slot x below prefix and slot prefix + a_(x - prefix) above, a_k the token's
    depth-k ancestor, the (k+1)-th set bit of its mask row: `ancestors` is the row's running count, so a_k = the
    number of entries whose count is <= k. Without: the slots as they are (causal calls). CACHE: the loads' cache
    modifier. Computed on CUDA cores, as products summed over a fixed tile (no tensor-core tile of 16 rows, which would
    hold one useful row per program for a model without grouped queries and keep the tail programs' registers,
    and so how many share an SM, at those 16 rows)."""
    keys = lo + tl.arange(0, TAIL_N)  # [TAIL_N] logical key positions
    load_ok = keys < end
    slots = keys
    if GATHER:
        rel = keys - prefix
        a_k = tl.sum((ancestors[None, :] <= rel[:, None]).to(tl.int32), 1)  # [TAIL_N]
        # (clamped: only a tree past the cache's end, which the caller cannot have written, would reach S)
        slots = tl.minimum(tl.where(rel < 0, keys, prefix + a_k), S - 1)
    if HAS_KEY_VALID:
        load_ok &= tl.load(key_valid_ptr + b * S + slots, mask=load_ok, other=0, cache_modifier=CACHE) != 0
    kv_ok = load_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + slots[:, None] * stride_ks + d[None, :], mask=kv_ok, other=0.0,
                cache_modifier=CACHE).to(tl.float32)  # [TAIL_N, BLOCK_D]
    v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=kv_ok, other=0.0,
                cache_modifier=CACHE).to(tl.float32)
    s = tl.sum(q[:, None, :] * k[None, :, :], 2)  # [TAIL_M, TAIL_N]
    s = tl.where(load_ok[None, :], s, float("-inf"))  # mask, then scale
    s = s * qk_scale
    # The online softmax step of `_online_softmax_step` from an empty state, with the values' sum on CUDA cores
    # (and p kept in float32, where the bodies' tensor cores take it rounded to the values' dtype).
    m_i = tl.max(s, 1)
    m_sub = tl.where(m_i == float("-inf"), 0.0, m_i)  # a row that sees no key: every p = 0, not NaN
    p = tl.exp2(s - m_sub[:, None])  # [TAIL_M, TAIL_N]
    return m_i, tl.sum(p, 1), tl.sum(p[:, :, None] * v[None, :, :], 1)  # [TAIL_M], [TAIL_M], [TAIL_M, BLOCK_D]


@triton.jit
def _ri_bodies_kernel(
    q_ptr, k_ptr, v_ptr, tree_mask_ptr, key_valid_ptr, prefix_len, part_acc_ptr, part_m_ptr, part_l_ptr,
    T, S, D, n_kv_heads, n_body, qk_scale,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    GROUP: tl.constexpr, PREFIX_IS_PTR: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    BODY_CHUNKS: tl.constexpr, CHUNK_TILES: tl.constexpr, TAIL_GRAIN: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Program (pid, batch * kv head): body chunk c = pid // m_blocks % n_body (keys c * L .. (c + 1) * L of a row, L
    its `_ri_chunk_keys`, cut at its B_p) of query-row block pid % m_blocks, for the rows of it that have one and
    whose L is the call's shortest plus pid // (m_blocks * n_body) tiles (bodies are cached prefix, the same slots
    for every row) -> partials [B * Hkv, n_body, T * GROUP, (D)], slot c. The rows of a call have one L but where
    they straddle a change of L; a row of a longer L then gets its chunk from a program of its own, not from a
    union of ranges masked row by row in one loop (which cost a 7B's tree bodies 51 more registers and serialised
    their wgmma: compiled for sm_90).

    A tree step launches programs for lengths its rows may have, and most have none. Which rows a program serves
    depends only on the prefix and the mask, which kernels before the previous one wrote (complete once that one
    let this kernel launch, as for `_ri_tails_kernel`): read through the L2 before the wait, they let a program
    with no rows end at once, before it waits, rather than hold an SM's place behind the busy ones (measured once,
    on the default model's shape with 4 chunks: a 64-node tree step at a prefix of 1,024 took 0.879 ms, against
    0.897 ms with every program waiting).
    One program always waits: a bodies kernel whose programs all ended early (a prefix below 16, say) would
    otherwise end before the kernels it follows, and the tails, which read q, K and V before their own wait,
    would race those kernels' writes. Fixed chunks (BODY_CHUNKS = 0) have one length, so no idle length programs:
    their programs wait first and compute (nothing, for a chunk past the rows' bodies): compiled for sm_90 at a
    group of 4 and head_dim 128, 168 registers that way and 240 with the early end.
    The early reads assume the mask is the caller's own tensor, not a copy the wrapper launches just before."""
    EARLY_END: tl.constexpr = BODY_CHUNKS > 0
    CACHE: tl.constexpr = ".cg" if PDL and EARLY_END else ""
    if not EARLY_END:
        wait_for_previous_kernels(PDL)
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, prefix, kv_len, k_base, v_base = _program_setup(prefix_len, k_ptr, v_ptr, bh, n_kv_heads, T, S, stride_kb,
                                                      stride_kh, stride_vb, stride_vh, PREFIX_IS_PTR, CACHE)
    n_rows = T * GROUP
    m_blocks = tl.cdiv(n_rows, BLOCK_M)
    pid_m, c = pid % m_blocks, pid // m_blocks
    length_step = 0
    if EARLY_END:  # programs for n_lengths lengths: pid = (length_step * n_body + c) * m_blocks + pid_m
        length_step = c // n_body
        c = c % n_body
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]: row r is token r // GROUP of head r % GROUP
    row_ok = rows < n_rows
    t = tl.minimum(rows // GROUP, T - 1)  # padding rows (never stored) repeat the last token
    tail_lo = _ri_tail_start(_ri_row_ends(prefix, kv_len, t, row_ok, tree_mask_ptr, T, HAS_MASK, BLOCK_T, CACHE),
                             TAIL_GRAIN)
    # This program's chunk length: the shortest a row of the call can have, from the prefix alone (a causal row
    # sees at least one new key, a mask row maybe none), length_step tiles longer. Its rows: those whose chunks are
    # that long and have a chunk c.
    first_end = prefix if HAS_MASK else prefix + 1
    length = _ri_chunk_keys(_ri_tail_start(tl.minimum(first_end, kv_len), TAIL_GRAIN), BLOCK_N, BODY_CHUNKS,
                            CHUNK_TILES)
    length += length_step * BLOCK_N
    lo = c * length
    mine = row_ok & (_ri_chunk_keys(tail_lo, BLOCK_N, BODY_CHUNKS, CHUNK_TILES) == length) & (lo < tail_lo)
    has_rows = True  # fixed chunks: every program computes (a chunk past its rows' bodies, nothing)
    if EARLY_END:
        has_rows = tl.max(mine.to(tl.int32), 0) > 0
        if has_rows | ((pid == 0) & (bh == 0)):
            wait_for_previous_kernels(PDL)
    if has_rows:
        row_hi = tl.where(mine, tl.minimum(tail_lo, lo + length), 0)
        q = tl.load(q_ptr + _query_row_offsets(bh, rows, T, D, GROUP)[:, None] + d[None, :],
                    mask=mine[:, None] & d_ok[None, :], other=0.0)
        m_i, l_i, acc = _ri_body(q, lo, tl.max(row_hi, 0), row_hi, b, d, d_ok, S, k_base, v_base, stride_ks,
                                 stride_vs, key_valid_ptr, qk_scale, HAS_KEY_VALID, EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D,
                                 DOT_PRECISION)
        _store_partials(part_acc_ptr, part_m_ptr, part_l_ptr, bh, c, n_body, n_rows, rows, d, D, mine, m_i, l_i, acc)


@triton.jit
def _ri_chunk_rows(first, c0, limit, chunk_stride, row_ok, MERGE_CHUNKS: tl.constexpr):
    """The partial rows of body chunks c0 .. c0 + MERGE_CHUNKS of a tail's rows (`first`: chunk 0's; chunk c is
    c * chunk_stride further) [MERGE_CHUNKS, TAIL_M], and where they are to be read: c < limit, row_ok."""
    c = c0 + tl.arange(0, MERGE_CHUNKS)
    return first[None, :] + c[:, None] * chunk_stride, (c < limit)[:, None] & row_ok[None, :]


@triton.jit
def _ri_fold_chunks(num, den, m, l, acc, m_max):
    """`_fold_partial` of chunk partials m, l [C, TAIL_M], acc [C, TAIL_M, BLOCK_D] (as `_load_partials` reads
    them: a chunk not read has m = -inf and adds exact zeros): den += sum_c w_c l_c, num += sum_c w_c acc_c,
    w_c = exp2(m_c - m_max), each sum one reduction over a tile of fixed shape, so one fixed order in every call."""
    w = tl.exp2(m - m_max[None, :])
    return num + tl.sum(w[:, :, None] * acc, 0), den + tl.sum(w * l, 0)


@triton.jit
def _ri_tails_kernel(
    q_ptr, k_ptr, v_ptr, tree_mask_ptr, key_valid_ptr, prefix_len, part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr,
    T, S, D, n_kv_heads, n_body, qk_scale,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    GROUP: tl.constexpr, PREFIX_IS_PTR: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
    BODY_CHUNKS: tl.constexpr, CHUNK_TILES: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_GRAIN: tl.constexpr,
    BLOCK_T: tl.constexpr, TAIL_M: tl.constexpr,
    MERGE_CHUNKS: tl.constexpr, BLOCK_D: tl.constexpr, TAIL_BEFORE_WAIT: tl.constexpr, PDL: tl.constexpr,
):
    """Program (token, batch * kv head): the token's tail, its GROUP query rows in a TAIL_M-row tile (the rest
    idle: the same tile in every call), then its rows' merge of the body chunks' partials, MERGE_CHUNKS at a
    time, and the tail's; writes the output rows.

    TAIL_BEFORE_WAIT (under PDL, launched right after the bodies kernel): the tail needs nothing the bodies
    write, only what the kernels before them did (q, the cache, the mask), and the bodies kernel let this one
    launch only once those had completed. So the tail is computed while the bodies still run, and only the merge
    waits for them. Those early reads go through the L2 only (".cg"), never an SM's L1, which may hold what the
    same addresses held before (kernels/compile_check.py checks that nothing else comes before the wait)."""
    if not TAIL_BEFORE_WAIT:
        wait_for_previous_kernels(PDL)
    CACHE: tl.constexpr = ".cg" if TAIL_BEFORE_WAIT else ""
    tok, bh = tl.program_id(0), tl.program_id(1)
    b, prefix, kv_len, k_base, v_base = _program_setup(prefix_len, k_ptr, v_ptr, bh, n_kv_heads, T, S, stride_kb,
                                                      stride_kh, stride_vb, stride_vh, PREFIX_IS_PTR, CACHE)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    r = tl.arange(0, TAIL_M)
    rows = tok * GROUP + r
    row_ok = r < GROUP
    if HAS_MASK:
        jj = tl.arange(0, BLOCK_T)
        mask_row = tl.load(tree_mask_ptr + tok * T + jj, mask=jj < T, other=0,
                           cache_modifier=CACHE).to(tl.int32)  # [BLOCK_T]
        count = tl.sum(mask_row, 0)  # depth + 1
        ancestors = tl.cumsum(mask_row, 0)
    else:  # causal: tree slots 0 .. tok, as they are
        count = tok + 1
        ancestors = tl.zeros([BLOCK_T], tl.int32)  # (not read)
    end = tl.minimum(prefix + count, kv_len)
    tail_lo = _ri_tail_start(end, TAIL_GRAIN)
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + _query_row_offsets(bh, rows, T, D, GROUP)[:, None] + d[None, :], mask=io_mask, other=0.0,
                cache_modifier=CACHE)
    m_t, l_t, acc_t = _ri_tail(q.to(tl.float32), tail_lo, end, prefix, ancestors, b, d, d_ok, S, k_base, v_base,
                               stride_ks, stride_vs, key_valid_ptr, qk_scale, HAS_MASK, HAS_KEY_VALID, 2 * TAIL_GRAIN,
                               CACHE)
    if HAS_MASK:
        # A node whose ancestors lie apart, deeper than the mode takes (_check_row_invariant_depth refuses such trees,
        # whichever entry point, where it can read the mask on the host; not inside a CUDA graph capture): its body
        # would hold tree slots.
        # A NaN row, not a silently wrong one. (A contiguous row's body holds its own keys.)
        apart = tl.max(tl.where(mask_row != 0, jj, -1), 0) != count - 1
        m_t = tl.where(apart & (count > TAIL_GRAIN), float("nan"), m_t)

    if TAIL_BEFORE_WAIT:
        wait_for_previous_kernels(PDL)  # the bodies' partials, from here on
    # its body chunks (B_p a multiple of TAIL_GRAIN: none empty)
    n_chunks = tl.cdiv(tail_lo, _ri_chunk_keys(tail_lo, BLOCK_N, BODY_CHUNKS, CHUNK_TILES))
    first = bh * n_body * (T * GROUP) + rows  # [TAIL_M] its rows' partials of chunk 0 (chunk c: c * T * GROUP on)
    # The first MERGE_CHUNKS chunks' partials in one read (every body of at most MERGE_CHUNKS chunks).
    part, ok = _ri_chunk_rows(first, 0, n_chunks, T * GROUP, row_ok, MERGE_CHUNKS)
    m_c, l_c, acc_c = _load_partials(part_acc_ptr, part_m_ptr, part_l_ptr, part, ok, d, D)
    m_max = tl.maximum(m_t, tl.max(m_c, 0))
    for c0 in range(MERGE_CHUNKS, n_chunks, MERGE_CHUNKS):  # more chunks than that: more groups
        part, ok = _ri_chunk_rows(first, c0, n_chunks, T * GROUP, row_ok, MERGE_CHUNKS)
        m_max = tl.maximum(m_max, tl.max(tl.load(part_m_ptr + part, mask=ok, other=float("-inf")), 0))
    # A row with no visible key keeps m_max = -inf: subtract 0 instead, so every weight is 0 and its output 0.
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    num, den = _ri_fold_chunks(tl.zeros([TAIL_M, BLOCK_D], tl.float32), tl.zeros([TAIL_M], tl.float32), m_c, l_c,
                               acc_c, m_max)
    for c0 in range(MERGE_CHUNKS, n_chunks, MERGE_CHUNKS):
        part, ok = _ri_chunk_rows(first, c0, n_chunks, T * GROUP, row_ok, MERGE_CHUNKS)
        m_c, l_c, acc_c = _load_partials(part_acc_ptr, part_m_ptr, part_l_ptr, part, ok, d, D)
        num, den = _ri_fold_chunks(num, den, m_c, l_c, acc_c, m_max)
    num, den = _fold_partial(num, den, m_t, l_t, acc_t, m_max)
    den = tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + _out_row_offsets(bh, rows, T, D, n_kv_heads, GROUP)[:, None] + d[None, :],
             (num / den[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)


MAX_SPLITS = 64


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a few chunks, so split-K is exercised there too


def _num_splits(n_programs: int, n_rows: int, max_keys: int, block_n: int, device: torch.device) -> int:
    """Flash-decoding heuristic, read off the split sweep of bench/tree_attention.py (bench/RESULTS.md):
    about one program per SM (the power of two at or below SMs / programs), and chunks of at least 4
    key tiles, 8 when a program holds 16 or more query rows (a tree). Splitting more loses: the merge
    reads back splits x rows x head_dim fp32 partials, which for a 64-node tree outweighs the wider
    grid, and short chunks leave the software pipeline too short to hide memory latency."""
    per_sm = _sm_count(device) // max(n_programs, 1)
    wanted = 1 << (per_sm.bit_length() - 1) if per_sm else 1
    min_tiles = 8 if n_rows >= 16 else 4
    return max(1, min(wanted, triton.cdiv(triton.cdiv(max_keys, block_n), min_tiles), MAX_SPLITS))


def _tile_config(n_rows: int, D: int, dtype: torch.dtype, on_gpu: bool,
                 row_invariant: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). tl.dot needs every tile side >= 16; the limits below
    were read off sm_90 compiles (registers, spills, shared memory), and only the row-invariant mode's warps
    tuned by timing. In the
    row-invariant mode BLOCK_M is the most the dtype allows whatever the row count, so that every call
    runs the same tile shapes (and so the same dot instructions)."""
    block_d = max(16, triton.next_power_of_2(D))
    if not on_gpu:  # the interpreter runs numpy per program: small tiles keep tests quick and still tile
        return 16, 16, block_d, 4
    # fp32 dots run without tensor cores and spill past 16 rows; 64 rows suit 16-bit inputs.
    max_m = 16 if dtype == torch.float32 else 64
    block_m = max_m if row_invariant else min(max(16, triton.next_power_of_2(n_rows)), max_m)
    # Three pipeline stages of K and V tiles must fit in shared memory (four: `_body_stages`).
    block_n = 64 if block_d * dtype.itemsize <= 256 else 32
    # 4 warps spill from 64 x 128 accumulators up, but not in the row-invariant mode's bodies: their one loop (no
    # second, masked loop as in the default mode) fits (204 registers), and ran a 7B's decode and 64-node tree
    # steps 2-3% faster than with 8 warps.
    num_warps = 8 if block_m * block_d >= 64 * 128 and not row_invariant else 4
    return block_m, block_n, block_d, num_warps


class BodyChunks(NamedTuple):
    """How the row-invariant mode cuts a row's body into chunks (`_ri_chunk_keys`): a function of the model's shape,
    never of T; the chunks' length then follows the body's."""
    count: int  # chunks of a body up to count * max_tiles tiles (of BLOCK_N keys); 0: fixed chunks of max_tiles
    max_tiles: int  # tiles of a chunk at most: longer bodies take more chunks


def body_chunks(on_gpu: bool, n_kv_heads: int) -> BodyChunks:
    """The row-invariant mode's `BodyChunks` for a model of n_kv_heads KV heads. On a GPU, read off `python -m
    bench.body_chunks` on an H200 (bench/RESULTS.md, 2026-12-03; graphed decode and 64-node tree steps, prefixes
    300 to 4,000): 4 chunks of at most 8 tiles for a 7B's 32 KV heads (against fixed 8-tile chunks, decode 2.7%
    faster at prefixes 300 and 1,024, the tree step 1.4% and 2.6%; level at 4,000, where the chunks are the same),
    8 of at most 8 for 8 to 16 (Llama-3 8B: decode 0.7% and 1.9% faster at 300 and 1,024; 4 or 16 chunks were
    slower), fixed 4-tile chunks for fewer (SmolLM2-135M: a count cost its tree step 2.5%, a second set of length
    programs on every tree step; fixed chunks keep it level with the code before counts). In the interpreter
    (tiles of 16 keys) 4 chunks of at most 2 tiles, so that the tests' short sequences span several chunks, both
    lengths and more chunks than a tail merges at once."""
    if not on_gpu:
        return BodyChunks(4, 2)
    if n_kv_heads < 8:
        return BodyChunks(0, 4)
    return BodyChunks(8 if n_kv_heads <= 16 else 4, 8)


def _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, key_valid):
    """What every path refuses alike (the dispatcher's, whichever it takes, and `tree_attention_triton`'s) ->
    prefix_len as the kernels take it (`checked_prefix_len`)."""
    if q.dim() != 4 or k_cache.dim() != 4:
        raise KernelInputError(f"tree attention takes q [B, Hq, T, D] and caches [B, Hkv, S, D], not {tuple(q.shape)} "
                               f"and {tuple(k_cache.shape)}; pass the queries head-major, 4-D.")
    B, Hq, T, D = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise KernelInputError(f"tree attention got caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} for "
                               f"queries {tuple(q.shape)}; pass caches shaped [B, Hkv, S, D] matching q.")
    if Hq % k_cache.shape[1]:
        raise KernelInputError(f"tree attention needs the {Hq} query heads to be a multiple of the "
                               f"{k_cache.shape[1]} KV heads; check num_key_value_heads in the config.")
    if tree_mask is not None and (tree_mask.shape != (T, T) or tree_mask.dtype != torch.bool):
        raise KernelInputError(f"tree attention needs a bool tree_mask of shape ({T}, {T}) (or None: causal); "
                               f"got {tree_mask.dtype} {tuple(tree_mask.shape)}.")
    if not q.is_floating_point() or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise KernelInputError(f"tree attention needs q and the caches in one floating-point dtype, got q {q.dtype}, "
                               f"k {k_cache.dtype} and v {v_cache.dtype}; cast the cache to the model dtype.")
    S = k_cache.shape[2]
    if key_valid is not None and (key_valid.shape != (B, S) or key_valid.dtype != torch.bool):
        raise KernelInputError(f"tree attention needs key_valid as a bool [B, S] = ({B}, {S}) tensor; "
                               f"got {key_valid.dtype} {tuple(key_valid.shape)}.")
    return checked_prefix_len("tree attention", prefix_len, q.device, T, S)


def split_heuristic(q, k_cache, prefix_len) -> int:
    """The number of key chunks `tree_attention_triton` cuts the keys into when not told otherwise."""
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    n_rows = T * (Hq // Hkv)
    block_m, block_n, _, _ = _tile_config(n_rows, D, q.dtype, q.is_cuda)
    # With a device prefix_len the host cannot know the length: size the grid on the cache length S.
    max_keys = S if isinstance(prefix_len, torch.Tensor) else min(prefix_len + T, S)
    return _num_splits(triton.cdiv(n_rows, block_m) * B * Hkv, n_rows, max_keys, block_n, q.device)


# The row-invariant mode's tail programs read a whole mask row (and compare it with every key of a tile): trees
# up to this many nodes. Causal calls (tree_mask None) take any T.
MAX_ROW_INVARIANT_TREE = 256
# The row-invariant mode's tails start at multiples of this many keys and hold at most twice as many, in a tile
# of 2 * TAIL_GRAIN keys. Small, so that the per-token tail programs are cheap
# (8 rather than 16 halves the keys every tree node gathers: 2% off a 7B's 64-node tree step), and above the
# depth of a Medusa tree (a node whose ancestors lie apart must be shallower than TAIL_GRAIN).
TAIL_GRAIN = 8
# A row-invariant tail merges its body chunks' partials this many at a time (`_ri_tails_kernel`): one read for every
# body of at most MERGE_CHUNKS chunks.
MERGE_CHUNKS = 8


def _body_stages(group: int) -> int:
    """Software-pipeline depth of a row-invariant bodies program's key loop (K and V tiles in flight): 4 for a model
    without grouped queries, Triton's default 3 otherwise. Measured on H200s (bench/RESULTS.md, twenty-first run;
    graphed steps at a prefix of 1,024): a 7B's decode step 0.9-1.1% and 64-node tree step 0.1-0.3% shorter with 4,
    while 4 stages cost a Llama-3-8B-shaped tree step 2.8% and left SmolLM2-135M's steps level; 5 gained the 7B less
    than 4. At head_dim 128 a program then takes 144 KB of shared memory, not 112 (compiled for sm_90), so one fits
    an SM, not two: a 7B's decode runs about one program an SM anyway, while the 8B's tree step (a group of 4: four
    times the programs of its decode step) then takes two waves. Only the 7B among the models without grouped
    queries was measured. The stage count only pipelines the loads: the sums, and so the bits, stay the same."""
    return 4 if group == 1 else 3


def _tail_warps(tail_m: int, block_d: int) -> int:
    """Warps of a row-invariant tail program: one per 2,048 elements of its [TAIL_M, 2 * TAIL_GRAIN, BLOCK_D]
    products, which it holds in registers (a 7B without grouped queries: one warp, 128 registers a thread; groups
    of 4 and 8 at head_dim 128: 4 and 8 warps, 166 and 161 registers), at most 8 (a group of 16: 254 registers,
    no spill). A function of the model's shape only: every call of a model runs the same tail program, so its
    sums reduce alike. (For a group of 4 at head_dim 128 these programs are bigger than the tensor-core tails before
    them, one warp of 219 registers, and measured slower: a Llama-3-8B-shaped 64-node tree step 6.01 ms against
    5.74 on an H200, bench/RESULTS.md; for the 7B and the default model's shape they are the faster ones.)"""
    return max(1, min(8, tail_m * 2 * TAIL_GRAIN * block_d // 2048))


def _tail_start(end: int) -> int:
    """The row-invariant mode's B_p (see `_ri_tail_start`) for a row whose logical keys are 0 .. end."""
    return max(max(end - 1, 0) // TAIL_GRAIN - 1, 0) * TAIL_GRAIN


def _check_row_invariant_depth(tree_mask: torch.Tensor) -> None:
    """The row-invariant mode gathers only the tail (at most 2 * TAIL_GRAIN keys) of a node whose ancestors lie
    apart, so such a node must be shallower than TAIL_GRAIN (its body, keys 0 .. B_p, then holds cached prefix
    only). A tree of at most TAIL_GRAIN nodes always is; a bigger one is read back (a host sync) once per mask
    tensor and version unless a CUDA graph is being captured, where the kernel instead gives a too-deep node a
    NaN row (as it does for a mask rewritten in place under inference mode, which keeps no version).
    Contiguous rows (a causal mask, the tree's first-child chain) have no limit."""
    T = tree_mask.shape[0]
    if T <= TAIL_GRAIN or tree_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    stamp = None if tree_mask.is_inference() else tree_mask._version
    if getattr(tree_mask, "_row_invariant_depth_checked", ()) == (stamp,):
        return
    count = tree_mask.sum(1)  # depth + 1
    contiguous = (tree_mask == (torch.arange(T, device=tree_mask.device) < count[:, None])).all(1)
    deepest = int(torch.where(contiguous, 0, count).max()) - 1
    if deepest >= TAIL_GRAIN:
        raise KernelInputError(
            f"row-invariant tree attention takes tree nodes of depth below {TAIL_GRAIN} where the node's "
            f"ancestors are not tree slots 0 .. depth; this tree has one at depth {deepest}. Use a shallower tree "
            f"(fewer Medusa heads) or run without the row-invariant mode (--no-exact).")
    tree_mask._row_invariant_depth_checked = (stamp,)  # a step's mask is read back once, not once per layer


def tree_attention_triton(q, k_cache, v_cache, prefix_len, tree_mask, key_valid=None, *,
                          num_splits: int | None = None, row_invariant: bool = False):
    """Same contract as tree_attention_reference. `num_splits` overrides the split-K heuristic (tests, tuning).
    `row_invariant`: compute each query row exactly as a one-token call over its own keys would (see the
    module docstring); its chunks are fixed, so `num_splits` does not apply."""
    prefix_len = _check_inputs(q, k_cache, v_cache, prefix_len, tree_mask, key_valid)
    return _tree_attention_launch(q, k_cache, v_cache, prefix_len, tree_mask, key_valid, num_splits, row_invariant)


def _tree_attention_launch(q, k_cache, v_cache, prefix_len, tree_mask, key_valid, num_splits, row_invariant):
    """`tree_attention_triton` of checked inputs."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:  # (the torch path takes any layout)
        raise KernelInputError("tree attention needs caches contiguous along head_dim; allocate them contiguous.")
    if row_invariant:
        if num_splits is not None:
            raise KernelInputError("tree attention's row-invariant mode has fixed key chunks; drop num_splits.")
        return _tree_attention_row_invariant(q, k_cache, v_cache, prefix_len, tree_mask, key_valid)
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    n_rows = T * group  # query rows per KV head
    q = q.contiguous()
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    has_mask = tree_mask is not None
    if has_mask:
        tree_mask = tree_mask.contiguous().view(torch.uint8)  # same bytes; loads as 0/1 integers
    has_key_valid = key_valid is not None
    key_valid = key_valid.contiguous().view(torch.uint8) if has_key_valid else q  # (never read if None)
    prefix_is_ptr = isinstance(prefix_len, torch.Tensor)

    block_m, block_n, block_d, num_warps = _tile_config(n_rows, D, q.dtype, q.is_cuda)
    m_blocks = triton.cdiv(n_rows, block_m)
    if num_splits is None:
        num_splits = split_heuristic(q, k_cache, prefix_len)
    write_out = num_splits == 1
    if write_out:  # the kernel writes `out` directly and never touches the partials
        part_acc = part_m = part_l = out
    else:
        part_acc = torch.empty(B * Hkv, num_splits, n_rows, D, device=q.device, dtype=torch.float32)
        part_m = torch.empty(B * Hkv, num_splits, n_rows, device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)

    _attend_chunk_kernel[(m_blocks * num_splits, B * Hkv)](
        q, k_cache, v_cache, tree_mask if has_mask else q, key_valid, prefix_len, out, part_acc, part_m, part_l,
        T, S, D, Hkv, num_splits, math.log2(math.e) / math.sqrt(D),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group, PREFIX_IS_PTR=prefix_is_ptr, HAS_MASK=has_mask, HAS_KEY_VALID=has_key_valid,
        WRITE_OUT=write_out, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == D,
        # fp32 inputs must not be rounded to tf32 by tl.dot; 16-bit inputs ignore this setting.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, **launch_options(q),
    )
    if not write_out:
        _combine_chunks_kernel[(m_blocks, B * Hkv)](
            part_acc, part_m, part_l, out, T, D, Hkv, num_splits,
            GROUP=group, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps, **launch_options(q),
        )
    return out


def _tree_attention_row_invariant(q, k_cache, v_cache, prefix_len, tree_mask, key_valid):
    """`tree_attention_triton(..., row_invariant=True)`: the body chunks, then each token's tail and merge (see
    the module docstring)."""
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    n_rows = T * group  # query rows per KV head
    block_m, block_n, block_d, num_warps = _tile_config(n_rows, D, q.dtype, q.is_cuda, row_invariant=True)
    m_blocks = triton.cdiv(n_rows, block_m)
    chunks = body_chunks(q.is_cuda, Hkv)
    has_mask = tree_mask is not None
    if has_mask:
        if T > MAX_ROW_INVARIANT_TREE:
            raise KernelInputError(f"row-invariant tree attention takes trees of at most {MAX_ROW_INVARIANT_TREE} "
                                   f"nodes, got a tree_mask of {T}; pass tree_mask=None for causal calls "
                                   "(prefill, decode), or use a smaller tree or --no-exact.")
        _check_row_invariant_depth(tree_mask)
        tree_mask = tree_mask.contiguous().view(torch.uint8)  # same bytes; loads as 0/1 integers
    q = q.contiguous()
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=q.device)
    has_key_valid = key_valid is not None
    key_valid = key_valid.contiguous().view(torch.uint8) if has_key_valid else q  # (never read if None)
    prefix_is_ptr = isinstance(prefix_len, torch.Tensor)

    # Body chunks for the longest body the keys allow (with a device prefix_len, the cache's; the programs past the
    # rows' bodies store nothing): chunks.count, or more of chunks.max_tiles, but never more than its tiles.
    # Partials [B * Hkv, n_body, rows, (D)], chunk c in slot c.
    max_keys = S if prefix_is_ptr else max(1, min(prefix_len + T, S))
    max_tiles = triton.cdiv(_tail_start(max_keys), block_n)
    n_body = min(max_tiles, max(chunks.count, triton.cdiv(max_tiles, chunks.max_tiles)))
    part_acc = torch.empty(B * Hkv, n_body, n_rows, D, device=q.device, dtype=torch.float32)
    part_m = torch.empty(B * Hkv, n_body, n_rows, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    block_t = max(16, triton.next_power_of_2(T)) if has_mask else 16
    tree_mask = tree_mask if has_mask else q  # (never read if None)
    args = (q, k_cache, v_cache, tree_mask, key_valid, prefix_len, part_acc, part_m, part_l)
    sizes = (T, S, D, Hkv, n_body, math.log2(math.e) / math.sqrt(D), k_cache.stride(0), k_cache.stride(1),
             k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    common = dict(GROUP=group, PREFIX_IS_PTR=prefix_is_ptr, HAS_MASK=has_mask, HAS_KEY_VALID=has_key_valid,
                  BODY_CHUNKS=chunks.count, CHUNK_TILES=chunks.max_tiles, BLOCK_N=block_n, TAIL_GRAIN=TAIL_GRAIN,
                  BLOCK_T=block_t, BLOCK_D=block_d,
                  # no mul + add contracted into an FMA, so no code path (a whole or a cut body tile, a gathered
                  # tail or not, a variant compiled with or without a mask) rounds differently from another
                  enable_fp_fusion=False, **launch_options(q))  # (PDL and launch_pdl: kernels/dependent_launch.py)
    # The rows of one call have chunks of at most n_lengths lengths: a chunk grows by a tile every chunks.count *
    # block_n keys of body (up to its max_tiles), and the rows' bodies end at most T + 7 keys apart (their ends
    # prefix (+ 1 if causal) to prefix + T, each body cut to a grain); a causal decode's one row has one.
    n_lengths = 1 if (T == 1 and not has_mask) or chunks.count == 0 else 1 + triton.cdiv(T + 7, chunks.count * block_n)
    if n_body:
        _ri_bodies_kernel[(m_blocks * n_body * n_lengths, B * Hkv)](
            *args, *sizes, BLOCK_M=block_m, EVEN_D=block_d == D,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
            num_stages=_body_stages(group), **common)
    # The tails are small tiles: a kernel of their own (few warps, 128 registers a thread for a 7B, little shared
    # memory) lets many of these latency-bound programs share an SM, where the bodies' shared memory would allow
    # one or two programs; a 7B's 64-node tree (2,048 tail programs) fits the GPU in one wave once the bodies are done
    # (beside a running 7B bodies program only 8 fit an SM: compiled sizes, bench/RESULTS.md). Right after the bodies
    # kernel, they compute their tails before waiting for it (TAIL_BEFORE_WAIT); without it (no body: a short
    # prefix), the kernel before is RoPE's, which writes what the tails read, so they wait first.
    tail_m = triton.next_power_of_2(group)
    _ri_tails_kernel[(T, B * Hkv)](*args, out, *sizes, TAIL_M=tail_m, MERGE_CHUNKS=MERGE_CHUNKS,
                                   TAIL_BEFORE_WAIT=bool(n_body) and common["PDL"],
                                   num_warps=_tail_warps(tail_m, block_d), **common)
    return out

"""The two kernels around the fused heads kernel when Medusa heads read their path (nanomedusa/path_tree.py).

A path-reading proposal runs depth by depth; at depth d the parents' inputs, then their guesses' places:

  1. `path_input`: x[p] = hidden + P [E(tok[lineage[p, 0]]); ..; E(tok[lineage[p, d-1]])] for each parent p:
     the parent's path tokens gathered from the tree's tokens so far, looked up in the token embedding E
     [V, D] and projected by the head's P [D, d * D], in one kernel (in torch: an index, an embedding, a
     matmul and an add, four launches). A program owns up to 16 parents and BLOCK_N features; its K loop
     walks the path's d embeddings BLOCK_K features at a time, gathering the embedding rows by token id.
  2. `place_guesses`: tokens[children[c]] = ids[parent_row[c], rank[c]] (and their log-probabilities): each
     child of the depth takes its parent's rank-r guess from the heads kernel's [P, topk] output, one
     program for the depth (in torch: a gather and an index_put each, up to four launches).

So a depth is 1 + (the heads kernel's L + 2) + 1 launches. float32 accumulation; float32 inputs use exact
("ieee") products. Both run on CUDA under `use_triton`, the references elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError
from .linear import torch_linear

ROWS = 16  # parents per program: tl.dot's smallest tile


def path_input_reference(hidden, tokens, lineage, embed_weight, proj_weight):
    """hidden [1, D] or [P, D]; tokens [M] long (the tree's tokens so far); lineage [P, d] node ids (root..parent);
    embed_weight [V, D]; proj_weight [D, d * D] -> x [P, D] = hidden + proj_weight @ the path's embeddings."""
    path = F.embedding(tokens[lineage], embed_weight)  # [P, d, D]
    return hidden + torch_linear(path.flatten(1), proj_weight)


def place_guesses_reference(tokens, logprobs, ids, id_logprobs, children, parent_row, rank) -> None:
    """In place: tokens[children] = ids[parent_row, rank] (tokens [M] long, ids [P, k]); with logprobs (None to
    skip), logprobs[children] = id_logprobs[parent_row, rank]."""
    tokens[children] = ids[parent_row, rank].to(tokens.dtype)
    if logprobs is not None:
        logprobs[children] = id_logprobs[parent_row, rank]


@triton.jit
def _path_input_kernel(hidden_ptr, tokens_ptr, lineage_ptr, embed_ptr, proj_ptr, out_ptr, P, stride_hidden,
                       D: tl.constexpr, DEPTH: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Program (m, n): parents m*BLOCK_M.. and features n*BLOCK_N..; proj [D, DEPTH * D] contiguous, lineage
    [P, DEPTH] contiguous, out [P, D] contiguous; hidden row p at hidden_ptr + p * stride_hidden (0: one row)."""
    wait_for_previous_kernels(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] parents
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    row_ok, col_ok = rows < P, cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(DEPTH):  # the path's j-th token, root first
        node = tl.load(lineage_ptr + rows * DEPTH + j, mask=row_ok, other=0)
        token = tl.load(tokens_ptr + node, mask=row_ok, other=0).to(tl.int64)  # [BLOCK_M]
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            e = tl.load(embed_ptr + token[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BLOCK_M, BLOCK_K]
            w = tl.load(proj_ptr + cols[:, None] * (DEPTH * D) + j * D + ks[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(e, tl.trans(w), acc, input_precision=DOT_PRECISION)
    h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    # the reference's roundings: the product rounded to the dtype, then added to the hidden state
    y = (h.to(tl.float32) + acc.to(h.dtype).to(tl.float32)).to(h.dtype)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], y, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _place_guesses_kernel(tokens_ptr, logprobs_ptr, ids_ptr, id_logprobs_ptr, children_ptr, parent_row_ptr,
                          rank_ptr, C, TOPK: tl.constexpr, WITH_LOGPROBS: tl.constexpr, BLOCK_C: tl.constexpr,
                          PDL: tl.constexpr):
    """One program: every child c < C of the depth takes ids[parent_row[c], rank[c]] (ids [P, TOPK] contiguous)."""
    wait_for_previous_kernels(PDL)
    c = tl.arange(0, BLOCK_C)
    ok = c < C
    child = tl.load(children_ptr + c, mask=ok, other=0)
    src = tl.load(parent_row_ptr + c, mask=ok, other=0) * TOPK + tl.load(rank_ptr + c, mask=ok, other=0)
    tl.store(tokens_ptr + child, tl.load(ids_ptr + src, mask=ok, other=0).to(tokens_ptr.dtype.element_ty), mask=ok)
    if WITH_LOGPROBS:
        tl.store(logprobs_ptr + child, tl.load(id_logprobs_ptr + src, mask=ok, other=0.0), mask=ok)


def path_input_triton(hidden, tokens, lineage, embed_weight, proj_weight):
    """Same contract as `path_input_reference`, in one launch."""
    P, depth = lineage.shape
    V, D = embed_weight.shape
    if hidden.dim() != 2 or tokens.dtype != torch.long or lineage.dtype != torch.long:
        raise KernelInputError(f"path_input takes hidden [rows, D] and int64 tokens and lineage; got hidden "
                               f"{tuple(hidden.shape)}, tokens {tokens.dtype}, lineage {lineage.dtype}.")
    if proj_weight.shape != (D, depth * D) or hidden.shape[-1] != D or hidden.shape[0] not in (1, P):
        raise KernelInputError(f"the path projection {tuple(proj_weight.shape)} must be [D={D}, {depth} * D] for a "
                               f"path of {depth} tokens, and hidden {tuple(hidden.shape)} [1 or {P}, {D}].")
    if len({hidden.dtype, embed_weight.dtype, proj_weight.dtype}) != 1:
        raise KernelInputError("the hidden state, the token embedding and the path projection must share one dtype; "
                               "cast the heads to the model's dtype.")
    hidden, tokens, lineage, embed_weight, proj_weight = (
        t.contiguous() for t in (hidden, tokens, lineage, embed_weight, proj_weight))
    out = torch.empty(P, D, dtype=hidden.dtype, device=hidden.device)
    # as the ResBlocks: narrow tiles spread a small model's weights over more programs
    block_n = 32 if D <= 2048 else 64
    _path_input_kernel[(triton.cdiv(P, ROWS), triton.cdiv(D, block_n))](
        hidden, tokens, lineage, embed_weight, proj_weight, out, P, 0 if hidden.shape[0] == 1 else D,
        D=D, DEPTH=depth, DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        BLOCK_M=ROWS, BLOCK_N=block_n, BLOCK_K=64, **launch_options(hidden),
    )
    return out


def place_guesses_triton(tokens, logprobs, ids, id_logprobs, children, parent_row, rank) -> None:
    """Same contract as `place_guesses_reference`, in one launch. tokens and logprobs, written in place, must be
    contiguous."""
    with_logprobs = logprobs is not None
    for name, out in (("tokens", tokens), ("logprobs", logprobs)):
        if out is not None and (out.dim() != 1 or not out.is_contiguous()):
            raise KernelInputError(f"place_guesses writes {name} in place and takes it 1-D and contiguous, not shaped "
                                   f"{tuple(out.shape)} with strides {out.stride()}; pass the tree's own buffer.")
    C = children.numel()
    if ids.dim() != 2 or not children.shape == parent_row.shape == rank.shape == (C,):
        raise KernelInputError(f"place_guesses takes ids [P, k] and children, parent_row and rank of one length [C]; "
                               f"got ids {tuple(ids.shape)}, children {tuple(children.shape)}, parent_row "
                               f"{tuple(parent_row.shape)} and rank {tuple(rank.shape)}.")
    ids, children, parent_row, rank = (t.contiguous() for t in (ids, children, parent_row, rank))
    _place_guesses_kernel[(1,)](
        tokens, logprobs if with_logprobs else tokens, ids, id_logprobs.contiguous() if with_logprobs else ids,
        children, parent_row, rank, C, TOPK=ids.shape[1], WITH_LOGPROBS=with_logprobs,
        BLOCK_C=triton.next_power_of_2(max(C, 1)), **launch_options(tokens),
    )


def path_input(hidden, tokens, lineage, embed_weight, proj_weight):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(hidden):
        return path_input_triton(hidden, tokens, lineage, embed_weight, proj_weight)
    return path_input_reference(hidden, tokens, lineage, embed_weight, proj_weight)


def place_guesses(tokens, logprobs, ids, id_logprobs, children, parent_row, rank) -> None:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    if use_triton(tokens):
        return place_guesses_triton(tokens, logprobs, ids, id_logprobs, children, parent_row, rank)
    return place_guesses_reference(tokens, logprobs, ids, id_logprobs, children, parent_row, rank)

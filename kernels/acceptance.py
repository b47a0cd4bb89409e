"""Candidate evaluation: which path of the verified tree is accepted, and how far.

After the tree forward, `tree_logits[j]` is the base model's next-token distribution *after* node j.
Node j (not the root) is acceptable when its own token passes a test under its parent's logits:
  * greedy:  token == argmax(parent logits)                        (output identical to greedy decoding)
  * typical: p(token) > min(eps, alpha * exp(-H(p))), p = softmax(parent logits / temperature)
  * sample:  token == drawn[parent], the token the parent's target distribution drew (`drawn`, one per node:
             plain sampling's draw from every node's logits). This is lossless speculative sampling: the tokens
             that come out are each node's own draw, so they are distributed as plain sampling's, and a guess x is
             accepted with probability p(x), as the rejection walk of the Medusa reference accepts it (its
             guesses are a head's top-k, certain, so its acceptance ratio min(1, p(x) / 1) is p(x)); when the
             first child is refused, the draw is distributed as p without it, which is that walk's residual.
             This needs siblings to carry distinct tokens, as a top-k's do: two children of one token could both
             be accepted, and the choice between their paths would then lean on their descendants' draws.
A token outside the vocabulary (the engine's never are: they are the heads' top-k) is unacceptable in every mode,
and on every path, with no host check (no sync).
A path (a row of `retrieve_indices`: root, then one node per depth, padded with -1) is accepted up
to its first unacceptable node. The best path is the one accepted furthest; among those, for typical
acceptance, the likeliest (largest sum of log p(token) over its accepted nodes), as the Medusa reference
does; remaining ties, and every tie under greedy acceptance, go to the first row.
Returns two 0-d long tensors on the device, so the step needs no host sync here.

The Triton version is one launch of T programs. Program j finds node j's parent in the retrieve
rows and tests node j, streaming the parent's logits in BLOCK_V slices (V can be 152k); it posts
the verdict and the token's log-probability and takes a ticket from an arrival counter. The program
that arrives last sees every verdict, scores all paths at once and writes the two results. The
counter is a per-device int32 that this last program sets back to zero, so calls need no zero-filled
scratch; they must not run concurrently on one device (the decode loop runs them in stream order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import use_triton
from .dependent_launch import launch_options, wait_for_previous_kernels
from .errors import KernelInputError

MODES = ("greedy", "typical", "sample")
BLOCK_V = 4096  # logits per slice: 16 per thread at 8 warps, enough loads in flight to hide latency


def _check_mode(mode: str, drawn) -> None:
    if mode not in MODES:
        raise KernelInputError(f"unknown acceptance mode {mode!r}; use one of {', '.join(MODES)}.")
    if (mode == "sample") != (drawn is not None):
        raise KernelInputError("pass `drawn` (each node's drawn token) with mode 'sample', and only with it.")


def node_verdicts_reference(tree_logits, tree_tokens, parents, mode, temperature=1.0, eps=0.09, alpha=0.3,
                            drawn=None):
    """tree_logits [T, V], tree_tokens [T], parents [T] (the root's any node: its verdict is never read), drawn [T]
    (sample mode) -> (ok [T] bool, log_p [T] float32: log p(token) under the parent's tempered distribution in
    typical mode, else zeros)."""
    if mode == "sample":
        ok = drawn[parents] == tree_tokens
        return ok, torch.zeros(ok.shape, device=ok.device)
    parent_logits = tree_logits[parents].float()  # [T, V]
    if mode == "greedy":
        ok = parent_logits.argmax(-1) == tree_tokens
        return ok, torch.zeros(ok.shape, device=ok.device)
    probs = torch.softmax(parent_logits / temperature, dim=-1)
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)  # [T]
    threshold = torch.minimum(torch.full_like(entropy, eps), alpha * torch.exp(-entropy))
    V = probs.shape[-1]  # (a token outside the vocabulary: probability 0, refused)
    p_token = probs.gather(-1, tree_tokens.clamp(0, V - 1)[:, None]).squeeze(-1)  # [T]
    p_token = torch.where((tree_tokens >= 0) & (tree_tokens < V), p_token, 0.0)
    return p_token > threshold, torch.log(p_token)


def accept_candidates_reference(tree_logits, tree_tokens, retrieve_indices, mode="greedy",
                                temperature=1.0, eps=0.09, alpha=0.3, drawn=None):
    """tree_logits [T, V]; tree_tokens [T]; retrieve_indices [P, Dp]; drawn [T] in sample mode -> (best_path [],
    accept_len [])."""
    _check_mode(mode, drawn)
    nodes = retrieve_indices.clamp(min=0)  # [P, Dp]
    parents = torch.zeros(tree_tokens.shape[0], dtype=torch.long, device=tree_tokens.device)
    # (the -1 padding, clamped to the root, also overwrites the root's parent, which nothing reads)
    parents[nodes[:, 1:]] = nodes[:, :-1]
    ok, log_p = node_verdicts_reference(tree_logits, tree_tokens, parents, mode, temperature, eps, alpha, drawn)
    ok_path = ok[nodes[:, 1:]] & (retrieve_indices[:, 1:] >= 0)  # [P, Dp-1]
    accepted = ok_path.long().cumprod(dim=1).bool()  # [P, Dp-1]: True up to the first failing node
    accept_len = accepted.sum(dim=1)  # [P]
    # where, not a product: a rejected token's log p may be -inf
    likelihood = torch.where(accepted, log_p[nodes[:, 1:]], 0.0).sum(dim=1)  # [P]
    longest = accept_len.max()  # = accept_len[best], without a host sync (graph-capturable)
    best = torch.where(accept_len == longest, likelihood, float("-inf")).argmax()  # first of the likeliest
    return best, longest


def accept_candidates(tree_logits, tree_tokens, retrieve_indices, mode="greedy",
                      temperature=1.0, eps=0.09, alpha=0.3, drawn=None):
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere (see module docstring)."""
    args = (tree_logits, tree_tokens, retrieve_indices, mode, temperature, eps, alpha, drawn)
    return accept_candidates_triton(*args) if use_triton(tree_logits) else accept_candidates_reference(*args)


@triton.jit
def _is_argmax(row_ptr, token, V: tl.constexpr, BLOCK_V: tl.constexpr):
    """1 if torch.argmax(row) == token else 0, for row_ptr -> [V] logits.

    The token is the argmax when no logit beats it: none is larger, and no equal one sits at a
    smaller index (torch.argmax returns the first maximum).
    """
    target = tl.load(row_ptr + token)
    beaten = tl.zeros([BLOCK_V], dtype=tl.int32)
    for start in range(0, V, BLOCK_V):
        idx = start + tl.arange(0, BLOCK_V)
        v = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf"))  # [BLOCK_V]
        beaten |= ((v > target) | ((v == target) & (idx < token))).to(tl.int32)
    return (tl.max(beaten, axis=0) == 0).to(tl.int32)


@triton.jit
def _passes_typical(row_ptr, token, V: tl.constexpr, temperature, eps, alpha, BLOCK_V: tl.constexpr):
    """(1 if p[token] > min(eps, alpha * exp(-H(p))) else 0, log p[token]), for p = softmax(row / temperature)."""
    # Pass 1: the softmax's max m and normaliser s, folded in slice by slice (online softmax).
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        idx = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no finite logit yet (a masked start): 0, not NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
    # Pass 2: the entropy, with the reference's +1e-5 inside the log (masked lanes have p = 0).
    p_log_p = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32) / temperature
        p = tl.exp(z - m) / s
        p_log_p += p * tl.log(p + 1e-5)
    entropy = -tl.sum(p_log_p, axis=0)
    p_token = tl.exp(tl.load(row_ptr + token).to(tl.float32) / temperature - m) / s
    return (p_token > tl.minimum(eps, alpha * tl.exp(-entropy))).to(tl.int32), tl.log(p_token)


@triton.jit
def _accept_kernel(logits_ptr, tokens_ptr, drawn_ptr, retrieve_ptr, node_ok_ptr, node_logp_ptr, counter_ptr,
                   best_ptr, accept_len_ptr, T, P, Dp, stride_t, temperature, eps, alpha, V: tl.constexpr,
                   MODE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                   PDL: tl.constexpr):
    """Program j of T: test node j, then, if it is the last to finish, pick the best path.

    logits [T, V] (row stride stride_t), tokens [T], drawn [T] (MODE 2 only), retrieve [P, Dp] (contiguous, -1
    padded), MODE the index of the mode in MODES,
    node_ok [T] int32 and node_logp [T] int32 (float32 bits) scratch, counter [1] int32 (zero on entry
    and on exit), best / accept_len [] int64.
    V is a compile-time constant: it is fixed per model, and constant loop bounds are also what the
    Triton interpreter needs under NumPy >= 2.4.
    """
    wait_for_previous_kernels(PDL)
    node = tl.program_id(0)
    # The retrieve rows as (child, parent) pairs: column c holds depth c + 1 of each path.
    path = tl.arange(0, BLOCK_P)[:, None]  # [BLOCK_P, 1]
    col = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    in_bounds = (path < P) & (col + 1 < Dp)
    child = tl.load(retrieve_ptr + path * Dp + col + 1, mask=in_bounds, other=-1)  # [BLOCK_P, BLOCK_D]
    parent_of = tl.load(retrieve_ptr + path * Dp + col, mask=in_bounds, other=-1)

    # 1. This node's verdict. Every path through it names the same parent; the root (and a node on
    #    no path) finds none and posts 0, which no path reads.
    parent = tl.max(tl.max(tl.where(child == node, parent_of, -1), axis=1), axis=0)
    ok = 0
    log_p = 0.0  # greedy: every path is equally likely, so ties go to the first
    if parent >= 0:
        token = tl.load(tokens_ptr + node)
        # A token outside the vocabulary (never one of the heads' top-k) is refused, and its test reads token 0's
        # logit instead of one past the parent's row.
        in_vocab = (token >= 0) & (token < V)
        logit_at = tl.where(in_vocab, token, 0)
        parent_row = logits_ptr + parent * stride_t
        if MODE == 0:
            ok = _is_argmax(parent_row, logit_at, V, BLOCK_V)
        elif MODE == 1:
            ok, log_p = _passes_typical(parent_row, logit_at, V, temperature, eps, alpha, BLOCK_V)
        else:
            ok = (tl.load(drawn_ptr + parent) == token).to(tl.int32)
        ok = tl.where(in_vocab, ok, 0)
    # Scalar atomics are issued by one thread, in program order, and are acq_rel: a program that
    # draws the last ticket below also sees this verdict.
    # log p travels as its int32 bits: the interpreter has no float atomic exchange.
    tl.atomic_xchg(node_logp_ptr + node, log_p.to(tl.float32).to(tl.int32, bitcast=True))
    tl.atomic_xchg(node_ok_ptr + node, ok)

    # 2. The last arrival scores every path: accepted up to its first failing column (padding fails).
    if tl.atomic_add(counter_ptr, 1) == T - 1:
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next call
        # volatile: read the flags from L2, where the other programs' atomics wrote them
        child_ok = tl.load(node_ok_ptr + child, mask=child >= 0, other=0, volatile=True)  # [BLOCK_P, BLOCK_D]
        accept = tl.min(tl.where(child_ok != 0, Dp - 1, col), axis=1)  # [BLOCK_P]
        accept = tl.where(tl.arange(0, BLOCK_P) < P, accept, -1)
        longest = tl.max(accept, axis=0)
        # Among the paths accepted furthest, the likeliest: the sum of log p over the accepted nodes.
        child_logp = tl.load(node_logp_ptr + child, mask=child >= 0, other=0, volatile=True)
        child_logp = child_logp.to(tl.float32, bitcast=True)  # [BLOCK_P, BLOCK_D]
        likelihood = tl.sum(tl.where(col < accept[:, None], child_logp, 0.0), axis=1)  # [BLOCK_P]
        score = tl.where(accept == longest, likelihood, float("-inf"))
        tl.store(best_ptr, tl.argmax(score, axis=0).to(tl.int64))  # first maximum, like torch.argmax
        tl.store(accept_len_ptr, longest.to(tl.int64))


_counters: dict[torch.device, torch.Tensor] = {}


def _arrival_counter(device: torch.device) -> torch.Tensor:
    """The kernel's ticket counter on `device`, made on first use: call once before capturing a CUDA graph."""
    if device not in _counters:
        _counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _counters[device]


def accept_candidates_triton(tree_logits, tree_tokens, retrieve_indices, mode="greedy",
                             temperature=1.0, eps=0.09, alpha=0.3, drawn=None):
    """Same contract as `accept_candidates_reference`, in one kernel launch and no host sync."""
    _check_mode(mode, drawn)
    T, V = tree_logits.shape
    P, Dp = retrieve_indices.shape
    dev = tree_logits.device
    logits = tree_logits if tree_logits.stride(-1) == 1 else tree_logits.contiguous()
    retrieve = retrieve_indices.contiguous()
    node_ok = torch.empty(T, dtype=torch.int32, device=dev)  # every program writes its own flag and log p
    node_logp = torch.empty(T, dtype=torch.int32, device=dev)
    best = torch.empty((), dtype=torch.long, device=dev)
    accept_len = torch.empty((), dtype=torch.long, device=dev)
    _accept_kernel[(T,)](
        logits, tree_tokens.contiguous(), tree_tokens if drawn is None else drawn.contiguous(), retrieve, node_ok,
        node_logp, _arrival_counter(dev), best, accept_len, T, P, Dp, logits.stride(0), float(temperature),
        float(eps), float(alpha), V=V, MODE=MODES.index(mode), BLOCK_V=BLOCK_V,
        BLOCK_P=triton.next_power_of_2(P), BLOCK_D=triton.next_power_of_2(max(Dp - 1, 1)),
        num_warps=8, **launch_options(logits),
    )
    return best, accept_len

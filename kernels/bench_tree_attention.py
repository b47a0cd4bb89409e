"""Benchmark of the tree-attention kernel against the torch reference and PyTorch SDPA.

Run on a CUDA machine:  python -m kernels.bench_tree_attention

For one attention layer shaped like Llama-2-7B (32 query heads, GQA 32/8 and MHA 32/32, head_dim 128,
2048 cached tokens) and like SmolLM2-135M (9/3 heads, head_dim 64, 512 cached tokens), batch 1, bf16,
T in {1, 16, 64} new tokens under a causal tree mask (the kernel's cost does not depend on the mask's
shape), it first re-checks every implementation against the reference, then prints the median time,
the bytes the op must move (K/V read + q read + out written), the achieved GB/s and that as a share
of the bandwidth of a large device-to-device copy measured on the same GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing

from .tree_attention import tree_attention_reference, tree_attention_triton

# (name, query heads, kv heads, head_dim, cached prefix)
LAYERS = [
    ("7B GQA 32/8", 32, 8, 128, 2048),
    ("7B MHA 32/32", 32, 32, 128, 2048),
    ("SmolLM2 9/3", 9, 3, 64, 512),
]
NEW_TOKENS = (1, 16, 64)
MAX_REL_ERROR = 1e-2


def make_case(n_heads: int, n_kv_heads: int, head_dim: int, prefix_len: int, T: int,
              dtype: torch.dtype, device: str | torch.device, batch: int = 1):
    """Random q [B, Hq, T, D], caches [B, Hkv, prefix+T, D] and a causal tree mask [T, T]."""
    S = prefix_len + T
    q = torch.randn(batch, n_heads, T, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device)
    tree_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return q, k, v, prefix_len, tree_mask


def sdpa_tree_attention(q, k_cache, v_cache, prefix_len: int, tree_mask):
    """The same op through F.scaled_dot_product_attention with a dense boolean mask [T, S]."""
    T, S = q.shape[2], k_cache.shape[2]
    mask = torch.zeros(T, S, dtype=torch.bool, device=q.device)
    mask[:, :prefix_len] = True
    mask[:, prefix_len:prefix_len + T] = tree_mask[:, :S - prefix_len]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                          enable_gqa=q.shape[1] != k_cache.shape[1])


IMPLEMENTATIONS = {
    "triton": tree_attention_triton,
    "torch reference": tree_attention_reference,
    "torch SDPA": sdpa_tree_attention,
}


def max_rel_errors(q, k_cache, v_cache, prefix_len, tree_mask) -> dict[str, float]:
    """max |out - ref| / max |ref| for every implementation, ref = the reference computed in float64."""
    ref = tree_attention_reference(q.double(), k_cache.double(), v_cache.double(), prefix_len, tree_mask)
    scale = ref.abs().max()
    return {name: ((fn(q, k_cache, v_cache, prefix_len, tree_mask).double() - ref).abs().max() / scale).item()
            for name, fn in IMPLEMENTATIONS.items()}


def copy_bandwidth_gbs(n_bytes: int = 1 << 30) -> float:
    """GB/s of y.copy_(x) for two ~1 GB device buffers (read + write counted)."""
    x = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * n_bytes / ms / 1e6


def bytes_moved(q, k_cache) -> int:
    """K and V read once, q read once, out written once."""
    return 2 * k_cache.numel() * k_cache.element_size() + 2 * q.numel() * q.element_size()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("the tree-attention benchmark needs a CUDA GPU; run it on the GPU machine.")
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)\n")
    cases = [(layer, T) for layer in LAYERS for T in NEW_TOKENS]

    print("max relative error vs the float64 reference (bf16 inputs):")
    for (name, hq, hkv, d, prefix), T in cases:
        errors = max_rel_errors(*make_case(hq, hkv, d, prefix, T, torch.bfloat16, "cuda"))
        status = "ok" if max(errors.values()) <= MAX_REL_ERROR else "FAILED"
        print(f"  {name:13s} T={T:<3d} " + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()) + f"  {status}")

    print(f"\n{'layer':13s} {'T':>3s}  {'implementation':15s} {'time µs':>9s} {'MB moved':>9s} "
          f"{'GB/s':>7s} {'% copy':>7s}")
    for (name, hq, hkv, d, prefix), T in cases:
        args = make_case(hq, hkv, d, prefix, T, torch.bfloat16, "cuda")
        n_bytes = bytes_moved(args[0], args[1])
        for impl, fn in IMPLEMENTATIONS.items():
            ms = triton.testing.do_bench(lambda: fn(*args), return_mode="median")
            gbs = n_bytes / ms / 1e6
            print(f"{name:13s} {T:3d}  {impl:15s} {ms * 1e3:9.1f} {n_bytes / 1e6:9.2f} "
                  f"{gbs:7.0f} {100 * gbs / copy_gbs:6.1f}%")


if __name__ == "__main__":
    main()

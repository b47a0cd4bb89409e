"""Turn a Llama 3.1/3.2 GGUF's `rope_freqs` tensor back into the llama3 `rope_scaling` of config.json.

Hugging Face describes Llama 3's RoPE scaling with four numbers (factor, low_freq_factor,
high_freq_factor, original_max_position_embeddings). llama.cpp's convert_hf_to_gguf.py instead
evaluates them into `rope_freqs.weight`: one divisor per rotary frequency, [head_dim // 2] float32 —
1 for high frequencies, `factor` for low ones, a smooth blend in between — and llama.cpp divides
each frequency by its divisor. This module finds four numbers that reproduce every divisor:

    llama3_rope_scaling(divisors, rope_theta=500000.0, head_dim=128, source="m.gguf")
    # -> {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    #     "original_max_position_embeddings": 8192}

and accepts them only if the inverse frequencies nanomedusa computes from them (config.rope_inv_freq)
equal the ones the tensor implies; otherwise the file is refused.
"""

from __future__ import annotations

import math

import numpy as np

from nanomedusa.config import ModelConfig, rope_inv_freq
from nanomedusa.errors import NanoMedusaError

ROPE_FREQS = "rope_freqs.weight"
# Every Llama 3.x release (3.1, 3.2, 3.3) uses these three; only `factor` differs (8 or 32). Tried first, and
# the only guess when the tensor does not pin them down (fewer than two blended divisors, as with heads of 32).
META_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# llama.cpp evaluates the divisors in float32, a few units in the last place off (2e-7 measured); a wrong
# parameter is far off (original_max_position_embeddings 8193 for 8192: 1e-4).
_RTOL = 1e-5


def llama3_rope_scaling(divisors: np.ndarray, rope_theta: float, head_dim: int, source: str) -> dict:
    """The llama3 rope_scaling dict whose inverse frequencies are those of `divisors` ([head_dim // 2])."""
    if divisors.shape != (head_dim // 2,):
        raise NanoMedusaError(
            f"{source} has a rope_freqs tensor of shape {list(divisors.shape)} for heads of {head_dim} "
            f"dimensions (expected [{head_dim // 2}]); the file is inconsistent, so re-export it."
        )
    divisors = divisors.astype(np.float64)
    plain = rope_theta ** -(np.arange(0, head_dim, 2) / head_dim)  # [head_dim // 2] unscaled inverse frequencies
    wanted = plain / divisors
    factor = float(divisors.max())  # the divisor of the lowest frequencies
    for rest in filter(None, (META_SCALING, _solve(plain, divisors, factor))):
        scaling = {"rope_type": "llama3", "factor": factor, **rest}
        if np.allclose(_inv_freq(scaling, rope_theta, head_dim), wanted, rtol=_RTOL, atol=0.0):
            return scaling
    raise NanoMedusaError(
        f"{source}'s rope_freqs tensor does not match llama3 RoPE scaling (the only per-frequency scaling "
        f"that converts); use the model's Hugging Face checkpoint."
    )


def _solve(plain: np.ndarray, divisors: np.ndarray, factor: float) -> dict | None:
    """low/high_freq_factor and original_max_position_embeddings from the blended divisors, or None if
    fewer than two are blended (then the tensor does not pin them down).

    Between the two cut-off wavelengths a divisor is 1 / ((1 - s) / factor + s) with
    s = (original / wavelength - low) / (high - low): linear in 1 / wavelength, so a line through the
    blended points gives original / (high - low) (slope) and low / (high - low) (minus the intercept).
    Scaling all three by one number changes nothing, so low is set to 1 as in Meta's releases.
    """
    blended = (divisors > 1.0) & (divisors < factor)
    if blended.sum() < 2:
        return None
    s = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(plain[blended] / (2 * math.pi), s, 1)
    original = round(slope / -intercept) if slope > 0 > intercept else 0  # config.json holds it as an integer
    if original < 1:  # not a blend that rises from low to high frequencies
        return None
    low, high = original * -intercept / slope, original * (1 - intercept) / slope  # ~1 and ~4 for Meta's
    return {"low_freq_factor": _round6(low), "high_freq_factor": _round6(high),
            "original_max_position_embeddings": original}


def _inv_freq(scaling: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """What nanomedusa's model computes from a config.json with this rope_scaling ([head_dim // 2])."""
    # Only the RoPE fields matter to rope_inv_freq; the sizes are placeholders.
    config = ModelConfig(vocab_size=1, dim=head_dim, n_layers=1, n_heads=1, n_kv_heads=1, intermediate_size=1,
                         head_dim=head_dim, rope_theta=rope_theta, rope_scaling=scaling)
    return rope_inv_freq(config).double().numpy()


def _round6(value: float) -> float:
    """Six significant digits: 4.0, not the 3.9999998 that float32 divisors solve to."""
    return float(f"{value:.6g}")

"""Model configuration: the handful of numbers that define a Llama-family network.

`ModelConfig.from_hf(dict)` reads a Hugging Face `config.json` (Llama, Mistral and Qwen2 style) and
refuses anything else with a sentence naming what is supported. Everything downstream (model, heads,
training) only ever sees a `ModelConfig`, never the raw JSON.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NanoMedusaError
from .files import read_utf8

# architectures[0] in config.json -> our name for it. All are the same network up to biases.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# What transformers' config classes assume for a field config.json leaves out (LlamaConfig, MistralConfig,
# Qwen2Config): the same checkpoint must not run with another epsilon or context here than there.
HF_DEFAULTS = {
    "LlamaForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "MistralForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "Qwen2ForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "sliding_window": 4096,
                         "use_sliding_window": False, "max_window_layers": 28},
}
SUPPORTED_ROPE_SCALING = ("linear", "llama3", "default")
# The numbers each scaling needs (rope_inv_freq): refused when missing, since a default would silently move the
# positions; llama3's low/high_freq_factor may be left out (1 and 4, as Llama 3.1 and 3.2 ship them).
_ROPE_SCALING_NUMBERS = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings")}
# Integer fields -> their least value; config.json names them as _HF_NAMES says (where it differs).
_INTEGER_FIELDS = {"vocab_size": 1, "dim": 1, "n_layers": 1, "n_heads": 1, "n_kv_heads": 1, "intermediate_size": 1,
                   "head_dim": 0, "max_position_embeddings": 1}
_HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads"}
# SwiGLU's activation: what every supported architecture uses (transformers spells SiLU both ways).
SUPPORTED_ACTIVATIONS = ("silu", "swish")


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0 -> dim // n_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k and v
    output_bias: bool = False  # the attention's output projection (Llama's attention_bias; Qwen2's has none)
    mlp_bias: bool = False  # gate, up and down
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        for name, minimum in _INTEGER_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
                raise NanoMedusaError(f"config.json's {_HF_NAMES.get(name, name)} is {value!r}; it must be an integer "
                                      f"of at least {minimum}: fix the config.")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _positive_number(value):
                raise NanoMedusaError(f"config.json's {name} is {value!r}; it must be a positive number: fix the "
                                      f"config.")
            setattr(self, name, float(value))
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise NanoMedusaError(
                f"config.json has num_attention_heads={self.n_heads} which is not a multiple of "
                f"num_key_value_heads={self.n_kv_heads}; fix the config so query heads split evenly over KV heads."
            )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise NanoMedusaError(f"config.json's rope_scaling is {self.rope_scaling!r}; it must be an object such "
                                      f"as {{\"rope_type\": \"linear\", \"factor\": 2.0}}, or null: fix the config.")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in SUPPORTED_ROPE_SCALING:
                raise NanoMedusaError(
                    f"rope_scaling type {kind!r} is not supported; use one of {', '.join(SUPPORTED_ROPE_SCALING)}."
                )
            for key in _ROPE_SCALING_NUMBERS.get(kind, ()):
                value = self.rope_scaling.get(key)
                if not _positive_number(value):
                    raise NanoMedusaError(f"config.json's {kind} rope_scaling needs {key} as a positive number, not "
                                          f"{value!r}; add it from the model's original config.")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        archs = hf.get("architectures") or [_arch_from_model_type(hf.get("model_type"))]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise NanoMedusaError(
                f"architecture {arch!r} is not supported; nanomedusa runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints."
            )
        hf = {**HF_DEFAULTS[arch], **hf}
        if (window := _sliding_window(arch, hf)) and isinstance(hf["max_position_embeddings"], int):
            # Sliding-window attention only differs once the context passes the window; we refuse
            # contexts longer than it (see max_position_embeddings) instead of silently diverging.
            hf["max_position_embeddings"] = min(hf["max_position_embeddings"], window)
        activation = hf.get("hidden_act", "silu")
        if activation not in SUPPORTED_ACTIVATIONS:
            raise NanoMedusaError(f"config.json's hidden_act is {activation!r}; nanomedusa's SwiGLU computes silu, so "
                                  f"this checkpoint would run wrong: use a model whose hidden_act is silu.")
        # Llama's attention_bias puts a bias on o_proj too, and only Llama has mlp_bias; Qwen2 always biases q, k, v.
        qkv_bias = bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM"))
        llama = arch == "LlamaForCausalLM"
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        rope_scaling = hf.get("rope_scaling")
        # transformers >= 5 writes rope settings under rope_parameters.
        params = hf["rope_parameters"] if isinstance(hf.get("rope_parameters"), dict) else {}
        if rope_scaling is None and params.get("rope_type", "default") != "default":
            rope_scaling = dict(params)
        # (a null is left out; a 0 is kept, and refused in __post_init__)
        rope_theta = next((t for t in (hf.get("rope_theta"), params.get("rope_theta")) if t is not None), 10000.0)
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=hf["num_attention_heads"],
                n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                intermediate_size=hf["intermediate_size"],
                head_dim=hf.get("head_dim") or 0,
                rms_norm_eps=hf["rms_norm_eps"],
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=qkv_bias,
                output_bias=qkv_bias and llama,
                mlp_bias=bool(hf.get("mlp_bias", False)) and llama,
                max_position_embeddings=hf["max_position_embeddings"],
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
                architecture=arch,
            )
        except KeyError as e:
            raise NanoMedusaError(f"config.json lacks the field {e.args[0]!r}; re-export the checkpoint with "
                                  f"it.") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise NanoMedusaError(f"no config.json at {path}; point --model at a Hugging Face checkpoint directory.")
        try:
            hf = json.loads(read_utf8(path))
        except json.JSONDecodeError as e:
            raise NanoMedusaError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore the file.") from None
        if not isinstance(hf, dict):
            raise NanoMedusaError(f"{path} holds a JSON {type(hf).__name__}, not an object; restore the file.")
        return cls.from_hf(hf)


def _positive_number(value) -> bool:
    """A finite number above 0 (a bool is a number to Python, not to a config)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _sliding_window(arch: str, hf: dict) -> int | None:
    """The window of the layers that attend to their last N tokens only, or None where every layer sees the whole
    context: Mistral's every layer when sliding_window is set; Qwen2's layers from max_window_layers on when
    use_sliding_window is; transformers 5 names each layer's kind in layer_types."""
    if not hf.get("sliding_window"):
        return None
    if isinstance(hf.get("layer_types"), list):
        sliding = "sliding_attention" in hf["layer_types"]
    elif arch == "Qwen2ForCausalLM":
        sliding = bool(hf["use_sliding_window"]) and hf["max_window_layers"] < hf.get("num_hidden_layers", 0)
    else:
        sliding = arch == "MistralForCausalLM"
    return hf["sliding_window"] if sliding else None


def _arch_from_model_type(model_type: str | None) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        model_type or "", f"<model_type {model_type!r}>"
    )


def rope_inv_freq(config: ModelConfig):
    """Inverse RoPE frequencies [head_dim // 2], with `linear` or `llama3` scaling applied."""
    import torch

    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()

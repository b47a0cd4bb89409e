"""Convert a llama.cpp GGUF file into a Hugging Face checkpoint directory.

nanomedusa loads Hugging Face checkpoints only (config.json + model.safetensors + tokenizer.json). Many
models, the default SmolLM2-135M-Instruct among them, are at hand only as GGUF, so this module rewrites
one into that layout, once:

    convert_gguf("m.Q4_K_M.gguf", "out/")  # -> out/{config.json, model.safetensors, tokenizer.json, ...}
    convert_cached("m.Q4_K_M.gguf")        # -> weights/cache/m.Q4_K_M-<key>/, converted on first use only

Architectures: `llama` (Llama, and Mistral, whose files say `llama`) and `qwen2` (q/k/v biases);
anything else is refused with a NanoMedusaError naming what is supported.

What llama.cpp changed on the way into GGUF, and is undone here:
- names: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (`_hf_name`);
- values: quantised blocks (Q4_0 ... Q8_0, the K-quants Q2_K ... Q8_K, the i-quants) are dequantised
  (`_dequantize`), so the checkpoint holds the *quantised* model at full precision, not the original
  release's weights;
- layout: for `llama`, q/k rows are reordered for llama.cpp's interleaved RoPE (`_unpermute_rope_rows`);
- RoPE scaling: Llama 3.1/3.2's llama3 `rope_scaling` became a `rope_freqs` tensor of per-frequency
  divisors; it is solved back into config.json's `rope_scaling` (gguf_rope.py) and is not a weight;
- tokenizer: vocabulary and merges live in metadata and are rebuilt into a `tokenizer.json` (gguf_tokenizer.py).

Everything that can refuse a file (architecture, RoPE scaling, tokenizer kind, tensor names, types and
shapes) is checked from the header (gguf_reader.py) and the small rope_freqs tensor, so a refusal comes
within about a second. The weights are then written tensor by tensor with a progress bar: at most one
tensor is dequantised in memory at a time, whatever the model's size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from nanomedusa.errors import NanoMedusaError
from weights.gguf_reader import GGUFFile, TensorInfo
from weights.gguf_rope import ROPE_FREQS, llama3_rope_scaling
from weights.gguf_tokenizer import build_tokenizer, check_tokenizer, tokenizer_config

CACHE_ROOT = Path(__file__).resolve().parent / "cache"

Q = gguf.GGMLQuantizationType
# Every block format gguf-py dequantizes for the models we run, plus Q8_K, which it cannot (`_dequantize_rows`).
# The ternary and FP4 formats (TQ1_0, TQ2_0, MXFP4, NVFP4) belong to architectures we do not run.
SUPPORTED_TYPES = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0, Q.Q4_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K,
    Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS,
)
# Output dtype -> its safetensors name.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# Raw bytes dequantised in one go: bounds gguf-py's temporaries (several times the block data) on a big embedding.
_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    # llama.cpp interleaves the q/k rows of Llama for its RoPE; Qwen2 (NeoX-style RoPE) is stored as is.
    rope_rows_interleaved: bool
    qkv_bias: bool


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", rope_rows_interleaved=True, qkv_bias=False),
    "qwen2": Architecture("Qwen2ForCausalLM", rope_rows_interleaved=False, qkv_bias=True),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True
) -> Path:
    """Write a Hugging Face checkpoint for `gguf_path` into `out_dir` (which must not exist) and return it.

    float32 (the default) keeps the dequantised values exactly; float16/bfloat16 halve the size but round them.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise NanoMedusaError(f"no GGUF file at {gguf_path}; check the path.")
    if out_dir.exists():
        raise NanoMedusaError(f"{out_dir} already exists; delete it or choose another output directory.")
    if dtype not in SAFETENSORS_DTYPES:
        choices = ", ".join(map(str, SAFETENSORS_DTYPES))
        raise NanoMedusaError(f"cannot write weights as {dtype}; choose one of {choices}.")

    gguf_file = GGUFFile(gguf_path)
    meta, source = gguf_file.metadata, gguf_path.name
    # Everything that can refuse the file runs before the slow part.
    config = hf_config(gguf_file, source, dtype)
    check_tokenizer(meta, source)
    named = _check_tensors(gguf_file.tensors, config, source)
    tokenizer = build_tokenizer(meta, source)

    with staged(out_dir) as staging:
        _write_weights(staging / "model.safetensors", gguf_file, named, config, dtype, progress)
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "config.json", config)
        _write_json(staging / "tokenizer_config.json", tokenizer_config(meta, config["max_position_embeddings"]))
        _write_json(staging / "generation_config.json", _generation_config(config))
        (staging / "README.md").write_text(_model_card(gguf_path, meta, gguf_file.tensors, dtype), encoding="utf-8")
    return out_dir


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `out_dir` to build a checkpoint in, renamed to `out_dir` once the block ends.

    A killed build leaves a hidden `.NAME.partial-HOST-PID` folder, never an `out_dir` that looks finished; the
    next build of `out_dir` on the same host deletes those whose process is gone, at its start and at its end (a
    cache shared with other hosts keeps theirs: we cannot tell whether their processes run). A failed block
    deletes its folder. If another process renamed its own build into place first (two first uses at once), ours
    is deleted and theirs kept.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out_dir)
    staging = out_dir.parent / f"{_staging_prefix(out_dir)}{os.getpid()}"
    staging.mkdir()
    try:
        yield staging
        try:
            staging.rename(out_dir)
        except OSError:
            if not out_dir.is_dir():  # else another process's build is in place, the same as ours
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed
    _remove_abandoned(out_dir)  # again: a process killed just before we started may have been still exiting


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-{socket.gethostname()}-"


def _remove_abandoned(out_dir: Path) -> None:
    """Delete this host's staging folders of `out_dir` whose process died before renaming them (SIGKILL, power
    loss)."""
    prefix = _staging_prefix(out_dir)
    for folder in out_dir.parent.iterdir():
        pid = folder.name.removeprefix(prefix)
        # One with our own PID is from a dead process whose PID we got again (PIDs repeat, in containers often).
        if folder.name.startswith(prefix) and pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def convert_cached(gguf_path: str | Path, cache_root: str | Path | None = None, progress: bool = True,
                   dtype: torch.dtype = torch.float32) -> Path:
    """The converted checkpoint for `gguf_path` under `cache_root` (default weights/cache), converting on first use.

    The folder is named after the file and `content_key`, so two different files that share a name do not
    share a checkpoint, while running the same file again reuses it. `dtype` is the one the model will run
    in (a GPU's bfloat16 halves what loading reads); it is named in the folder unless float32.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise NanoMedusaError(f"no GGUF file at {gguf_path}; check the --model path.")
    name = f"{gguf_path.stem}-{content_key(gguf_path)}"
    if dtype != torch.float32:
        name += "-" + str(dtype).removeprefix("torch.")
    out_dir = Path(cache_root or CACHE_ROOT) / name
    if out_dir.is_dir():  # only ever appears complete, see convert_gguf
        return out_dir
    return convert_gguf(gguf_path, out_dir, dtype=dtype, progress=progress)


def content_key(path: Path, chunk: int = 1 << 20) -> str:
    """A short hash of a file's size, modification time (in nanoseconds), first MiB and last MiB.

    Reading the whole file would take seconds for a large model on every start. The first MiB holds the
    header (metadata); the modification time tells apart files that differ only further in (another
    fine-tune of the same shape, a file re-exported in place). A copy or a new download of the same
    file gets a new time, so it is converted once more: time lost, never the wrong model.
    """
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size} {stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(stat.st_size - chunk, 0))
        digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


def hf_config(gguf_file: GGUFFile, source: str, dtype: torch.dtype) -> dict:
    """config.json for the Hugging Face class of the GGUF's architecture, with the GGUF's hyper-parameters."""
    meta = gguf_file.metadata
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise NanoMedusaError(
            f"{source} is a GGUF of architecture {arch_name!r}; only 'llama' (Llama, Mistral) and 'qwen2' "
            f"GGUF files can be converted, so use the model's Hugging Face checkpoint."
        )
    arch = ARCHITECTURES[arch_name]

    def need(key: str):
        if f"{arch_name}.{key}" not in meta:
            raise NanoMedusaError(
                f"{source} lacks the GGUF key {arch_name}.{key!r}; re-export it with a current llama.cpp."
            )
        return meta[f"{arch_name}.{key}"]

    hidden, n_heads = need("embedding_length"), need("attention.head_count")
    head_dim = meta.get(f"{arch_name}.attention.key_length", hidden // n_heads)
    rotated = meta.get(f"{arch_name}.rope.dimension_count", head_dim)
    if rotated != head_dim:
        raise NanoMedusaError(
            f"{source} rotates only {rotated} of {head_dim} head dimensions; "
            f"partial RoPE is not supported, so use a model that rotates whole heads."
        )
    names = {t.name: t for t in gguf_file.tensors}
    if "token_embd.weight" not in names:
        raise NanoMedusaError(f"{source} has no token_embd.weight tensor; re-export the complete model.")
    rope_theta = _f32(meta.get(f"{arch_name}.rope.freq_base", 10000.0))
    return {
        "architectures": [arch.hf_class],
        "model_type": arch_name,
        "vocab_size": names["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get(f"{arch_name}.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": need("context_length"),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(gguf_file, arch_name, rope_theta, head_dim, source),
        "attention_bias": arch.qkv_bias,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _end_token_ids(meta),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _write_weights(
    path: Path, gguf_file: GGUFFile, named: list[tuple[TensorInfo, str]], config: dict, dtype: torch.dtype,
    progress: bool = True,
) -> None:
    """model.safetensors, streamed: every shape is known from the GGUF header, so the safetensors header
    is written first and each tensor's bytes follow as soon as it is dequantised, then are let go."""
    with open(path, "wb") as f:
        f.write(_safetensors_header([(name, tensor.shape) for tensor, name in named], dtype))
        bar = tqdm(named, desc=f"Converting {gguf_file.path.name}", unit="tensor", disable=not progress)
        for tensor, name in bar:
            f.write(_hf_tensor(gguf_file, tensor, name, config).to(dtype).contiguous().view(torch.uint8).numpy())


def _hf_tensor(gguf_file: GGUFFile, tensor: TensorInfo, name: str, config: dict) -> torch.Tensor:
    """One tensor as float32, as the Hugging Face checkpoint holds it."""
    weight = torch.from_numpy(_dequantize(gguf_file, tensor))
    if ARCHITECTURES[config["model_type"]].rope_rows_interleaved and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
        weight = _unpermute_rope_rows(weight, heads)
    return weight


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `entries` back to back, in order."""
    item_size = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        end = offset + math.prod(shape) * item_size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors itself writes it: the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def _check_tensors(tensors: list[TensorInfo], config: dict, source: str) -> list[tuple[TensorInfo, str]]:
    """Each tensor with its Hugging Face name, after checking its type, name and shape, and that none is missing."""
    expected = _expected_shapes(config)
    named = []
    for tensor in tensors:
        if tensor.type not in SUPPORTED_TYPES:
            raise NanoMedusaError(
                f"tensor {tensor.name} in {source} is stored as {tensor.type.name}, which cannot be "
                f"dequantized (supported: {', '.join(t.name for t in SUPPORTED_TYPES)}); "
                f"use a GGUF quantised to one of those types."
            )
        if tensor.name == ROPE_FREQS:
            continue  # not a weight: hf_config made it config.json's rope_scaling
        name = _hf_name(tensor.name)
        if name not in expected:
            raise NanoMedusaError(
                f"{source} holds the tensor {tensor.name!r}, which a {config['architectures'][0]} with this "
                f"config has no place for; use the model's Hugging Face checkpoint."
            )
        if tensor.shape != expected[name]:
            raise NanoMedusaError(
                f"tensor {tensor.name} in {source} has shape {list(tensor.shape)}, but the file's metadata "
                f"implies {list(expected[name])}; the file is inconsistent, so re-export it."
            )
        named.append((tensor, name))
    missing = sorted(expected.keys() - {name for _, name in named})
    if missing:
        raise NanoMedusaError(
            f"{source} lacks {len(missing)} tensors (first: {missing[0]}); re-export the complete model."
        )
    return named


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor the checkpoint must have."""
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    if config["attention_bias"]:
        layer |= {"self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
                  "self_attn.v_proj.bias": (kv_rows,)}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{part}": shape for part, shape in layer.items()}
    return shapes


def _hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for a name with no counterpart."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _dequantize(gguf_file: GGUFFile, tensor: TensorInfo) -> np.ndarray:
    """The tensor's values as float32 in Hugging Face's [out, in] order, dequantised a slice of rows at a time."""
    rows = math.prod(tensor.shape[:-1])
    values = np.empty((rows, tensor.shape[-1]), np.float32)
    step = max(1, _CHUNK_BYTES // tensor.row_bytes)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        values[start:stop] = _dequantize_rows(gguf_file.rows(tensor, start, stop), tensor.type)
    return values.reshape(tensor.shape)


def _dequantize_rows(raw: np.ndarray, ggml_type: Q) -> np.ndarray:
    """[rows, row_bytes] raw blocks -> [rows, values] float32."""
    if ggml_type == Q.Q8_K:
        # gguf-py has no Q8_K dequantizer: llama.cpp makes it for activations, though a file may store it.
        # A block is a float32 scale, 256 int8 values and 16 int16 partial sums (not needed here).
        blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[Q.Q8_K][1])
        values = blocks[:, :4].view(np.float32) * blocks[:, 4:260].view(np.int8)
        return values.reshape(raw.shape[0], -1)
    return gguf.quants.dequantize(raw, ggml_type)


def _end_token_ids(meta: dict) -> int | list[int] | None:
    """config.json's eos_token_id: every token llama.cpp ends generation on, as a list (eos first) if
    there are several: eos, end of turn and end of message (Llama 3 Instruct's <|eot_id|>, <|eom_id|>)."""
    keys = (f"tokenizer.ggml.{end}_token_id" for end in ("eos", "eot", "eom"))
    # (check_tokenizer refuses an eos outside the vocabulary, or none; llama.cpp ignores an eot or eom outside it)
    vocab = len(meta.get("tokenizer.ggml.tokens", ()))
    ids = list(dict.fromkeys(meta[key] for key in keys if key in meta and 0 <= meta[key] < vocab))
    return ids[0] if len(ids) == 1 else (ids or None)


def _generation_config(config: dict) -> dict:
    return {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config[key] is not None}


def _model_card(gguf_path: Path, meta: dict, tensors: list[TensorInfo], dtype: torch.dtype) -> str:
    counts: dict[str, int] = {}
    for tensor in tensors:
        counts[tensor.type.name] = counts.get(tensor.type.name, 0) + 1
    by_count = sorted(counts, key=lambda name: -counts[name])
    types = ", ".join(f"{counts[name]} x {name}" for name in by_count)
    quantised = [name for name in by_count if name not in ("F32", "F16", "BF16")]
    dtype_name = str(dtype).removeprefix("torch.")
    if quantised:
        note = (
            f"**These are not the original full-precision (bf16/fp16) weights.** The GGUF is the "
            f"{'/'.join(quantised)} quantised release ({types}); every tensor was dequantised to {dtype_name}, "
            f"so this checkpoint computes what the quantised model computes, which differs slightly from the original."
        )
    else:
        note = f"The GGUF stores floating-point tensors ({types}); they were converted to {dtype_name}."
    return (
        f"# {gguf_path.stem}\n\n"
        f"Converted by nanomedusa (`weights/gguf_to_hf.py`) from the GGUF file `{gguf_path.name}` "
        f"({meta.get('general.name', 'unnamed')}, license: {meta.get('general.license', 'unstated')}).\n\n"
        f"{note}\n"
    )


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, it interleaves the two rotated halves (x0 y0 x1 y1 ...)
    for its RoPE; Hugging Face's rotate_half wants them apart (x0 x1 ... y0 y1 ...)."""
    rows, cols = weight.shape  # [n_heads * head_dim, hidden]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_scaling(
    gguf_file: GGUFFile, arch_name: str, rope_theta: float, head_dim: int, source: str
) -> dict | None:
    """config.json's rope_scaling: linear from the metadata, llama3 from a rope_freqs tensor, or None.

    The metadata is read as llama.cpp reads it: a factor with no type is linear, and older files give the
    factor as `rope.scale_linear`.
    """
    meta = gguf_file.metadata
    factor = meta.get(f"{arch_name}.rope.scaling.factor", meta.get(f"{arch_name}.rope.scale_linear"))
    kind = meta.get(f"{arch_name}.rope.scaling.type", "none" if factor is None else "linear")
    rope_freqs = [t for t in gguf_file.tensors if t.name == ROPE_FREQS]
    if kind == "none" and rope_freqs:
        return llama3_rope_scaling(_dequantize(gguf_file, rope_freqs[0]), rope_theta, head_dim, source)
    if kind == "none":
        return None
    if kind == "linear" and factor is None:
        raise NanoMedusaError(
            f"{source} asks for linear RoPE scaling but lacks its factor ({arch_name}.rope.scaling.factor); "
            f"re-download or re-convert the GGUF."
        )
    if kind == "linear" and not rope_freqs:
        return {"rope_type": "linear", "factor": _f32(factor)}
    raise NanoMedusaError(
        f"{source} uses {kind!r} RoPE scaling{' as well as a rope_freqs tensor' if rope_freqs else ''}; only "
        f"linear scaling or Llama 3's rope_freqs alone converts, so use the model's Hugging Face checkpoint."
    )


def _f32(value: float) -> float:
    """GGUF stores float32: keep its shortest decimal (1e-05), not the widened double (9.99999974e-06)."""
    return float(str(np.float32(value)))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    from nanomedusa.cli import ArgumentParser, exit_with, run_reporting_errors
    from nanomedusa.loading import DTYPES

    p = ArgumentParser(description="Convert a GGUF file into a Hugging Face checkpoint directory (generate.py "
                                   "--model FILE.gguf does this by itself, into weights/cache/).")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="the checkpoint directory to write (must not exist)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the weights' dtype: float32 keeps the dequantised values exactly")
    args = p.parse_args()
    exit_with(run_reporting_errors(lambda: print(convert_gguf(args.gguf, args.out, DTYPES[args.dtype]))))

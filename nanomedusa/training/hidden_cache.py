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
import os
from array import array
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import NanoMedusaError


def fingerprint(model_id: str, dtype: torch.dtype, examples) -> str:
    digest = hashlib.sha1(f"{model_id}|{dtype}".encode())
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
        _write_atomic(meta, lambda tmp: tmp.write_text(json.dumps({"fingerprint": fingerprint}) + "\n"))

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
            _write_atomic(f, lambda tmp, row=row[:n]: save_file({"hidden": row.contiguous().cpu()}, str(tmp)))
        return hidden


def _fingerprint_of(meta: Path) -> str | None:
    """The fingerprint meta.json records; None if it is no such file (not JSON, not an object, a directory)."""
    try:
        return json.loads(meta.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)

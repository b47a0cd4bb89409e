"""Read a GGUF file's header fast: its metadata and tensor table, with the tensor data left on disk.

gguf-py's own `GGUFReader` builds several numpy views for every string in the metadata, so opening
a file with a 151k-token vocabulary (Qwen2) takes tens of seconds before anything can be checked. This
reader walks the header with `struct` over a memory map instead, well under a second for the same file:

    gguf_file = GGUFFile("model.gguf")
    gguf_file.metadata["general.architecture"]       # -> "qwen2"
    gguf_file.tensors[0]                              # -> TensorInfo(name, type, shape, offset, n_bytes)
    gguf_file.rows(gguf_file.tensors[0], 0, 16)       # -> the raw bytes of rows 0..15, one row per line

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), all little-endian: magic "GGUF",
version, tensor count, key/value count; the key/value pairs; one (name, dims, type, offset) entry
per tensor; padding to `general.alignment`; the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from nanomedusa.errors import NanoMedusaError

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}
_SUPPORTED_VERSIONS = (2, 3)  # version 1 counted in 32 bits; llama.cpp has not written it since 2023
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # Hugging Face order, outermost first: [out, in] (GGUF lists innermost first)
    offset: int  # of the first byte, from the start of the file
    n_bytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one innermost row: whole quantisation blocks, since rows are a multiple of the block size."""
        block_size, type_size = GGML_QUANT_SIZES[self.type]
        return self.shape[-1] // block_size * type_size


class GGUFFile:
    """A GGUF file's metadata (a dict of Python values) and tensor table, and its tensors' raw bytes on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise NanoMedusaError(f"{self.path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf "
                                      f"file from llama.cpp or the hub.")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.metadata, self.tensors = self._read_header()
        except (struct.error, UnicodeDecodeError, ValueError):  # read past the end, or bytes that mean nothing
            raise NanoMedusaError(
                f"{self.path.name} has a damaged or cut-off header; download the file again."
            ) from None

    def rows(self, tensor: TensorInfo, start: int, stop: int) -> np.ndarray:
        """Rows `start`..`stop` of the tensor's raw bytes (flattened to 2-D), as a [rows, row_bytes] uint8 array.

        Read into a fresh array rather than viewed through the memory map: mapped pages, once touched,
        count as this process's memory until the map closes, so a conversion would grow by the whole
        file; a read array is freed as soon as the caller drops it.
        """
        rows = np.empty((stop - start, tensor.row_bytes), np.uint8)
        with open(self.path, "rb") as f:
            f.seek(tensor.offset + start * tensor.row_bytes)
            f.readinto(rows)
        return rows

    def _read_header(self) -> tuple[dict, list[TensorInfo]]:
        self._pos = 4  # past the magic
        version = self._scalar("<I")
        if version not in _SUPPORTED_VERSIONS:
            raise NanoMedusaError(
                f"{self.path.name} is GGUF version {version} (or big-endian); only little-endian versions 2 and 3 "
                f"are read, so re-export it with a current llama.cpp."
            )
        tensor_count, kv_count = self._scalar("<Q"), self._scalar("<Q")
        metadata = {}
        for _ in range(kv_count):
            key = self._string()
            metadata[key] = self._value(self._scalar("<I"))
        infos = [self._tensor_entry() for _ in range(tensor_count)]
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not (isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0):
            raise NanoMedusaError(  # llama.cpp refuses such a file too
                f"{self.path.name} gives general.alignment as {alignment!r}, not a power of two; "
                f"re-download or re-convert the GGUF."
            )
        data_start = -(-self._pos // alignment) * alignment
        tensors = [self._tensor_info(*info, data_start) for info in infos]
        return metadata, tensors

    def _tensor_entry(self) -> tuple[str, list[int], int, int]:
        name = self._string()
        dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
        return name, dims, self._scalar("<I"), self._scalar("<Q")

    def _tensor_info(self, name: str, dims: list[int], type_id: int, offset: int, data_start: int) -> TensorInfo:
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise NanoMedusaError(
                f"tensor {name} in {self.path.name} has GGML type number {type_id}, which the installed gguf "
                f"package does not know; upgrade it (pip install -U gguf) or use a file of common types."
            ) from None
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if dims[0] % block_size:
            raise NanoMedusaError(
                f"tensor {name} in {self.path.name} has rows of {dims[0]} values, not a multiple of "
                f"{ggml_type.name}'s block of {block_size}; the file is damaged, so download it again."
            )
        n_bytes = int(np.prod(dims)) // block_size * type_size
        if data_start + offset + n_bytes > len(self._map):
            raise NanoMedusaError(f"{self.path.name} ends inside tensor {name}; download the file again.")
        return TensorInfo(name, ggml_type, tuple(reversed(dims)), data_start + offset, n_bytes)

    def _value(self, value_type: int):
        if value_type == GGUFValueType.STRING:
            return self._string()
        if value_type == GGUFValueType.ARRAY:
            item_type, count = self._scalar("<I"), self._scalar("<Q")
            return self._array(item_type, count)
        return self._scalar(_SCALAR_FORMATS[GGUFValueType(value_type)])

    def _array(self, item_type: int, count: int) -> list:
        if item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            return [self._value(item_type) for _ in range(count)]
        # Numbers (token types, scores) are read in one go, not one struct call each.
        dtype = np.dtype(_SCALAR_FORMATS[GGUFValueType(item_type)].replace("?", "b1"))
        values = np.frombuffer(self._map, dtype, count, self._pos)
        self._pos += values.nbytes
        return values.tolist()

    def _string(self) -> str:
        length = self._scalar("<Q")
        start, self._pos = self._pos, self._pos + length
        return self._map[start : self._pos].decode("utf-8")

    def _scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

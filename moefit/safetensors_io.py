"""Read safetensors tensors (or one slice of their leading dimension) with plain file reads.

The safetensors library memory-maps the file; every page it touches then counts as resident memory of the
process until the file is closed, so reading a 5 GB shard tensor by tensor still shows 5 GB resident. Reading
with `readinto` into a fresh buffer keeps the resident set at the tensors actually held: the loader's promise
(never more than a couple of tensors in host RAM) holds on paper and in `ps`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from .errors import MoefitError

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoefitError(f"{self.path}: not a readable safetensors file ({e}).") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self.data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.header[key]["dtype"]
        if name not in _DTYPES:
            raise MoefitError(f"{self.path}: tensor {key!r} has dtype {name}, which moefit cannot read.")
        return _DTYPES[name]

    def nbytes(self, key: str) -> int:
        start, end = self.header[key]["data_offsets"]
        return end - start

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or `tensor[index]` along its leading dimension (read alone, not the whole tensor)."""
        info = self.header[key]
        shape = list(info["shape"])
        dtype = self.dtype(key)
        start, end = info["data_offsets"]
        if index is not None:
            rows = shape.pop(0)
            if not 0 <= index < rows:
                raise IndexError(f"{key}: index {index} out of range for {rows} rows")
            row_bytes = (end - start) // rows
            start, end = start + index * row_bytes, start + (index + 1) * row_bytes
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + start)
            view = memoryview(buf.numpy())
            got = f.readinto(view)
        if got != end - start:
            raise MoefitError(f"{self.path}: tensor {key!r} is truncated (read {got} of {end - start} bytes); "
                              "the file is incomplete, download it again.")
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype)
        return buf.view(dtype).reshape(shape)

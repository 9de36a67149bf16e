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
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Protocol

import torch

from .errors import DamagedFileError, MoefitError

DTYPES = {  # safetensors dtype code -> torch dtype
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """One safetensors file. Opening it reads and checks the header against the file's size (a truncated or
    garbage file fails here with a MoefitError naming it, never with a MemoryError or a struct error later)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                if size < 8:
                    self._bad(f"{size} bytes, too short to be a safetensors file (empty or truncated)")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    self._bad(f"the header claims {n} bytes but the file has {size} (truncated, or not safetensors)")
                header = json.loads(f.read(n))
        except OSError as e:
            raise MoefitError(f"{self.path}: cannot read it ({e.strerror or e}).") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._bad(f"the header is not valid JSON ({e}; truncated, or not safetensors)")
        if not isinstance(header, dict):
            self._bad("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        self.metadata = metadata if isinstance(metadata, dict) else {}
        self.header = header
        self.data_start = 8 + n
        for key in header:
            self._check_entry(key, size - self.data_start)

    def _bad(self, why: str) -> NoReturn:
        raise DamagedFileError(self.path, f"not a valid safetensors file: {why}",
                               "The file is damaged or incomplete; copy or download it again.")

    def _check_entry(self, key: str, data_size: int) -> None:
        info = self.header[key]
        try:
            shape, dtype, (start, end) = list(info["shape"]), info["dtype"], info["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, start, end)):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            self._bad(f"tensor {key!r} has a malformed header entry {info!r}")
        if dtype in DTYPES:
            want = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
            if end - start != want:
                self._bad(f"tensor {key!r} ({dtype} {shape}) needs {want} bytes, its offsets span {end - start}")
        if not start <= end <= data_size:
            self._bad(f"tensor {key!r} ends at byte {end} of {data_size} data bytes (the file is truncated)")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.header[key]["dtype"]
        if name not in DTYPES:
            raise MoefitError(f"{self.path}: tensor {key!r} has dtype {name}, which moefit cannot read.")
        return DTYPES[name]

    def nbytes(self, key: str) -> int:
        start, end = self.header[key]["data_offsets"]
        return end - start

    def read(self, key: str, index: int | None = None, rows: tuple[int, int] | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, or `tensor[index]` along its leading dimension, or `tensor[rows[0]:rows[1]]` (each read
        alone, not the whole tensor); into `out` (uint8, exactly `span_bytes` long) when given, else a fresh
        buffer."""
        shape, dtype, start, end = self._span(key, index, rows)
        buf = torch.empty(end - start, dtype=torch.uint8) if out is None else out
        if buf.numel() != end - start:
            raise ValueError(f"{key}: a buffer of {buf.numel()} bytes for {end - start}")
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

    def span_bytes(self, key: str, index: int | None = None, rows: tuple[int, int] | None = None) -> int:
        """How many bytes `read` with these arguments reads."""
        _, _, start, end = self._span(key, index, rows)
        return end - start

    def _span(self, key: str, index: int | None, rows: tuple[int, int] | None
              ) -> tuple[list[int], torch.dtype, int, int]:
        info = self.header[key]
        shape = list(info["shape"])
        dtype = self.dtype(key)
        start, end = info["data_offsets"]
        if index is not None or rows is not None:
            n = shape[0] if shape else 0
            lo, hi = (index, index + 1) if index is not None else rows
            if not 0 <= lo < hi <= n:
                raise IndexError(f"{key}: rows {lo}:{hi} out of range for {n} rows")
            row_bytes = (end - start) // n
            start, end = start + lo * row_bytes, start + hi * row_bytes
            if index is not None:
                shape.pop(0)
            else:
                shape[0] = hi - lo
        return shape, dtype, start, end


class CheckpointTensors:
    """The tensors of a checkpoint's files by key ({key: SafetensorsFile}), read one at a time (or one leading-dim
    slice). FP8 block-quantized weights (a `<key>_scale_inv` beside them) are read decoded, in fp32; their scale
    tensors are not tensors of their own (`is_scale`)."""

    def __init__(self, files: dict[str, SafetensorsFile], fp8_block: tuple[int, int] = (128, 128)):
        from .quant.fp8 import SCALE_SUFFIX

        self.files = files
        self.fp8_block = fp8_block
        self.suffix = SCALE_SUFFIX

    def is_scale(self, key: str) -> bool:
        return key.endswith(self.suffix) and key.removesuffix(self.suffix) in self.files

    def is_fp8(self, key: str) -> bool:
        return key + self.suffix in self.files

    def read(self, key: str, index: int | None = None, device: torch.device | str | None = None,
             staging: HostStagingLike | None = None) -> torch.Tensor:
        """The tensor (or its `index`-th leading slice), moved to `device` before an FP8 weight is decoded, so
        that the decoding runs there (the same values on any device: it is elementwise). `staging` (with a
        `device`): the bytes are read into its host buffer and copied from there (moefit.export.host_staging)."""
        t = self._read_to(key, index, device, staging)
        if self.is_fp8(key):
            from .quant.fp8 import dequantize_fp8_blocks

            t = dequantize_fp8_blocks(t, self._read_to(key + self.suffix, index, device, staging), self.fp8_block)
        return t

    def _read_to(self, key: str, index: int | None, device: torch.device | str | None,
                 staging: HostStagingLike | None) -> torch.Tensor:
        f = self.files[key]
        if device is None:
            return f.read(key, index)
        if staging is None:
            return f.read(key, index).to(device)
        return staging.to_device(lambda buf: f.read(key, index, out=buf), f.span_bytes(key, index),
                                 lambda: f.read(key, index), device)


class HostStagingLike(Protocol):
    """What CheckpointTensors.read needs of a staging area (moefit.export.host_staging.HostStaging)."""

    def to_device(self, read_into: Callable[[torch.Tensor], torch.Tensor], nbytes: int,
                  fallback: Callable[[], torch.Tensor], device: torch.device | str) -> torch.Tensor: ...

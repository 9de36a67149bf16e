"""Safetensors read and write with bounded memory: one tensor (or one expert slice) in host RAM at a time.

Reading uses plain file reads at the offsets in the header (no mmap: mapped pages would count against the
process as they are touched). Writing plans every shard's header up front from the tensors' shapes and dtypes,
then streams each tensor's bytes into place, so a shard is never assembled in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoefitError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """{name: TensorInfo}, metadata of one .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MoefitError(f"{path}: not a safetensors file (shorter than 8 bytes).")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoefitError(f"{path}: unreadable safetensors header ({e}).") from None
    meta = header.pop("__metadata__", {}) or {}
    infos = {}
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise MoefitError(f"{path}: tensor {name} has dtype {h['dtype']}, which moefit cannot read.")
        infos[name] = TensorInfo(path, h["dtype"], tuple(h["shape"]), 8 + n + h["data_offsets"][0])
    return infos, meta


class CheckpointReader:
    """Every tensor of a checkpoint directory (sharded or not), read on demand."""

    def __init__(self, model_dir: Path | None = None, files: list[Path] | None = None):
        from ..loading import safetensors_files

        self.tensors: dict[str, TensorInfo] = {}
        for path in files if files is not None else safetensors_files(Path(model_dir)):
            infos, _ = read_header(Path(path))
            self.tensors.update(infos)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or its `index`-th slice along the first dimension (one expert of a fused tensor)."""
        info = self.tensors[name]
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise IndexError(f"{name}: slice {index} out of range for shape {shape}")
            nbytes //= shape[0]
            start += index * nbytes
            shape = shape[1:]
        buf = bytearray(nbytes)
        with open(info.path, "rb") as f:
            f.seek(start)
            if f.readinto(buf) != nbytes:
                raise MoefitError(f"{info.path}: truncated file while reading {name}; is the download complete?")
        if nbytes == 0:
            return torch.empty(shape, dtype=DTYPES[info.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(shape)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, in order: a new shard starts when the next tensor would pass the limit (a larger tensor gets a
    shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def write_shard(path: Path, tensors: list[PlannedTensor], chunks: Iterable[tuple[str, torch.Tensor]],
                metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path`: the header first, then the bytes that `chunks` yields as (name, part) in order.
    A tensor may come in several parts (consecutive slices along its first dimension); each name's parts must add
    up to exactly its planned size."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    pos, written = -1, 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, part in chunks:
            if pos < 0 or name != tensors[pos].name:
                if pos >= 0 and written != tensors[pos].nbytes:
                    raise RuntimeError(f"{path}: {tensors[pos].name} got {written} of {tensors[pos].nbytes} bytes")
                pos, written = pos + 1, 0
                if pos >= len(tensors) or name != tensors[pos].name:
                    raise RuntimeError(f"{path}: got tensor {name!r} out of the planned order")
            t = tensors[pos]
            if part.dtype != DTYPES[t.dtype]:
                raise RuntimeError(f"{name}: planned {t.dtype}, got {part.dtype}")
            data = part.contiguous().view(torch.uint8).numpy().tobytes() if part.numel() else b""
            f.write(data)
            written += len(data)
            if written > t.nbytes:
                raise RuntimeError(f"{name}: wrote {written} bytes, planned {t.nbytes}")
        if pos != len(tensors) - 1 or (tensors and written != tensors[-1].nbytes):
            raise RuntimeError(f"{path}: incomplete shard ({pos + 1} of {len(tensors)} tensors written)")

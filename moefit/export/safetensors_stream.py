"""Safetensors read and write with bounded memory: one tensor (or one expert slice) in host RAM at a time.

Reading goes through moefit.safetensors_io (plain file reads, no mmap). Writing plans every shard's header up
front from the tensors' shapes and dtypes, then streams each tensor's bytes into place, so a shard is never
assembled in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoefitError
from ..safetensors_io import DTYPES, CheckpointTensors, SafetensorsFile

NAMES = {v: k for k, v in DTYPES.items()}


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    file: SafetensorsFile
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]


class CheckpointReader:
    """Every tensor of a checkpoint directory (sharded or not) or of the given files, read on demand with plain
    file reads (see moefit.safetensors_io). FP8 block-quantized weights are read decoded (fp32) with the scales
    beside them (`fp8_block`: the config's weight block); `is_scale` tells those scale tensors."""

    def __init__(self, model_dir: Path | None = None, files: list[Path] | None = None,
                 fp8_block: tuple[int, int] = (128, 128)):
        from ..loading import safetensors_files

        self.tensors: dict[str, TensorInfo] = {}
        for path in files if files is not None else safetensors_files(Path(model_dir)):
            f = SafetensorsFile(path)
            for key in f.keys():
                name = f.header[key]["dtype"]
                if name not in DTYPES:
                    raise MoefitError(f"{path}: tensor {key!r} has dtype {name}, which moefit cannot read.")
                self.tensors[key] = TensorInfo(f, name, f.shape(key))
        self._reads = CheckpointTensors({k: t.file for k, t in self.tensors.items()}, fp8_block)
        self.is_scale, self.is_fp8 = self._reads.is_scale, self._reads.is_fp8

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or its `index`-th slice along the first dimension (one expert of a fused tensor)."""
        return self._reads.read(name, index)


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


def write_shard(path: Path, tensors: list[PlannedTensor], parts: Mapping[str, Iterable[torch.Tensor]],
                metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path`: the header first, then each tensor's bytes as `parts[name]` yields them, in
    order. A tensor may come in several parts (consecutive slices along its first dimension, e.g. one expert at a
    time); they must add up to exactly its planned size. Only the part being written is referenced here."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            written = 0
            for part in parts[t.name]:
                if part.dtype != DTYPES[t.dtype]:
                    raise RuntimeError(f"{t.name}: planned {t.dtype}, got {part.dtype}")
                data = part.contiguous().reshape(-1).view(torch.uint8).numpy()  # the tensor's memory, no copy
                f.write(memoryview(data))
                written += data.nbytes
                del part, data  # before the next part is made: one part alive at a time
            if written != t.nbytes:
                raise RuntimeError(f"{path}: {t.name} got {written} of {t.nbytes} planned bytes")

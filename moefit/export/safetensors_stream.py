"""Safetensors read and write with bounded memory: a few pieces (a tensor, one expert slice or a run of rows) in
host RAM at a time, one for each worker.

Reading goes through moefit.safetensors_io (plain file reads, no mmap). Writing plans every shard's header up
front from the tensors' shapes and dtypes, so every piece's place in its file is known before any is made: the
pieces are made concurrently and each is written at its offset, and a shard is never assembled in memory.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoefitError
from ..safetensors_io import DTYPES, CheckpointTensors, HostStagingLike, SafetensorsFile

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

    def read(self, name: str, index: int | None = None, device: torch.device | None = None,
             staging: HostStagingLike | None = None) -> torch.Tensor:
        """The tensor, or its `index`-th slice along the first dimension (one expert of a fused tensor), on
        `device` (an FP8 weight is decoded there), through `staging`'s host buffer when given."""
        return self._reads.read(name, index, device, staging)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along the first dimension, as stored (an FP8 weight is not decoded)."""
        return self.tensors[name].file.read(name, rows=(start, stop))


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


def shard_header(tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header of a shard holding `tensors` in this order (length prefix included)."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class Piece:
    """The next `nbytes` bytes of a planned tensor: `make()` returns them as a CPU tensor of the planned dtype (the
    whole tensor, or a run of slices along its first dimension, e.g. one expert of a fused expert tensor). The
    tensor needs to stay valid only until the same thread makes its next piece (write_shards writes it first): it
    may be a view of the thread's reused host buffer (host_staging.py)."""

    nbytes: int
    make: Callable[[], torch.Tensor]


@dataclass
class WriteStats:
    bytes: int = 0
    seconds: float = 0.0  # wall time of write_shards
    make_s: float = 0.0  # summed over workers: producing the pieces (reading, merging, GPU transfers)
    write_s: float = 0.0  # summed over workers: copying the pieces' bytes into the shard files


@dataclass(frozen=True)
class _Job:
    shard: int
    offset: int  # where in the shard file its bytes go
    piece: Piece
    tensor: PlannedTensor


MAX_DEFAULT_WORKERS = 8  # `moefit export --help` says so (the CLI does not import torch to read it)


def default_workers() -> int:
    """The CPUs this process may use, at most MAX_DEFAULT_WORKERS: each worker holds one piece in memory."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


def write_shards(shards: list[tuple[Path, list[PlannedTensor]]], pieces: Mapping[str, Sequence[Piece]],
                 workers: int = 1, progress: Callable[[int, int], None] | None = None,
                 metadata: dict[str, str] | None = None, preallocate: bool = True) -> WriteStats:
    """Write every shard: its header, then each tensor's bytes, which `pieces[name]` make, in order; the pieces
    of a tensor must add up to exactly its planned size.

    Every piece's place in its file is known from the planned headers, so `workers` threads make pieces
    concurrently (in file order, at most `workers` in flight: host memory holds that many pieces, whatever the
    model size) and write each at its offset (os.pwrite). The bytes are the same for any number of workers:
    each piece is computed alone, and the worker threads use the caller's number of intra-op threads (a CPU
    reduction, e.g. the mean in NF4's double quantization, rounds differently with another thread count).
    `progress(done_bytes, total_bytes)` is called from the calling thread after each piece. `preallocate`: each
    shard file gets its whole size allocated when it is opened (see `preallocate_file`)."""
    jobs: list[_Job] = []
    headers: list[bytes] = []
    left = [0] * len(shards)  # pieces of each shard not yet written
    for i, (path, tensors) in enumerate(shards):
        headers.append(shard_header(tensors, metadata))
        pos = len(headers[-1])
        for t in tensors:
            parts = pieces[t.name]
            if not parts or sum(p.nbytes for p in parts) != t.nbytes:
                raise RuntimeError(f"{path}: {t.name} has pieces of {sum(p.nbytes for p in parts)} bytes, "
                                   f"planned {t.nbytes}")
            for p in parts:
                jobs.append(_Job(i, pos, p, t))
                pos += p.nbytes
                left[i] += 1
    stats = WriteStats()
    total = sum(j.piece.nbytes for j in jobs)
    fds: dict[int, int] = {}
    start = time.perf_counter()

    def fd_of(i: int) -> int:
        if i not in fds:
            fds[i] = os.open(shards[i][0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            if preallocate:
                preallocate_file(fds[i], len(headers[i]) + sum(t.nbytes for t in shards[i][1]))
            _write_at(fds[i], memoryview(headers[i]), 0)
        return fds[i]

    def finished(job: _Job, make_s: float, write_s: float) -> None:
        stats.bytes += job.piece.nbytes
        stats.make_s += make_s
        stats.write_s += write_s
        left[job.shard] -= 1
        if not left[job.shard]:
            os.close(fds.pop(job.shard))
        if progress is not None:
            progress(stats.bytes, total)

    try:
        if workers <= 1:
            for job in jobs:
                finished(job, *_run(job, fd_of(job.shard), shards[job.shard][0]))
        else:
            _run_parallel(jobs, workers, fd_of, finished, [path for path, _ in shards])
    finally:
        for fd in fds.values():
            os.close(fd)
    stats.seconds = time.perf_counter() - start
    return stats


def _run_parallel(jobs: list[_Job], workers: int, fd_of: Callable[[int], int],
                  finished: Callable[[_Job, float, float], None], paths: list[Path]) -> None:
    """`jobs` on `workers` threads, submitted in order with at most `workers` in flight; the first failure (or a
    Ctrl-C) cancels what has not started and is raised once the running pieces are done."""
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(workers, thread_name_prefix="moefit-export", initializer=torch.set_num_threads,
                            initargs=(threads,)) as pool:
        pending: dict[Future, _Job] = {}
        todo = iter(jobs)
        try:
            while True:
                while len(pending) < workers and (job := next(todo, None)) is not None:
                    pending[pool.submit(_run, job, fd_of(job.shard), paths[job.shard])] = job
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    job = pending.pop(f)
                    finished(job, *f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            wait(pending)
            raise


def _run(job: _Job, fd: int, path: Path) -> tuple[float, float]:
    """Make one piece and write it at its offset; (seconds making it, seconds writing it)."""
    t0 = time.perf_counter()
    part = job.piece.make()
    t1 = time.perf_counter()
    if part.dtype != DTYPES[job.tensor.dtype]:
        raise RuntimeError(f"{job.tensor.name}: planned {job.tensor.dtype}, got {part.dtype}")
    data = part.contiguous().reshape(-1).view(torch.uint8).numpy()  # the tensor's memory, no copy
    if data.nbytes != job.piece.nbytes:
        raise RuntimeError(f"{path}: {job.tensor.name} got {data.nbytes} of {job.piece.nbytes} planned bytes")
    _write_at(fd, memoryview(data), job.offset)
    return t1 - t0, time.perf_counter() - t1


def preallocate_file(fd: int, size: int) -> bool:
    """Allocate `size` bytes of the file's blocks up front (Linux fallocate, mode 0), where the file system can;
    True if it did. Worker threads writing at their offsets into one file otherwise extend it piece by piece, and
    on ext4 they then wait on each other: two threads writing one file reached 0.5-0.9 GB/s on a 2-core VM, 4.2 GB/s
    into a preallocated file (`benchmarks/shard_write_speed.py`). Never emulated by writing zeros (glibc's
    posix_fallocate does that where the file system has no fallocate): then nothing is done."""
    global _libc
    if size <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
        return _libc.fallocate(fd, 0, 0, size) == 0
    except (OSError, AttributeError):
        return False


_libc = None


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """All of `data` at `offset` (os.pwrite may write less than asked, e.g. past 2 GiB)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n

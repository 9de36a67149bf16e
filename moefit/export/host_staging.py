"""Page-locked host buffers for the GPU merge's copies: one per export worker thread, reused for every piece.

A piece's bytes cross host memory twice: read from the checkpoint and copied to the GPU, merged there, copied back
and written into the shard. Through a fresh pageable tensor each way, every piece's host memory is newly mapped
(a page fault per 4 KiB page on first touch) and every copy runs through the CUDA driver's own small pinned
bounce buffers, which the 8 worker threads share: their merges summed to 19 s in 3.3 s of wall time, 1.33 GB/s
(benchmarks/export_speed.md, sixteenth session; 2.63 GB/s with these buffers). Here each worker thread owns one
page-locked buffer of the largest piece's size: the checkpoint is read straight into it, copied to the GPU by
DMA, and the merged result comes back by DMA into the same buffer, from which it is written. Host memory is one
buffer per worker, as before one piece per worker, whatever the model size.

Reusing one buffer for a piece's reads and its result is safe because the copies are ordered on the thread's own
stream (thread_streams.py): every copy to the GPU from the buffer is queued before the copy back into it, and the
thread waits for the copy back before it writes the bytes and before its next piece reads into the buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
ALIGN = 64  # bytes: every region handed out starts at a multiple of this (any dtype can view it)


class HostStaging:
    """`capacity` bytes of page-locked host memory per worker thread of the export (allocated on a thread's first
    piece), handed out front to back within a piece (`inbound`) and from the front for its result (`outbound`).
    A read that does not fit what is left of the buffer gets None (the caller reads into pageable memory);
    a result larger than the buffer comes back through pageable memory."""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self._local = threading.local()
        self._buffers: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def _buffer(self) -> torch.Tensor:
        buf = getattr(self._local, "buffer", None)
        if buf is None:
            buf = self._local.buffer = page_locked(self.capacity)
            with self._lock:
                self._buffers.append(buf)
        return buf

    def wrap(self, make: Callable[[], T]) -> Callable[[], T]:
        """`make` (one piece) with this thread's buffer handed out from its start."""

        def with_staging() -> T:
            self._local.used = 0
            return make()

        return with_staging

    def inbound(self, nbytes: int) -> torch.Tensor | None:
        """`nbytes` of the calling thread's buffer not yet handed out in its current piece (uint8), or None."""
        start = -(-getattr(self._local, "used", 0) // ALIGN) * ALIGN
        if start + nbytes > self.capacity:
            return None
        self._local.used = start + nbytes
        return self._buffer()[start:start + nbytes]

    def to_device(self, read_into: Callable[[torch.Tensor], torch.Tensor], nbytes: int,
                  fallback: Callable[[], torch.Tensor], device: torch.device | str) -> torch.Tensor:
        """A tensor of `nbytes` read by `read_into(buffer)` (which returns the tensor viewing it) and copied to
        `device` without waiting; `fallback()` (read into pageable memory, then copied) when it does not fit or
        `device` is not this staging's (a read meant for host memory stays a tensor of its own)."""
        buf = self.inbound(nbytes) if torch.device(device) == self.device else None
        if buf is None:
            return fallback().to(device)
        return read_into(buf).to(device, non_blocking=True)

    def outbound(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (on the device) in host memory: a view of the calling thread's buffer, valid until its next piece."""
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cuda" or nbytes > self.capacity:
            return t.cpu()
        host = self._buffer()[:nbytes].view(t.dtype).view(t.shape)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return host

    def close(self) -> None:
        """Unlock and drop the buffers (after the last piece: no copy is in flight)."""
        with self._lock:
            buffers, self._buffers = self._buffers, []
        self._local = threading.local()
        for buf in buffers:
            unlock(buf)

    @property
    def allocated_bytes(self) -> int:
        with self._lock:
            return len(self._buffers) * self.capacity


_REGISTERED: set[int] = set()


def page_locked(nbytes: int) -> torch.Tensor:
    """`nbytes` of page-locked host memory (uint8), exactly that many: a plain tensor registered with CUDA
    (cudaHostRegister). torch's own pinned tensors come from its caching host allocator, which rounds each up to a
    power of two (a Scout expert slice of 168 MB would take 256 MB per worker) and keeps them for the process."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not torch.cuda.is_available():  # nothing to copy to by DMA: plain memory
        return buf
    if nbytes and int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0:
        _REGISTERED.add(buf.data_ptr())
        return buf
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:  # no page-locked memory to be had: the copies wait on pageable memory, as they did before
        return buf


def unlock(buf: torch.Tensor) -> None:
    """Undo page_locked's registration (a buffer from torch's pinned allocator goes back to it when freed)."""
    if buf.data_ptr() in _REGISTERED:
        _REGISTERED.discard(buf.data_ptr())
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())

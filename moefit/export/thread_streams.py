"""One CUDA stream per export worker thread.

The merge workers each copy a slice to the GPU, decode and merge it, and copy the result back. On the one default
stream every copy back (`.cpu()`, which waits for the stream) also waits for the other threads' copies and
kernels queued before it, so 8 threads merged about as fast as one (benchmarks/export_speed.md: the merge phase
summed over 8 threads took 7x its one-thread time). On a stream of its own a thread waits for its own work only,
and one thread's copies overlap another's kernels and copies the other way. Every tensor a piece makes on the GPU
is made, used and copied back on its thread's stream, and freed after that copy has finished (`.cpu()` waits).
The one exception, bitsandbytes' NF4 quantization (its kernels take no stream), is ordered with the thread's
stream by NF4Weight.quantize_ itself.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class ThreadStreams:
    """`wrap(fn)`: `fn` run on the calling thread's own stream of `device` (created on first use)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._local = threading.local()

    def stream(self) -> torch.cuda.Stream:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(self.device)
        return s

    def wrap(self, fn: Callable[[], T]) -> Callable[[], T]:
        @functools.wraps(fn)
        def on_own_stream() -> T:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream()):
                return fn()

        return on_own_stream


def on_thread_streams(pieces: dict, device: torch.device) -> dict:
    """The pieces (name -> list of safetensors_stream.Piece) with each `make` run on its worker thread's stream
    when `device` is a GPU; unchanged on the CPU."""
    if device.type != "cuda":
        return pieces
    from .safetensors_stream import Piece

    streams = ThreadStreams(device)
    return {name: [Piece(p.nbytes, streams.wrap(p.make)) for p in ps] for name, ps in pieces.items()}

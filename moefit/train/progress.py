"""Console output of a run: every message also goes to RUN/train.log; the progress line updates in place on a
terminal and is printed as plain lines (every `log_every` steps) otherwise."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import TextIO

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since the run started. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Console:
    """print() that tees into a log file; `status()` draws the in-place progress line on a terminal."""

    def __init__(self, log_path: Path | None, stream: TextIO | None = None, echo: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.echo = echo
        self.log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._status_len = 0

    def _clear_status(self) -> None:
        if self._status_len:
            self.stream.write("\r" + " " * self._status_len + "\r")
            self._status_len = 0

    def print(self, msg: str = "") -> None:
        if self.echo:
            self._clear_status()
            self.stream.write(msg + "\n")
            self.stream.flush()
        if self.log:
            self.log.write(msg + "\n")
            self.log.flush()

    def status(self, msg: str, permanent: bool) -> None:
        """On a terminal: redraw the line; elsewhere (and in the log) only the `permanent` ones are written."""
        if self.echo and self.tty:
            self._clear_status()
            self.stream.write(msg)
            self.stream.flush()
            self._status_len = len(msg)
        elif permanent and self.echo:
            self.stream.write(msg + "\n")
            self.stream.flush()
        if permanent and self.log:
            self.log.write(msg + "\n")
            self.log.flush()

    def close(self) -> None:
        if self.echo and self._status_len:
            self.stream.write("\n")
            self.stream.flush()
            self._status_len = 0
        if self.log:
            self.log.close()
            self.log = None


def progress_line(step: int, total: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float,
                  peak_bytes: int | list[int], eta_s: float | None) -> str:
    """`tokens_per_s` of the whole run (all ranks); `peak_bytes` one number, or one per rank (GPU)."""
    width = len(str(total))
    eta = f"  eta {fmt_duration(eta_s)}" if eta_s is not None else ""
    peaks = peak_bytes if isinstance(peak_bytes, list) else [peak_bytes]
    peak = fmt_bytes(peaks[0]) if len(peaks) == 1 else "[" + " ".join(f"{b / 2**30:.2f}" for b in peaks) + "] GiB"
    return (f"step {step:>{width}}/{total}  loss {loss:.4f}  lr {lr:.2e}  grad {grad_norm:.3f}  "
            f"{tokens_per_s:,.0f} tok/s  peak {peak}{eta}")

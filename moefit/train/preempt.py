"""Stopping on SIGTERM / SIGINT at the next optimizer-step boundary, with a complete checkpoint.

Spot and preemptible instances send SIGTERM 30-120 s before the machine goes; Ctrl-C sends SIGINT. The first
signal only sets a flag: the loop finishes the step it is in, saves a checkpoint and raises `Preempted`, which the
CLI turns into a message and exit code 128 + signal (143 for SIGTERM, 130 for SIGINT). A second signal stops at
once (KeyboardInterrupt) and leaves the newest periodic checkpoint; "second" means more than
`REPEAT_AFTER_S` later, because under a launcher (`--gpus`, torchrun) a Ctrl-C reaches each worker twice: from the
terminal and passed on by the launcher.

With several processes, each rank gets the signal at a slightly different moment (or only some get it);
`StopFlag.agreed(ctx)` all-reduces the flags so that every rank stops after the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..parallel import dist as pdist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_AFTER_S = 2.0


def _say(msg: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, msg.encode())


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopFlag:
    """Set by the signal handler; read by the loop at each optimizer-step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at = 0.0

    def handle(self, signum: int, frame: object) -> None:
        # A raw write: the handler may interrupt a print() to the same stream, and buffered streams are not
        # reentrant (a second print would raise RuntimeError inside the training step).
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self.at < REPEAT_AFTER_S:
                return  # the same request again (terminal and launcher both pass it on)
            _say(f"\n{name} again: stopping now, without a new checkpoint.\n")
            raise KeyboardInterrupt
        self.signum, self.at = signum, time.monotonic()
        _say(f"\n{name} received: finishing this optimizer step, then saving a checkpoint and stopping (send it "
             "again to stop at once).\n")

    def requested(self) -> bool:
        """This process has been asked to stop."""
        return self.signum is not None

    def agreed(self, ctx: pdist.DistContext = pdist.SINGLE) -> bool:
        """Whether every process stops after this step: one rank's request stops them all after the same step
        (with several ranks an all-reduce, so every rank must call it at the same step)."""
        if not ctx.enabled:
            return self.requested()
        return pdist.all_reduce_sum([float(self.requested())], ctx)[0] > 0

    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def preempted(self, step: int, checkpoint: Path | None, run_dir: Path) -> Preempted:
        """The exception that ends the run after `step`: where the work is and the command that continues it."""
        if checkpoint is None:
            msg = f"stopped by {self.name()} after step {step} (a smoke run keeps no checkpoint: run it again)."
        else:
            msg = (f"stopped by {self.name()} after step {step}; checkpoint {checkpoint}. Continue with: "
                   f"moefit train --resume {run_dir}")
        return Preempted(int(self.signum or signal.SIGTERM), msg)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install the handlers for the duration of a run (main thread only; elsewhere signals keep their defaults)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag.handle) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""`moefit train --gpus N`: start N worker processes on this host through torch's elastic launcher (what
`torchrun --standalone --nproc-per-node N -m moefit ...` runs), and turn a failed worker into one message.

When any worker ends with an error or dies (out of memory, kill -9), the launcher stops the others at once (no
restarts): a job never hangs on a collective waiting for a dead peer. A worker reports a moefit error through
torchelastic's error file (TORCHELASTIC_ERROR_FILE), which the launcher reads back to name the rank and the cause.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from ..errors import MoefitError
from .dist import NCCL_ENV

# How often the launcher checks its workers (s): a dead one stops the job within about this long plus the
# time the others take to exit on SIGTERM.
MONITOR_INTERVAL_S = 0.5
EXIT_WORKER_DIED = 3  # a worker process died (signal, crash) rather than reporting a moefit error


def worker_error_file() -> Path | None:
    """Where this worker reports its error to the launcher (set by torchelastic for each worker)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    return Path(path) if path else None


def report_worker_error(message: str) -> None:
    """Record `message` as this worker's failure for the launcher (torchelastic's error-file format)."""
    path = worker_error_file()
    if path is None:
        return
    body = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body), encoding="utf-8")


def _reported_message(failure) -> str | None:
    try:
        data = json.loads(Path(failure.error_file).read_text(encoding="utf-8"))
    except (OSError, TypeError, ValueError):
        return None
    msg = data.get("message")
    if isinstance(msg, dict):
        msg = msg.get("message")
    return msg if isinstance(msg, str) and msg and "Traceback" not in msg else None


def launch_workers(nproc: int, argv: list[str], command: str = "moefit train") -> int:
    """Run `python -m moefit ARGV` in `nproc` processes on this host (NCCL on GPUs, gloo on CPU); return the exit
    code of the job: 0 when every worker finished, else that of the first worker that failed (1 a failed smoke
    run, 2 a moefit error, EXIT_WORKER_DIED a crash or a signal)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    if nproc < 1:
        raise MoefitError(f"--gpus must be at least 1, got {nproc}.")
    if os.environ.get("WORLD_SIZE") and int(os.environ["WORLD_SIZE"]) > 1:
        raise MoefitError("this process is already one of several started by torchrun: drop --gpus (torchrun's "
                          "--nproc-per-node sets the number of processes).")
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(
        # torchrun --standalone: a rendezvous on this host at a free port
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", str(uuid.uuid4()),
         "--nproc-per-node", str(nproc), "--max-restarts", "0",
         "--monitor-interval", str(MONITOR_INTERVAL_S), "--module", "moefit", *argv])
    config, entrypoint, cmd_args = config_from_args(args)
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # its per-worker log lines are replaced by the message below
    try:
        elastic_launch(config=config, entrypoint=entrypoint)(*cmd_args)
    except SignalException as e:
        # SIGTERM / SIGINT to the launcher: it has passed the signal on to the workers and waited for them (they
        # save a checkpoint at the step boundary and rank 0 says how to resume: train/preempt.py).
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            return failure.exitcode  # stopped on a signal after a checkpoint; rank 0 said how to resume
        reported = _reported_message(failure)
        others = nproc - 1
        if reported is not None and failure.exitcode in (1, 2):
            # Rank 0 prints its own messages; another rank's is printed here unless rank 0 said the same.
            said_by_rank0 = 0 in e.failures and _reported_message(e.failures[0]) == reported
            if rank != 0 and not said_by_rank0:
                print(f"{command} (rank {rank}): {reported}", file=sys.stderr)
            return failure.exitcode
        cause = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                 else f"exited with code {failure.exitcode}")
        print(f"{command}: worker rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {cause}; "
              f"the other {others} worker(s) were stopped. Its own output above says why (an out-of-memory "
              "error, a kill). Resume with --resume RUN_DIR from the newest checkpoint.", file=sys.stderr)
        return EXIT_WORKER_DIED
    finally:
        elastic_log.setLevel(level)
    return 0

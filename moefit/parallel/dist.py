"""The process group of a multi-process run and the small collectives the trainer uses.

torchrun (and `moefit train --gpus N`) start one process per GPU with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment; `init_distributed` joins them: NCCL on CUDA,
gloo on CPU. A process started any other way is a world of one and nothing here communicates.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import MoefitError

# A collective that waits longer than this for a peer ends the process with an error instead of hanging. It has to
# cover the slowest skew between ranks: loading a 100 B model from a slow disk on one rank while another waits.
DEFAULT_TIMEOUT_S = 1800
# NVLink multicast (NVLS) is off on the machines this was measured on; keep it off in every process we start.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run: a world of one unless launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise MoefitError(f"environment variable {name}={raw!r} is not an integer (set by torchrun).") from None


def context_from_env() -> DistContext:
    """The ranks torchrun put in the environment (a world of one without them)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    return DistContext(rank=_env_int("RANK", 0), world_size=world, local_rank=_env_int("LOCAL_RANK", 0),
                       local_world_size=_env_int("LOCAL_WORLD_SIZE", world))


def current_context() -> DistContext:
    """The context of the initialized process group, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return context_from_env() if dist.get_world_size() > 1 else SINGLE
    return SINGLE


def init_distributed(device_type: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the run's process group (once per process); a world of one needs none. On CUDA each process
    takes the GPU of its local rank."""
    ctx = context_from_env()
    if not ctx.enabled:
        return SINGLE
    if device_type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise MoefitError(f"rank {ctx.rank} has local rank {ctx.local_rank} but this host has only "
                              f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes "
                              "per node (--gpus / --nproc-per-node).")
        torch.cuda.set_device(ctx.local_rank)
        for key, value in NCCL_ENV.items():
            os.environ.setdefault(key, value)
    if not dist.is_initialized():
        release_groups_at_shutdown()
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return ctx


@contextmanager
def process_group(device_type: str, timeout_s: int = DEFAULT_TIMEOUT_S) -> Iterator[DistContext]:
    """`init_distributed` for the block; at its end `shutdown_distributed` if the block started the group (a caller
    that joined it before keeps it)."""
    started = not current_context().enabled
    ctx = init_distributed(device_type, timeout_s)
    try:
        yield ctx
    finally:
        if started:
            shutdown_distributed()


def release_groups_at_shutdown() -> None:
    """Call before creating a process group. torch._dynamo, when first imported after a group exists (importing
    transformers' models, bitsandbytes or peft imports it), keeps that group alive past destroy_process_group
    (torch 2.13): its gloo threads then run on until the interpreter exits, and their teardown there now and then
    aborts a finished process ("terminate called without an active exception", exit -6: torchrun reports the run
    as failed). Imported first, the groups are released by `shutdown_distributed`
    (tests/test_dist_shutdown.py)."""
    import torch._dynamo  # noqa: F401


def shutdown_distributed() -> None:
    """Destroy every process group. Objects of the finished run that hold a group (a model's expert dispatch)
    and sit in reference cycles are collected first, so that no group outlives this (release_groups_at_shutdown)."""
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank's process is gone (gloo: the connection closed; NCCL: the
    communicator aborted or timed out), rather than through a bug of this one."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator",
                                   "Watchdog caught collective operation timeout", "Socket Timeout"))


def _device() -> torch.device:
    """The device NCCL collectives run on (the current CUDA device); CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_int(value: int, ctx: DistContext) -> list[int]:
    """Every rank's integer, in rank order, on every rank."""
    if not ctx.enabled:
        return [int(value)]
    t = torch.tensor([int(value)], dtype=torch.int64, device=_device())
    out = [torch.zeros_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]

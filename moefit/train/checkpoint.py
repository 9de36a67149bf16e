"""Checkpoints: written whole into a temporary folder, then renamed into place, so a kill never leaves a
half-written `step-N/` that `--resume` could pick.

A checkpoint holds everything the next step depends on: the adapter, the optimizer and scheduler state, every
RNG (python, numpy, torch CPU and CUDA: LoRA dropout draws from torch's), the data position and the counters.
With several data-parallel ranks the adapter and optimizer state are the same on every rank and rank 0 writes
them; each rank's RNG state is its own (`rng.pt` for rank 0, `rng-rank<R>.pt` for the others).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MoefitError
from .verify import write_manifest

COMPLETE = "complete"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Counters saved with a checkpoint (JSON)."""

    step: int
    data_epoch: int
    data_index: int
    tokens_seen: int
    label_tokens_seen: int
    elapsed_s: float
    train_time_s: float
    start_eval_loss: float | None
    world_size: int = 1  # data-parallel ranks that wrote it (checkpoints older than multi-GPU training: 1)
    expert_parallel: int = 1  # parallel.expert of the run that wrote it
    sequences_per_step: int | None = None  # batch_size x grad_accum x world_size


def capture_rng() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    checkpoints_dir: Path,
    state: TrainerState,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None = None,
    rank_rngs: list[dict[str, Any]] | None = None,
    identity: dict[str, Any] | None = None,
    adapter_state: dict[str, torch.Tensor] | None = None,
    rank_optimizers: list[dict[str, Any]] | None = None,
) -> Path:
    """Write `checkpoints_dir/step-N/` atomically and return its path. `rank_rngs`: every data-parallel rank's
    `capture_rng()`, in rank order (default: this process's). `identity` (verify.run_identity) goes into the
    manifest with every file's checksum. Expert parallelism: `adapter_state` is the whole model's LoRA (the
    adapter holds every expert, as a one-GPU run's does) and `rank_optimizers` every rank's optimizer state."""
    from ..lora import save_adapter

    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{state.step}"
    tmp = checkpoints_dir / f".tmp-step-{state.step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_adapter(model, tmp, state=adapter_state)
    for rank, opt_state in enumerate(rank_optimizers or [optimizer.state_dict()]):
        torch.save(opt_state, tmp / optimizer_file(rank))
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for rank, rng in enumerate(rank_rngs or [capture_rng()]):
        torch.save(rng, tmp / rng_file(rank))
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state.__dict__, indent=2), encoding="utf-8")
    write_manifest(tmp, identity)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / COMPLETE).write_text(f"step {state.step}\n", encoding="utf-8")
    _fsync_dir(tmp)
    if final.exists():  # re-running a step after resuming from an older checkpoint: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(checkpoints_dir)
    return final


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def optimizer_file(rank: int) -> str:
    """Each rank's optimizer state when they differ (expert parallelism); rank 0's (all of them in data
    parallelism) is optimizer.pt."""
    return "optimizer.pt" if rank == 0 else f"optimizer-rank{rank}.pt"


def read_trainer_state(checkpoint: Path) -> TrainerState:
    path = checkpoint / "trainer_state.json"
    try:
        return TrainerState(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise MoefitError(f"cannot resume from {checkpoint}: {path.name} cannot be read ({type(e).__name__}). "
                          f"Resume from an older checkpoint (--resume {checkpoint.parent}/step-N) or start again "
                          "with --overwrite.") from None


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary and unmarked folders (a kill mid-write) are ignored."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for p in checkpoints_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and leftover temporary folders; return removed."""
    removed = []
    for _, path in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(path)
        removed.append(path)
    for p in checkpoints_dir.glob(".tmp-step-*"):
        shutil.rmtree(p)
        removed.append(p)
    return removed


def resolve_resume(resume: str | Path | bool, run_dir: Path | None) -> Path:
    """The checkpoint to continue from: `resume` is True (newest in `run_dir`), a run dir, or a step dir."""
    if resume is True:
        if run_dir is None:
            raise MoefitError("--resume needs to know which run to continue: pass --output-dir RUN_DIR "
                              "or --resume RUN_DIR.")
        base = run_dir
    else:
        base = Path(resume)
    if not base.exists():
        raise MoefitError(f"cannot resume: {base} does not exist.")
    if (base / COMPLETE).is_file():
        return base
    if _STEP_DIR.match(base.name) and base.is_dir():
        raise MoefitError(f"cannot resume from {base}: the checkpoint is incomplete (no '{COMPLETE}' marker; "
                          "the run was stopped while writing it). Resume from the run folder to use the newest "
                          "complete checkpoint.")
    ckpt = latest_checkpoint(base / "checkpoints")
    if ckpt is None:
        raise MoefitError(f"cannot resume: {base} holds no complete checkpoint (looked in {base / 'checkpoints'}). "
                          "Start the run again without --resume, or lower train.save_every.")
    return ckpt


def run_dir_of(checkpoint: Path) -> Path:
    """RUN/checkpoints/step-N -> RUN."""
    return checkpoint.parent.parent


def load_checkpoint(
    checkpoint: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any | None = None,
    rank: int = 0,
) -> tuple[TrainerState, bool]:
    """Load everything back into the live objects; RNG last, so nothing after it draws before training resumes.
    Returns the state and whether this rank's RNG state was in the checkpoint (a run resumed on more ranks than
    wrote it has none for the new ones: the caller seeds them). A file that cannot be read is a MoefitError
    naming the checkpoint (never a traceback)."""
    try:
        return _load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, rank)
    except MoefitError:
        raise
    except Exception as e:  # truncated or foreign files: torch, safetensors and json each raise their own kind
        raise MoefitError(f"cannot resume from {checkpoint}: a file cannot be read ({type(e).__name__}: "
                          f"{str(e)[:200]}). Resume from an older checkpoint (--resume {checkpoint.parent}/step-N) "
                          "or start again with --overwrite.") from None


def _load_checkpoint(
    checkpoint: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any | None, rank: int,
) -> tuple[TrainerState, bool]:
    from safetensors.torch import load_file

    from ..lora import ADAPTER_WEIGHTS, load_lora_state_dict
    from ..parallel.expert_parallel import local_lora_state

    # The adapter holds every expert; a rank holding a slice of them takes its own (checks names and shapes).
    load_lora_state_dict(model, local_lora_state(model, load_file(str(checkpoint / ADAPTER_WEIGHTS))))
    opt_path = checkpoint / optimizer_file(rank)
    if not opt_path.is_file():
        opt_path = checkpoint / "optimizer.pt"  # data parallelism: the same state on every rank
    optimizer.load_state_dict(torch.load(opt_path, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    if scaler is not None and (checkpoint / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=True))
    state = read_trainer_state(checkpoint)
    rng_path = checkpoint / rng_file(rank)
    if not rng_path.is_file():
        return state, False
    restore_rng(torch.load(rng_path, weights_only=True))
    return state, True

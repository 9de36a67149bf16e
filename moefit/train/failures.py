"""What the user reads when a run fails in a way a setting can fix: a NaN/inf loss or a CUDA out-of-memory error.

Both say where the last good checkpoint is (the loop never saves after a non-finite step) and how to go on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import RunConfig, TrainConfig
from . import checkpoint as ckpt
from .progress import fmt_bytes


def non_finite(loss: float, grad_norm: float) -> str | None:
    """'training loss became nan' / 'gradient norm became inf' for a non-finite step, else None."""
    if not math.isfinite(loss):
        return f"training loss became {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm became {grad_norm}"
    return None


def _continue_hint(run_dir: Path, change: str) -> str:
    newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if newest is None:
        return f"No checkpoint was saved yet: start again with --overwrite {change}."
    return (f"The last good checkpoint is {newest} (nothing was saved after the failure): continue with "
            f"moefit train --resume {run_dir} {change}.")


def nan_message(what: str, step: int, t: TrainConfig, run_dir: Path) -> str:
    fp16 = " or precision bf16 instead of fp16" if t.precision == "fp16" else ""
    clip = "" if t.max_grad_norm > 0 else ", set train.max_grad_norm to 1.0 (now 0: no clipping)"
    return (f"the {what} at step {step}: training stopped. Try a lower train.lr (now {t.lr:g}){clip}{fp16}, or "
            f"check the data around that step. " + _continue_hint(run_dir, f"--set train.lr={t.lr / 4:g}"))


def _plan_for(cfg: RunConfig) -> tuple[Any, int, str] | None:
    """(plan, GPU memory, GPU name) on this CUDA device, or None off CUDA or when the planner cannot say."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from ..plan import check_fits

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return check_fits(cfg, gpu=cfg.plan.gpu, gpu_memory_bytes=props.total_memory), props.total_memory, props.name
    except Exception:  # the message must come out even if the planner cannot model this model
        return None


def oom_message(cfg: RunConfig, run_dir: Path, planned: tuple[Any, int, str] | None = None) -> str:
    """The CUDA out-of-memory error: the plan's numbers next to the measured peak, and what to change."""
    import torch

    planned = planned or _plan_for(cfg)
    t, lo, q = cfg.train, cfg.lora, cfg.quantization
    numbers = ""
    if planned is not None:
        plan, total, name = planned
        numbers = (f" The plan for this run predicts {fmt_bytes(plan.memory.needed)} on the GPU (peak allocated "
                   f"{fmt_bytes(plan.memory.peak_allocated)}) of {fmt_bytes(total)} on this {name}")
        if torch.cuda.is_available():
            numbers += f"; measured peak before the error {fmt_bytes(torch.cuda.max_memory_allocated())}"
        numbers += "."
    changes = [f"lower train.batch_size (now {t.batch_size}; raise train.grad_accum to keep the effective batch)",
               f"lower train.max_length (now {t.max_length})",
               f"lower lora.expert_r (now {lo.expert_r if lo.expert_r is not None else lo.r})"]
    if not t.gradient_checkpointing:
        changes.append("set train.gradient_checkpointing: true (now false)")
    if t.keep_routed_gate_up:
        changes.append("set train.keep_routed_gate_up: false")
    if t.gradient_checkpointing and not t.offload_checkpoints:
        changes.append("set train.offload_checkpoints: true (the layers' saved inputs in host memory)")
    if not q.embeddings_on_host:
        changes.append("set quantization.embeddings_on_host: true")
    return (f"CUDA ran out of GPU memory.{numbers} To fit: " + "; ".join(changes) + " (`moefit plan` shows the "
            "breakdown). " + _continue_hint(run_dir, "--set KEY=VALUE"))

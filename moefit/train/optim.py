"""Optimizer over the LoRA parameters and the learning-rate schedule (warmup, then cosine / linear / constant)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import TrainConfig


def build_optimizer(
    params: dict[str, torch.nn.Parameter],
    cfg: TrainConfig,
    device: torch.device,
    note: Callable[[str], None] = print,
) -> torch.optim.Optimizer:
    """AdamW (8-bit, paged 8-bit or plain torch) over the trainable parameters only.

    Weight decay applies to the LoRA matrices (2-D and up); anything 1-D that is trainable (a bias, a norm
    scale) is left undecayed, as usual.
    """
    named = sorted(((n, p) for n, p in params.items() if p.requires_grad), key=lambda kv: kv[0])
    if not named:
        raise RuntimeError("no trainable parameters: add_lora returned nothing to train")
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    kind = cfg.optimizer
    if kind == "paged_adamw_8bit" and device.type != "cuda":
        note("note: train.optimizer paged_adamw_8bit pages optimizer state through CUDA unified memory; "
             "on CPU it is the same as adamw_8bit, which is used instead.")
        kind = "adamw_8bit"
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based: the step about to be taken).

    Warmup rises linearly to 1 over `warmup_steps` steps (the first step already uses 1/warmup); then the
    factor decays from 1 to `min_lr_ratio` at the last step (cosine or linear), or stays at 1 (constant).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 1:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (decay_steps - 1))
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, warmup_steps: int | None = None,
    kind: str | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (last_epoch) is checkpointed with the run; `kind`/`warmup_steps` override cfg."""
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    shape = cfg.scheduler if kind is None else kind
    ratio = cfg.min_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, shape, ratio)
    )


def steps_per_epoch(num_examples: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: each takes batch_size x grad_accum x world_size sequences."""
    return max(1, math.ceil(num_examples / (batch_size * grad_accum * world_size)))


def total_optimizer_steps(cfg: TrainConfig, num_examples: int, world_size: int = 1) -> int:
    """`train.max_steps` when set, else epochs × optimizer steps per epoch (rounded up, at least 1)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(num_examples, cfg.batch_size, cfg.grad_accum,
                                                         world_size)))

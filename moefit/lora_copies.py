"""The compute-dtype copies of LoRA weights, made once per optimizer step instead of once per pass
(`engine.lora_cast_cache`, on by default).

The LoRA weights are kept in fp32 (`lora.dtype`) and the matmuls run in bf16, so each adapted projection casts
its A and B in the forward and again in the recomputation of every micro-step: two kernel launches each time, 14 of
a Llama 4 layer's ~125 forward launches (attention q/k/v/o and the shared expert's gate/up/down), 16 times per
optimizer step at grad_accum 8, though the weights change only at the optimizer step. At micro-batch 1 the host's
launches set the pace. With the setting on, a copy is kept with its weight and made again only when the weight may
have changed: its version counter moved (any in-place torch op: a checkpoint loaded, a test's `copy_`), its
storage was replaced, or any optimizer stepped (bitsandbytes' 8-bit AdamW writes the weights without moving their
version counter: checked on bitsandbytes 0.50.2, so every optimizer step counts as a change, through torch's
global optimizer-step hook). Costs one bf16 copy of those weights held for the run (Scout, r=32: 224 MB). The
routed experts' LoRA banks (ten times larger) are not cached.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import engine_switches
from .devices import in_graph_capture
from .moe.grouped import cast_copy

_ATTR = "_moefit_compute_copy"
_optimizer_steps = 0
_hook = None


def _count_step(*_args) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _install() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_count_step)


def invalidate() -> None:
    """Every copy made so far is stale: for writes to the weights that neither move their version counters nor
    come from an optimizer step (a collective such as data parallelism's broadcast of rank 0's weights at
    construction)."""
    _count_step()


def compute_copy(weight: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """`weight` (times `scale`, in the same kernel) in `dtype`; with engine.lora_cast_cache the copy is kept with
    the weight until it may have changed. The same bits either way."""
    if not engine_switches.current().lora_cast_cache or (weight.dtype == dtype and scale is None):
        return _fresh(weight, dtype, scale)
    if in_graph_capture(weight):  # the graph casts the weight itself, on every replay
        return _fresh(weight, dtype, scale)
    _install()
    key = (weight._version, weight.data_ptr(), _optimizer_steps, dtype, scale)
    held = weight.__dict__.get(_ATTR)
    if held is not None and held[0] == key:
        return held[1]
    copy = _fresh(weight, dtype, scale)
    weight.__dict__[_ATTR] = (key, copy)
    return copy


def _fresh(weight: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
    with torch.no_grad():
        return cast_copy(weight, dtype, scale)

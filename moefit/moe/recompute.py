"""Knowing, inside a module, whether the forward pass is a checkpointed layer's first pass or its recomputation.

With activation checkpointing, backward re-runs a layer's forward only to rebuild the tensors its backward needs.
`torch.utils.checkpoint` runs the first pass and the recomputation under the two context managers that
`context_fn` returns; moefit's modules ask which one is active:

- `recomputing()`: the frozen matmul that produces an MoE layer's output (the routed and shared experts' down
  projections, whose dequantized weight is its whole cost) saves nothing for backward, and its result only flows
  into the residual sum, which the recomputation throws away: skip it. (Their LoRA still runs: backward reads its
  saved inputs.)
- `keep()` / `kept()` (`MoefitExperts.keep_gate_up`, set by `enable_gradient_checkpointing`): the routed experts'
  frozen gate/up outputs are kept from the first pass and handed to the recomputation instead of being computed
  again (two fewer expert-bank decodes and grouped GEMMs per layer and micro-step, for T x top_k x intermediate x
  2 x 2 bytes per layer held until backward).
  What is kept belongs to one checkpoint call (one layer, one forward), so several forwards before a backward
  never mix.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from .. import engine_switches

_state = threading.local()


def recomputing() -> bool:
    return getattr(_state, "phase", None) == "recompute"


def keep(key: object, tensor: torch.Tensor) -> None:
    """In a checkpointed layer's first pass: hold `tensor` (detached) for that layer's recomputation."""
    if getattr(_state, "phase", None) == "forward":
        _state.frame.setdefault(key, []).append(tensor.detach())


def kept(key: object) -> torch.Tensor | None:
    """In the recomputation: the next tensor kept under `key` by the same checkpoint call's first pass."""
    if not recomputing():
        return None
    queue = _state.frame.get(key)
    return queue.pop(0) if queue else None


@contextlib.contextmanager
def _phase(phase: str, frame: dict) -> Iterator[None]:
    previous = getattr(_state, "phase", None), getattr(_state, "frame", None)
    _state.phase, _state.frame = phase, frame
    try:
        yield
    finally:
        _state.phase, _state.frame = previous


class _Discarded(torch.autograd.Function):
    """Zeros standing in for a skipped projection's output. Like the frozen matmul it replaces, the result requires
    grad exactly when the input does and nothing is saved: the recomputation must save the same tensors as the
    original forward (torch.utils.checkpoint checks the count), e.g. the routed rows' index in the combine."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, width: int) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # never reached: checkpoint discards the recomputed graph
        return None, None


def discarded_output(x: torch.Tensor, width: int) -> torch.Tensor:
    """The placeholder for a projection of `x` to `width` features skipped during recomputation."""
    return _Discarded.apply(x, width)


def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """For `torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=context_fn)`.
    `engine.recompute_skip: false` turns the shortcuts off (A/B runs)."""
    if not engine_switches.current().recompute_skip:
        return contextlib.nullcontext(), contextlib.nullcontext()
    frame: dict = {}  # what this checkpoint call's first pass keeps for its recomputation
    return _phase("forward", frame), _phase("recompute", frame)

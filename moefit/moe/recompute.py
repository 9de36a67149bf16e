"""Knowing, inside a module, whether the forward pass is a checkpointed layer's first pass or its recomputation.

With activation checkpointing, backward re-runs a layer's forward only to rebuild the tensors its backward needs.
`torch.utils.checkpoint` runs the first pass and the recomputation under the two context managers that
`context_fn` returns; moefit's modules ask which one is active:

- `recomputing()`: the frozen matmul that produces an MoE layer's output (the routed and shared experts' down
  projections, whose dequantized weight is its whole cost) saves nothing for backward, and its result only flows
  into the residual sum, which the recomputation throws away: skip it. (Their LoRA still runs: backward reads its
  saved inputs.) The skipped node's forward gives zeros, its backward is the real one (the input gradient through
  the frozen weight): torch's checkpoint discards the recomputed graph, but a recomputation that is itself
  backpropagated (models.layer_graphs) needs it.
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


def phases(frame: dict) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(first pass, recomputation) of one checkpointed call; `frame` holds what the first pass keeps for the
    recomputation. `engine.recompute_skip: false` turns the shortcuts off (A/B runs)."""
    if not engine_switches.current().recompute_skip:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return _phase("forward", frame), _phase("recompute", frame)


def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """For `torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=context_fn)`."""
    return phases({})

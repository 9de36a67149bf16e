"""Knowing, inside a module, that the forward pass is the recomputation of a checkpointed decoder layer.

With activation checkpointing, backward re-runs a layer's forward only to rebuild the tensors its backward needs.
The frozen matmul that produces an MoE layer's output (the routed and shared experts' down projections, whose
dequantized weight is its whole cost) saves nothing for backward, and its result only flows into the residual
sum, which the recomputation throws away. `torch.utils.checkpoint` runs the recomputation under the second
context manager that `context_fn` returns; modules ask `recomputing()` and skip that matmul. (Routed experts'
LoRA on the down projection still runs: its saved inputs are needed.)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


def recomputing() -> bool:
    return getattr(_state, "active", False)


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    previous = recomputing()
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous


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
    MOEFIT_RECOMPUTE_SKIP=0 turns the shortcut off (A/B runs)."""
    if os.environ.get("MOEFIT_RECOMPUTE_SKIP", "1") == "0":
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), _recomputation()

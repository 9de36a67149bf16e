"""Whether a batch packs several samples per row, decided from position ids in host memory: no device sync.

transformers decides it from the position ids on the GPU (`masking_utils.find_packed_sequence_indices` reads
back "is any row packed?"), once per attention mask built, i.e. once or twice per forward. That read waits for
all the work queued before it: at the start of a micro-step's forward it drains the GPU's queue (the previous
backward), and the GPU then idles while the host queues the next layers. moefit's data pipeline builds the
position ids on the host anyway, so `MoefitCausalLM.forward` takes them there, answers the question on the host
and copies them without waiting. Inside that forward transformers' check (and the sink attention's) use the host
answer; elsewhere, or for position ids already on the GPU, they run as before. The masks are the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HostPositions:
    """The position ids [B, T] of the current forward in host memory; None: the model's own 0..T-1 per row."""

    ids: torch.Tensor | None
    shape: tuple[int, int]
    # Build the masks the packed way even where no row packs several samples: the same masks (one sample per row
    # gives the causal mask), one kind of them, so that the layers' CUDA graphs (models.layer_graphs) replay one
    # graph for packed and unpacked batches alike
    as_packed: bool = False

    def restarts_inside_a_row(self) -> bool:
        """Some row holds several samples (its positions restart at 0): the sink attention's criterion."""
        return self.ids is not None and (self.as_packed or bool((self.ids[:, 1:] == 0).any()))

    def breaks_inside_a_row(self) -> bool:
        """Some row has consecutive positions not one apart: transformers' criterion for packed rows."""
        return self.ids is not None and (self.as_packed or bool((self.ids[:, 1:] - self.ids[:, :-1] != 1).any()))


_CURRENT: contextvars.ContextVar[HostPositions | None] = contextvars.ContextVar("moefit_host_positions",
                                                                                default=None)


def this_forward() -> HostPositions | None:
    """The host answer of the forward running now, whatever position ids a module was handed."""
    return _CURRENT.get()


def current(position_ids: torch.Tensor | None) -> HostPositions | None:
    """The host answer for `position_ids` (the tensor a layer or mask builder was handed), if this forward has
    one and the shapes agree; None: decide on the device as before."""
    known = _CURRENT.get()
    if known is None or position_ids is None:
        return None
    rows, tokens = position_ids.reshape(-1, position_ids.shape[-1]).shape
    if tokens != known.shape[1]:
        return None
    # transformers' own positions are one row [1, T] when none were given (expanded later for the masks)
    same = rows == known.shape[0] or (rows == 1 and known.ids is None)
    return known if same else None


def known(position_ids: torch.Tensor | None, shape: tuple[int, int], as_packed: bool = False
          ) -> contextlib.AbstractContextManager:
    """Within the block, mask builders use these host-memory position ids (None: each row 0..T-1) of a batch of
    `shape` (rows, tokens) instead of reading the device's copy back; `as_packed`: HostPositions.as_packed."""
    if position_ids is not None and position_ids.device.type != "cpu":
        raise ValueError("host_positions.known takes position ids in host memory")
    return restored(HostPositions(position_ids, shape, as_packed))


@contextlib.contextmanager
def restored(answer: HostPositions | None) -> Iterator[None]:
    """Within the block, `answer` is the host answer (`known`'s, or an earlier forward's from this_forward again:
    for the recomputation of a layer in backward, which runs after that forward's `known` block has closed)."""
    token = _CURRENT.set(answer)
    try:
        yield
    finally:
        _CURRENT.reset(token)


_stock = None  # transformers' own check, kept for position ids this module knows nothing about


def find_packed_sequence_indices(position_ids: torch.Tensor) -> torch.Tensor | None:
    """transformers' `masking_utils.find_packed_sequence_indices` with the host answer when there is one: None
    for rows that are one sample each, else each token's sample index in its row (computed on the device, as
    transformers does, but without reading anything back)."""
    known_here = current(position_ids)
    if known_here is None:
        return _stock(position_ids)
    if not known_here.breaks_inside_a_row():
        return None
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def install() -> None:
    """Route transformers' packed-rows check through the host answer when there is one (idempotent)."""
    global _stock
    from transformers import masking_utils

    if masking_utils.find_packed_sequence_indices is find_packed_sequence_indices:
        return
    _stock = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices

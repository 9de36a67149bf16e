"""Python's cyclic garbage collector kept off the model while a training loop runs (`gc.freeze`).

A training process holds hundreds of thousands of Python objects that live as long as it does (~450,000 tracked
by the collector once torch, transformers and bitsandbytes are imported and a model is built; Llama 4 Scout's 48
layers add ~30,000: modules, parameters, NF4 weights, their dicts). Each micro-step allocates enough (autograd
nodes, saved tensors, containers) that the collector runs a full collection every few micro-steps, and a full
collection walks every one of those objects: up to 0.27 s each on the CPU measured
(`benchmarks/gc_pauses.md`), during which the host issues no kernels. At micro-batch 1 the host sets the pace, so
the pause lands on the step. Freezing what is alive when the loop starts moves it to the collector's permanent
generation: it is still freed by reference counting, only no longer traversed; the loop's own garbage is
collected as before. Objects are unfrozen when the loop ends (frozen objects are not released at interpreter exit,
which some extension modules report as leaks).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def frozen_heap(enabled: bool = True) -> Iterator[None]:
    """Within the block, the objects alive at its start are out of the cyclic collector's reach. A no-op when
    disabled or when something else has frozen objects already (that freeze is its owner's to undo)."""
    if not enabled or gc.get_freeze_count():
        yield
        return
    gc.collect()  # what is garbage already is collected, not frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

"""Standing in for a checkpointed layer's checkpoint function (transformers' `_gradient_checkpointing_func`, set
on each module by enabling gradient checkpointing). The layer graphs (models.layer_graphs) and the offloaded
checkpoints (models.offload) each wrap it; a wrapper keeps the function it stands in for as `.fallback`, so either
can be installed over the other and removed again."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn


def plain(func: Callable) -> Callable:
    """The checkpoint function under every wrapper of `func` (torch's, as transformers set it)."""
    while hasattr(func, "fallback"):
        func = func.fallback
    return func


def checkpointed_modules(model: nn.Module) -> Iterator[tuple[nn.Module, Callable]]:
    """Each module of `model` that has a checkpoint function, with that function unwrapped (`plain`)."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None:
            yield module, plain(func)


def restore(model: nn.Module, wrapper: type) -> None:
    """Give every module of `model` whose checkpoint function is a `wrapper` the function it stood in for."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(func, wrapper):
            module._gradient_checkpointing_func = func.fallback

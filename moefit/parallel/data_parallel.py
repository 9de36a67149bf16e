"""Data parallelism: every rank holds the whole (NF4) model, takes its share of each optimizer step's sequences,
and only the LoRA gradients are summed over the ranks.

The gradient of a step is that of the mean loss over all label tokens of the step on every rank. Every rank reads
the same global stream of micro-batches (the data order does not depend on the number of ranks) and knows the
label-token count of the whole step without a collective: it sees every micro-batch of the step and trains only
its own. The loss of each micro-batch is divided by that global count, and the ranks' gradients are *summed*,
so N GPUs with grad_accum A give the gradient of one GPU with grad_accum N x A, and resuming on another number
of GPUs with the same sequences per step continues the same data order.

The sum is one all-reduce per optimizer step, after the last micro-step's backward (`grad_sync`), of flat buffers
the LoRA gradients are views of, not DistributedDataParallel: DDP reduces from autograd's gradient-accumulation
hooks, which a backward replayed from a CUDA graph (engine.backward_graphs) does not run, so under DDP the backward
had to stay eager (2,363 against 2,534 tok/s on the seed step, H200). DDP as it was set up here did not overlap the
reduction with the backward either (its buckets kept the parameters' order, so it started when the backward reached
the first layer): the same communication, at the same point.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import lora_copies
from ..data.dataset import batch_tokens
from .dist import DistContext


@dataclass
class StepBatches:
    """One optimizer step as this rank sees it."""

    mine: list[dict[str, torch.Tensor]]  # this rank's micro-batches, in order
    mine_label_tokens: list[int]  # the label tokens of each of them
    label_tokens: int  # label tokens of the whole step, all ranks
    tokens: int  # input tokens of the whole step, all ranks (the data's: padding not counted)
    position: Any  # the data position after the step (the same on every rank)


def take_step(batches: Iterator[tuple[dict[str, torch.Tensor], Any]], grad_accum: int, ctx: DistContext,
              count_labels: Callable[[torch.Tensor], int]) -> StepBatches:
    """The next `grad_accum x world_size` micro-batches of the global stream; rank r trains the r-th block of
    `grad_accum` of them."""
    step = [next(batches) for _ in range(grad_accum * ctx.world_size)]
    counts = [count_labels(b["labels"]) for b, _ in step]
    first = ctx.rank * grad_accum
    return StepBatches(mine=[b for b, _ in step[first:first + grad_accum]],
                       mine_label_tokens=counts[first:first + grad_accum], label_tokens=sum(counts),
                       tokens=sum(batch_tokens(b) for b, _ in step), position=step[-1][1])


class SummedLoraGradients:
    """A model whose trainable (LoRA) parameters' gradients are summed over the ranks by `reduce`.

    At construction rank 0's LoRA weights are broadcast (the ranks start equal whatever their initialisation), and
    every gradient becomes a view of one flat buffer per dtype and device, allocated now while the model holds only
    its weights: accumulation (autograd's, or a replayed backward's) adds into the views in place, and keeping
    them (the optimizer's `zero_grad(set_to_none=False)`) keeps them views. The frozen NF4 weights and buffers are
    left out: every rank loads the same weights, they are never broadcast (100 GB on a large model) and may live
    on another device (the input embedding in host memory)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.module = model
        for p in params:
            dist.broadcast(p.data, src=0)
        lora_copies.invalidate()  # rank 0's weights written in place: any compute copy is stale
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        self.buffers: list[torch.Tensor] = []
        for (dtype, device), ps in groups.items():
            flat = torch.zeros(sum(p.numel() for p in ps), dtype=dtype, device=device)
            offset = 0
            for p in ps:
                view = flat[offset:offset + p.numel()].view_as(p)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                offset += p.numel()
            self.buffers.append(flat)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def reduce(self) -> None:
        """Every rank's gradients summed, on every rank (after the step's last backward)."""
        for flat in self.buffers:
            dist.all_reduce(flat)


def wrap_model(model: nn.Module, ctx: DistContext, exclude: set[int] | None = None) -> nn.Module | SummedLoraGradients:
    """The model as data parallelism trains it: its trainable (LoRA) parameters' gradients summed over the ranks
    (SummedLoraGradients), the model itself on one process or when nothing is left to sum."""
    exclude = exclude or set()  # ids of trainable parameters reduced elsewhere (expert parallelism's experts)
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in exclude]
    if not ctx.enabled or not params:
        return model
    return SummedLoraGradients(model, params)


def grad_sync(wrapped: nn.Module | SummedLoraGradients, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-step's forward and backward: with `sync` (the optimizer step's last micro-step) the ranks'
    gradients are summed when it ends; the other micro-steps only accumulate locally, as does a plain model."""
    if sync and isinstance(wrapped, SummedLoraGradients):
        return _reduced_after(wrapped)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _reduced_after(wrapped: SummedLoraGradients) -> Iterator[None]:
    yield  # (a micro-step that raised is not reduced)
    wrapped.reduce()

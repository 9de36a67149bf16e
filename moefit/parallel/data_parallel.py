"""Data parallelism: every rank holds the whole (NF4) model, takes its share of each optimizer step's sequences,
and only the LoRA gradients are summed over the ranks.

The gradient of a step is that of the mean loss over all label tokens of the step on every rank. Every rank reads
the same global stream of micro-batches (the data order does not depend on the number of ranks) and knows the
label-token count of the whole step without a collective: it sees every micro-batch of the step and trains only
its own. The loss of each micro-batch is divided by that global count, and the ranks' gradients are *summed*
(DDP averages by default; a comm hook sums instead), so N GPUs with grad_accum A give the gradient of one GPU
with grad_accum N x A, and resuming on another number of GPUs with the same sequences per step continues the
same data order.
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


def _sum_allreduce_hook(process_group, bucket):  # no annotations: DDP checks them against dist.GradBucket
    """DDP communication hook: the bucket summed over ranks (DDP's built-in hook divides by the world size)."""
    fut = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_model(model: nn.Module, ctx: DistContext, exclude: set[int] | None = None) -> nn.Module:
    """DistributedDataParallel over the trainable (LoRA) parameters. The frozen NF4 weights and buffers are left
    out of DDP entirely: every rank loads the same weights, they are never broadcast (100 GB on a large model)
    and may live on another device (the input embedding in host memory). Gradients are views into DDP's
    buckets (no second copy of them); each bucket is summed over the ranks as soon as backward fills it."""
    exclude = exclude or set()  # ids of trainable parameters reduced elsewhere (expert parallelism's experts)
    if not ctx.enabled or not any(p.requires_grad and id(p) not in exclude for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad or id(p) in exclude]
    frozen += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    # Gradients that exist when DDP builds its buckets become views of them right away. Without this, the
    # accumulation micro-steps before the first all-reduce would hold the gradients twice (their own tensors and
    # the buckets): 4 GiB more on Llama 4 Scout. Keep them by zeroing in place (`zero_grad(set_to_none=False)`).
    for p in model.parameters():
        if p.requires_grad and p.grad is None and id(p) not in exclude:
            p.grad = torch.zeros_like(p)
    ddp = DDP(model, device_ids=None, gradient_as_bucket_view=True)  # no buffers: nothing to broadcast
    lora_copies.invalidate()  # DDP broadcast rank 0's LoRA weights in place: any compute copy is stale
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    # DDP re-lays its buckets once, in the order the first backward produced the gradients, at the start of the
    # next forward: new buckets are allocated before the old ones go, a second copy of every LoRA gradient (4 GiB
    # on Scout) on top of the optimizer state, above the step's own peak. Do it now, while the model holds only
    # its weights: the buckets keep their parameter order, so the all-reduce starts when backward reaches the
    # first layer instead of overlapping it; that costs the all-reduce time once per optimizer step (13 ms for
    # Scout's 4.4 GB of fp32 LoRA gradients over NVLink against a ~10 s step), not per micro-step.
    ddp.reducer._push_all_rebuilt_params()
    ddp.reducer._rebuild_buckets()
    return ddp


def grad_sync(wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-step's forward and backward: without `sync` the gradients only accumulate locally (all but
    the last micro-step of an optimizer step); a plain model needs no context."""
    if sync or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()

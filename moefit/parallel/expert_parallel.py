"""Expert parallelism: each rank of an expert group holds a contiguous slice of every MoE layer's routed experts
(frozen NF4 banks and their LoRA); the routed rows travel to the rank that owns their expert and back with
`all_to_all_single`. Routing stays exact: the per-expert row counts are exchanged first and every row is sent,
whatever the imbalance (no capacity factor, no dropped tokens).

The rest of the model (attention, shared experts, dense MLPs, embeddings) is replicated and trains data-parallel
over all ranks: every rank runs its own micro-batches, so the experts of a rank see the tokens of every rank.
The gradient of a local expert's LoRA is complete on its rank (the rows of every rank reached it); the replicated
LoRA gradients are summed over the ranks as in data parallelism.

`shard_experts(model, shard)` cuts a built model's routed experts down to the local slice and installs the
dispatch; `MoefitMoE` calls the dispatch in place of its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this rank owns: experts [start, start + local) of every MoE layer."""

    rank: int
    size: int
    num_experts: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.num_experts % self.size:
            raise ValueError(f"{self.num_experts} experts cannot be split evenly over {self.size} ranks: the expert-"
                             "parallel size must divide the number of experts.")

    @property
    def local(self) -> int:
        return self.num_experts // self.size

    @property
    def start(self) -> int:
        return self.rank * self.local


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient goes back the same way with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class ExpertDispatch:
    """Runs a layer's routed experts across the expert group. `__call__(experts, xs, counts, make_groups, **kw)`:
    `xs` are this rank's routed rows sorted by (global) expert with `counts[e]` rows for expert e; returns the
    experts' outputs for those rows, in the same order. `make_groups(counts, row_expert)` builds the groups object
    the local experts take."""

    def __init__(self, shard: ExpertShard, group: dist.ProcessGroup | None = None):
        self.shard, self.group = shard, group
        self.last_counts: torch.Tensor | None = None

    def __call__(self, experts: nn.Module, xs: torch.Tensor, counts: torch.Tensor, make_groups, **kw) -> torch.Tensor:
        n, local = self.shard.size, self.shard.local
        self.last_counts = counts.detach()  # this rank's rows per expert in the latest layer (for inspection)
        send = counts.view(n, local)  # rows for rank r's experts, per expert (rows are sorted by expert)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)  # recv[s, j]: rows from rank s for j
        sizes = torch.stack([send.sum(1), recv.sum(1)]).tolist()  # one host read for both split lists
        send_splits, recv_splits = sizes[0], sizes[1]
        xr = _AllToAll.apply(xs, recv_splits, send_splits, self.group)
        # Received rows come grouped by source rank, then by local expert: regroup them by local expert.
        row_expert = torch.repeat_interleave(torch.arange(local, device=xs.device).repeat(n), recv.reshape(-1))
        order = torch.argsort(row_expert, stable=True)
        groups = make_groups(recv.sum(0), row_expert[order])
        y = experts(xr[order], groups, **kw)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _AllToAll.apply(y[inverse], send_splits, recv_splits, self.group)


def _slice_param(module: nn.Module, name: str, start: int, stop: int) -> None:
    value = getattr(module, name, None)
    if value is None:
        return
    part = value.detach()[start:stop].clone()
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(part, requires_grad=value.requires_grad))
    else:
        setattr(module, name, part)


def shard_experts(model: nn.Module, shard: ExpertShard, group: dist.ProcessGroup | None = None) -> int:
    """Keep only this rank's experts in every routed-expert module of `model` (their frozen weights, biases and
    LoRA) and route through the expert group. Returns the number of MoE layers sharded."""
    from ..moe.block import MoefitMoE

    dispatch = ExpertDispatch(shard, group)
    n = 0
    for block in model.modules():
        if not isinstance(block, MoefitMoE):
            continue
        experts = getattr(block, block.experts_name) if hasattr(block, "experts_name") else block.experts
        if experts.num_experts != shard.num_experts:
            raise ValueError(f"an MoE layer has {experts.num_experts} experts, the shard expects {shard.num_experts}")
        start, stop = shard.start, shard.start + shard.local
        for proj in ("gate", "up", "down"):
            weight = getattr(experts, proj)
            setattr(experts, proj, weight.select_experts(start, stop))
            for suffix in ("bias", "lora_A", "lora_B"):
                _slice_param(experts, f"{proj}_{suffix}", start, stop)
        experts.num_experts = shard.local
        block.expert_dispatch = dispatch
        n += 1
    return n

"""Expert parallelism: each rank of an expert group holds a contiguous slice of every MoE layer's routed experts
(frozen NF4 banks and their LoRA); the routed rows travel to the rank that owns their expert and back with
`all_to_all_single`. Routing stays exact: the per-expert row counts are exchanged first and every row is sent,
whatever the imbalance (no capacity factor, no dropped tokens).

The rest of the model (attention, shared experts, dense MLPs, embeddings) is replicated and trains data-parallel
over all ranks: every rank runs its own micro-batches, so the experts of a rank see the tokens of every rank.
The gradient of a local expert's LoRA is complete on its rank (the rows of every rank reached it); the replicated
LoRA gradients are summed over the ranks as in data parallelism.

`moefit.load_model(..., expert_shard=shard)` builds and reads only the local slice of the experts (no rank ever
holds the others); `attach_dispatch(model, shard, group)` then routes through the expert group. `shard_experts`
cuts an already built whole model down to its slice (tests, synthetic benchmarks). `MoefitMoE` calls the dispatch
in place of its experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..moe import recompute


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
        self.count_exchanges = 0  # count all-to-alls run (each one a host sync), for tests and benchmarks

    def __call__(self, experts: nn.Module, xs: torch.Tensor, counts: torch.Tensor, make_groups, **kw) -> torch.Tensor:
        n, local = self.shard.size, self.shard.local
        self.last_counts = counts.detach()  # this rank's rows per expert in the latest layer (for inspection)
        recv, sizes = self._exchange_counts(counts.view(n, local))
        send_splits, recv_splits = sizes[0], sizes[1]
        xr = _AllToAll.apply(xs, recv_splits, send_splits, self.group)
        # Received rows come grouped by source rank, then by local expert: regroup them by local expert. The row
        # count is known on the host already: given, repeat_interleave does not read it back (a sync on CUDA).
        row_expert = torch.repeat_interleave(torch.arange(local, device=xs.device).repeat(n), recv.reshape(-1),
                                             output_size=sum(recv_splits))
        order = torch.argsort(row_expert, stable=True)
        groups = make_groups(recv.sum(0), row_expert[order])
        y = experts(xr[order], groups, **kw)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _AllToAll.apply(y[inverse], send_splits, recv_splits, self.group)

    def _exchange_counts(self, send: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """(recv, [send splits, recv splits]): recv[s, j] rows come from rank s for local expert j; send[r, j] rows
        go to rank r's expert j. The split lists are read on the host: a sync, after which the host has no kernels
        queued ahead of the GPU. A checkpointed layer's recomputation routes exactly as its first pass did (the
        same input and weights; torch.utils.checkpoint checks the shapes), so it takes the first pass's exchange
        (moefit.moe.recompute.keep) instead of syncing again: one sync per MoE layer and micro-step, not two."""
        recv, sizes = recompute.kept((self, "recv")), recompute.kept((self, "sizes"))
        if recv is not None and sizes is not None:
            return recv, sizes.tolist()  # a CPU tensor: no sync
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        self.count_exchanges += 1
        sizes = torch.stack([send.sum(1), recv.sum(1)]).cpu()  # one host read for both split lists
        recompute.keep((self, "recv"), recv)
        recompute.keep((self, "sizes"), sizes)
        return recv, sizes.tolist()


def _slice_param(module: nn.Module, name: str, start: int, stop: int) -> None:
    value = getattr(module, name, None)
    if value is None:
        return
    part = value.detach()[start:stop].clone()
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(part, requires_grad=value.requires_grad))
    else:
        setattr(module, name, part)


def _moe_blocks(model: nn.Module):
    from ..moe.block import MoefitMoE

    for block in model.modules():
        if isinstance(block, MoefitMoE):
            yield block, getattr(block, block.experts_name)


def attach_dispatch(model: nn.Module, shard: ExpertShard, group: dist.ProcessGroup | None = None) -> int:
    """Route every MoE layer of a model built with `expert_shard=shard` through the expert group; returns the
    number of MoE layers."""
    dispatch = ExpertDispatch(shard, group)
    n = 0
    for block, experts in _moe_blocks(model):
        if (experts.expert_offset, experts.num_experts, experts.total_experts) != \
                (shard.start, shard.local, shard.num_experts):
            raise ValueError(f"an MoE layer holds experts {experts.expert_offset}..{experts.expert_offset + experts.num_experts - 1}"
                             f" of {experts.total_experts}; the shard is {shard}")
        block.expert_dispatch = dispatch
        n += 1
    return n


def shard_experts(model: nn.Module, shard: ExpertShard, group: dist.ProcessGroup | None = None) -> int:
    """Keep only this rank's experts in every routed-expert module of a whole `model` (their frozen weights,
    biases and LoRA) and route through the expert group. Returns the number of MoE layers sharded."""
    for _, experts in _moe_blocks(model):
        if experts.num_experts != shard.num_experts:
            raise ValueError(f"an MoE layer has {experts.num_experts} experts, the shard expects {shard.num_experts}")
        start, stop = shard.start, shard.start + shard.local
        for proj in ("gate", "up", "down"):
            setattr(experts, proj, getattr(experts, proj).select_experts(start, stop))
            for suffix in ("bias", "lora_A", "lora_B"):
                _slice_param(experts, f"{proj}_{suffix}", start, stop)
        experts.num_experts, experts.expert_offset, experts.total_experts = shard.local, start, shard.num_experts
    return attach_dispatch(model, shard, group)


def expert_lora_names(model: nn.Module) -> set[str]:
    """Names of the routed experts' LoRA parameters, as `moefit.lora.lora_parameters(model)` names them (held per
    rank under expert parallelism)."""
    from ..lora import _root, lora_parameters
    from ..moe.experts import MoefitExperts

    owners = tuple(n + "." for n, m in _root(model).named_modules() if isinstance(m, MoefitExperts))
    return {n for n in lora_parameters(model) if n.startswith(owners)}


# ------------------------------------------------------------------------------------------ training with it

@dataclass
class ExpertParallel:
    """This rank's place in an expert-parallel run of `world` ranks: expert groups of `size` consecutive ranks
    (rank r holds slice r % size), replicated `world / size` times; each replica group (the ranks holding the same
    slice) sums its experts' gradients as data parallelism does."""

    shard: ExpertShard
    group: dist.ProcessGroup | None  # this rank's expert group (the all-to-all goes here)
    replica_group: dist.ProcessGroup | None  # ranks holding the same experts; None with one replica
    rank: int
    world: int

    @classmethod
    def create(cls, rank: int, world: int, size: int, num_experts: int) -> ExpertParallel:
        """Every rank must call this (it creates the process groups collectively)."""
        if size < 2:
            raise ValueError("expert parallelism needs a size of at least 2")
        if world % size:
            raise ValueError(f"{world} processes cannot form expert groups of {size}: the number of GPUs must be a "
                             f"multiple of parallel.expert ({size}).")
        shard = ExpertShard(rank % size, size, num_experts)
        group = replica = None
        for d in range(world // size):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(d * size, (d + 1) * size)))
            if rank // size == d:
                group = g
        if world > size:
            for j in range(size):
                g = dist.new_group(list(range(j, world, size)))
                if rank % size == j:
                    replica = g
        return cls(shard, group, replica, rank, world)

    def reduce_expert_grads(self, params: list[nn.Parameter]) -> None:
        """Sum the routed experts' gradients over the replicas holding the same experts (one flat all-reduce)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.replica_group is None or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.replica_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def clip_grad_norm_(self, replicated: list[nn.Parameter], experts: list[nn.Parameter], max_norm: float
                        ) -> float:
        """torch's clip_grad_norm_ over the whole model's LoRA: the replicated gradients (the same on every rank)
        and every rank's own experts' gradients (summed over the expert group)."""
        def sq(params):
            gs = [p.grad.float().norm() ** 2 for p in params if p.grad is not None]
            return torch.stack(gs).sum() if gs else torch.zeros(())

        local = sq(experts).to(next(iter(experts + replicated)).device)
        dist.all_reduce(local, group=self.group)
        total = (sq(replicated).to(local.device) + local).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in replicated + experts:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return float(total)

    def whole_lora_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The LoRA state of the whole model on rank 0 (None elsewhere), in host memory: the routed experts' slices
        of the first expert group (ranks 0 .. size-1) put together, the rest as rank 0 has it. Every rank must call
        it; only the first expert group sends anything."""
        from ..lora import lora_parameters

        if self.rank >= self.shard.size:  # another replica: rank 0 has the same experts from the first group
            return None
        params = lora_parameters(model)
        names = sorted(expert_lora_names(model))
        mine = {n: params[n].detach().cpu() for n in names}
        gathered = [None] * self.shard.size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0, group=self.group)
        if self.rank != 0:
            return None
        whole = {n: p.detach().cpu() for n, p in params.items()}
        for n in names:
            whole[n] = torch.cat([gathered[r][n] for r in range(self.shard.size)], dim=0)
        return whole


def local_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole model's LoRA state cut to the experts this model holds (the same dict when it holds them all)."""
    from ..lora import _root
    from ..moe.experts import MoefitExperts

    out = dict(state)
    for name, m in _root(model).named_modules():
        if not isinstance(m, MoefitExperts) or m.num_experts == m.total_experts:
            continue
        for key in [k for k in state if k.startswith(name + ".")]:
            out[key] = state[key][m.expert_offset:m.expert_offset + m.num_experts]
    return out

"""A routed MoE block: top-k -> permute tokens by expert -> experts on routed rows only -> unpermute -> combine.

It replaces a family's own MoE module inside the HF model and keeps that module's submodule names (the family
spec's router, experts and shared-expert attributes: `router`/`shared_expert` for Llama 4, `gate` for Qwen3-MoE
and Mixtral) so checkpoints, adapters and exports map one to one. The routing rule is data (moe.routing), not a
subclass: Llama 4 takes the sigmoid of the top-k logits and scales the expert *inputs*; softmax families
(Mixtral, Qwen3-MoE) scale the expert *outputs*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import MoefitExperts
from .grouped import ExpertGroups
from .recompute import recomputing
from .routing import RoutingRule


class MoefitMoE(nn.Module):
    """`output_feeds_residual`: the family's decoder layer adds this block's output straight to the residual
    stream (no norm or gate after it, as in Llama 4), so backward never reads it and the recomputation of a
    checkpointed layer may skip the frozen down projections that produce it (moe.recompute). Leave False for
    a family that post-processes the MoE output.

    `router_name` / `shared_name`: the attributes the family's own block uses for them. `return_router_logits`:
    return (output, router logits) as the family's block does, else the output alone."""

    def __init__(self, router: nn.Module, experts: MoefitExperts, shared_expert: nn.Module | None, rule: RoutingRule,
                 output_feeds_residual: bool = False, *, router_name: str = "router",
                 shared_name: str = "shared_expert", experts_name: str = "experts",
                 return_router_logits: bool = True):
        super().__init__()
        self.router_name, self.shared_name, self.experts_name = router_name, shared_name, experts_name
        setattr(self, router_name, router)
        setattr(self, experts_name, experts)
        setattr(self, shared_name, shared_expert)
        self.rule = rule
        self.num_experts = experts.num_experts
        self.hidden_dim = experts.hidden_size
        self.output_feeds_residual = output_feeds_residual
        self.return_router_logits = return_router_logits
        self.expert_dispatch = None  # set by moefit.parallel.expert_parallel.shard_experts
        self.mark_discardable_outputs()

    @property
    def shared(self) -> nn.Module | None:
        return getattr(self, self.shared_name)

    def mark_discardable_outputs(self) -> None:
        """Let the recomputation skip the shared expert's frozen down projection, whose output only feeds this
        block's sum. Call again after replacing submodules."""
        down = getattr(self.shared, "down_proj", None)
        if hasattr(down, "discard_output_in_recompute"):  # a MoefitLinear
            down.discard_output_in_recompute = self.output_feeds_residual

    def run_experts(self, xs: torch.Tensor, groups: ExpertGroups, **kw) -> torch.Tensor:
        """The routed experts on rows sorted by expert: here, or across the expert-parallel group
        (moefit.parallel.expert_parallel) when this rank holds only a slice of them."""
        experts = getattr(self, self.experts_name)
        if self.expert_dispatch is None:
            return experts(xs, groups, **kw)
        return self.expert_dispatch(experts, xs, groups.counts, make_groups, **kw)

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        router = getattr(self, self.router_name)
        bias = getattr(router, "bias", None)  # gpt-oss's router has one
        xr = x.float() if self.rule.fp32_logits else x
        logits = F.linear(xr, router.weight.to(xr.dtype), None if bias is None else bias.to(xr.dtype))  # [T, E]
        top_i, weights = self.rule.route(logits, router)
        k = self.rule.top_k
        flat_expert = top_i.reshape(-1)
        # One sort gives each routed row's expert and the rows' order; the experts' end offsets come from the
        # sorted experts by searchsorted (no bincount: on CUDA it reads the max back to the host, a sync per MoE
        # layer; no counting scatter and cumsum either).
        row_expert, order = torch.sort(flat_expert, stable=True)
        token = order // k if k > 1 else order  # each routed row's token
        groups = ExpertGroups.from_sorted(row_expert, self.num_experts)
        w = weights.reshape(-1)[order].to(x.dtype).unsqueeze(1)
        xs = x[token]
        if self.rule.scale_inputs:
            # The routed output then only feeds the sum; when scaled afterwards, backward reads it (d/dw).
            ys = self.run_experts(xs * w, groups, discard_output=self.output_feeds_residual and recomputing())
        else:
            ys = self.run_experts(xs, groups) * w
        shared = self.shared
        if shared is not None:
            out = shared(x).index_add(0, token, ys.to(x.dtype))
        else:  # into fresh zeros in place: no copy of them first
            out = torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))
        out = out.view(hidden_states.shape)
        return (out, logits) if self.return_router_logits else out


def make_groups(counts: torch.Tensor, row_expert: torch.Tensor | None = None) -> ExpertGroups:
    """Groups of rows sorted by expert, with `counts[e]` rows for expert e (and each row's expert, for per-expert
    biases)."""
    return ExpertGroups(counts, row_expert=row_expert)

"""A routed MoE block: top-k -> permute tokens by expert -> experts on routed rows only -> unpermute -> combine.

It replaces a family's own MoE module inside the HF model and keeps its submodule names (`router`,
`experts`, `shared_expert`) so checkpoints, adapters and exports map one to one. The routing rule is data,
not a subclass: Llama 4 takes the sigmoid of the top-k logits and scales the expert *inputs*; softmax families
(Mixtral, Qwen3-MoE) scale the expert *outputs*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import MoefitExperts, MoefitLinear
from ..models.recompute import recomputing
from .grouped import ExpertGroups


@dataclass(frozen=True)
class RoutingRule:
    top_k: int
    score: str = "sigmoid"  # "sigmoid" of the selected logits, or "softmax" over all logits
    normalize_topk: bool = False  # renormalise the selected softmax weights to sum to 1
    scale_inputs: bool = True  # Llama 4 multiplies the token by its score before the expert


def route(logits: torch.Tensor, rule: RoutingRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert index [T, k], weight [T, k]) for router logits [T, E]."""
    if rule.score == "sigmoid":
        top_v, top_i = torch.topk(logits, rule.top_k, dim=-1)
        weights = torch.sigmoid(top_v.float())
    else:
        probs = torch.softmax(logits.float(), dim=-1)
        weights, top_i = torch.topk(probs, rule.top_k, dim=-1)
        if rule.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True)
    return top_i, weights


class MoefitMoE(nn.Module):
    """`output_feeds_residual`: the family's decoder layer adds this block's output straight to the residual
    stream (no norm or gate after it, as in Llama 4), so backward never reads it and the recomputation of a
    checkpointed layer may skip the frozen down projections that produce it (models.recompute). Leave False for
    a family that post-processes the MoE output."""

    def __init__(self, router: nn.Module, experts: MoefitExperts, shared_expert: nn.Module | None, rule: RoutingRule,
                 output_feeds_residual: bool = False):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.rule = rule
        self.num_experts = experts.num_experts
        self.hidden_dim = experts.hidden_size
        self.output_feeds_residual = output_feeds_residual
        self.expert_dispatch = None  # set by moefit.parallel.expert_parallel.shard_experts
        self.mark_discardable_outputs()

    def mark_discardable_outputs(self) -> None:
        """Let the recomputation skip the shared expert's frozen down projection, whose output only feeds this
        block's sum. Call again after replacing submodules."""
        down = getattr(self.shared_expert, "down_proj", None)
        if isinstance(down, MoefitLinear):
            down.discard_output_in_recompute = self.output_feeds_residual

    def run_experts(self, xs: torch.Tensor, groups: ExpertGroups, **kw) -> torch.Tensor:
        """The routed experts on rows sorted by expert: here, or across the expert-parallel group
        (moefit.parallel.expert_parallel) when this rank holds only a slice of them."""
        if self.expert_dispatch is None:
            return self.experts(xs, groups, **kw)
        return self.expert_dispatch(self.experts, xs, groups.counts, make_groups, **kw)

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(x, self.router.weight.to(x.dtype))  # [T, E]
        top_i, weights = route(logits, self.rule)
        k = self.rule.top_k
        flat_expert = top_i.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token = order // k
        # scatter_add, not bincount: bincount on CUDA reads the max back to the host, a sync per MoE layer that
        # stops the CPU from queueing the next layer's kernels while the GPU works.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        groups = ExpertGroups(counts, None if x.is_cuda else counts.tolist())
        w = weights.reshape(-1)[order].to(x.dtype).unsqueeze(1)
        xs = x[token]
        if self.rule.scale_inputs:
            # The routed output then only feeds the sum; when scaled afterwards, backward reads it (d/dw).
            ys = self.run_experts(xs * w, groups, discard_output=self.output_feeds_residual and recomputing())
        else:
            ys = self.run_experts(xs, groups) * w
        out = self.shared_expert(x) if self.shared_expert is not None else torch.zeros_like(x)
        out = out.index_add(0, token, ys.to(out.dtype))
        return out.view(hidden_states.shape), logits


def make_groups(counts: torch.Tensor, row_expert: torch.Tensor | None = None) -> ExpertGroups:
    """Groups of rows sorted by expert, with `counts[e]` rows for expert e."""
    return ExpertGroups(counts, None if counts.is_cuda else counts.tolist())

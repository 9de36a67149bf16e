"""Routing rules: router logits [T, E] -> (expert index [T, k], weight [T, k]), one function per rule.

A family spec names its rule (`MoESpec.routing`) and the config values it reads (`MoESpec.routing_args`, into
`RoutingRule.options`); `ROUTING` maps the name to the function. Weights are fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RoutingRule:
    top_k: int
    fn: Callable[[torch.Tensor, RoutingRule, nn.Module], tuple[torch.Tensor, torch.Tensor]]
    normalize_topk: bool = False  # renormalise the selected weights to sum to 1
    scale_inputs: bool = True  # the weight multiplies the expert's input (Llama 4), else its output
    fp32_logits: bool = False  # the family computes router logits in fp32 (GLM-4.5, DeepSeek-V3)
    options: dict[str, Any] = field(default_factory=dict)  # the rule's own settings, from the config

    def route(self, logits: torch.Tensor, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(logits, self, router)


def sigmoid_of_topk_logits(logits: torch.Tensor, rule: RoutingRule, router: nn.Module
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4: the top-k logits, then the sigmoid of each (no normalisation across experts)."""
    top_v, top_i = torch.topk(logits, rule.top_k, dim=-1)
    return top_i, torch.sigmoid(top_v.float())


def softmax_topk(logits: torch.Tensor, rule: RoutingRule, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE, Mixtral: softmax over all experts, the top-k probabilities, optionally renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, top_i = torch.topk(probs, rule.top_k, dim=-1)
    if rule.normalize_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    return top_i, weights


def softmax_of_topk_logits(logits: torch.Tensor, rule: RoutingRule, router: nn.Module
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: the top-k logits (router bias included), then a softmax over those k."""
    top_v, top_i = torch.topk(logits, rule.top_k, dim=-1)
    return top_i, torch.softmax(top_v.float(), dim=-1)


def sigmoid_group_topk(logits: torch.Tensor, rule: RoutingRule, router: nn.Module
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-4.5, DeepSeek-V3 ("noaux_tc"): sigmoid scores; the choice adds the router's `e_score_correction_bias`
    and is limited to the `topk_group` best of `n_group` expert groups (a group scores its two best experts);
    weights are the chosen experts' plain sigmoid scores, renormalised if asked, times `routed_scaling_factor`."""
    scores = torch.sigmoid(logits.float())
    choice = scores + router.e_score_correction_bias.float()
    n_group, topk_group = rule.options.get("n_group", 1), rule.options.get("topk_group", 1)
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        best = torch.topk(grouped.topk(2, dim=-1)[0].sum(-1), topk_group, dim=-1)[1]  # [T, topk_group]
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=choice.device).scatter_(1, best, True)
        choice = choice.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    top_i = torch.topk(choice, rule.top_k, dim=-1)[1]
    weights = scores.gather(1, top_i)
    if rule.normalize_topk:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    scaling = rule.options.get("scaling", 1.0)
    return top_i, weights if scaling == 1.0 else weights * scaling  # (GLM-4.5-Air: 1.0, no kernel for it)


ROUTING = {"sigmoid_of_topk_logits": sigmoid_of_topk_logits, "softmax_topk": softmax_topk,
           "softmax_of_topk_logits": softmax_of_topk_logits, "sigmoid_group_topk": sigmoid_group_topk}

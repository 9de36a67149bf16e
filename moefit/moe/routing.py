"""Routing rules: router logits [T, E] -> (expert index [T, k], weight [T, k]), one function per rule.

A family spec names its rule (`MoESpec.routing`); `ROUTING` maps the name to the function. Weights are fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingRule:
    top_k: int
    fn: Callable[[torch.Tensor, RoutingRule], tuple[torch.Tensor, torch.Tensor]]
    normalize_topk: bool = False  # renormalise the selected weights to sum to 1
    scale_inputs: bool = True  # the weight multiplies the expert's input (Llama 4), else its output

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(logits, self)


def sigmoid_of_topk_logits(logits: torch.Tensor, rule: RoutingRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4: the top-k logits, then the sigmoid of each (no normalisation across experts)."""
    top_v, top_i = torch.topk(logits, rule.top_k, dim=-1)
    return top_i, torch.sigmoid(top_v.float())


def softmax_topk(logits: torch.Tensor, rule: RoutingRule) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE, Mixtral: softmax over all experts, the top-k probabilities, optionally renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, top_i = torch.topk(probs, rule.top_k, dim=-1)
    if rule.normalize_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    return top_i, weights


def softmax_of_topk_logits(logits: torch.Tensor, rule: RoutingRule) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: the top-k logits (router bias included), then a softmax over those k."""
    top_v, top_i = torch.topk(logits, rule.top_k, dim=-1)
    return top_i, torch.softmax(top_v.float(), dim=-1)


ROUTING = {"sigmoid_of_topk_logits": sigmoid_of_topk_logits, "softmax_topk": softmax_topk,
           "softmax_of_topk_logits": softmax_of_topk_logits}

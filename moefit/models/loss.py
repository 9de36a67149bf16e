"""Cross-entropy over the vocabulary in chunks: the [tokens, vocab] fp32 logits tensor never exists.

Forward keeps one chunk of logits at a time and saves only the per-token log-sum-exp; backward recomputes each
chunk's logits to form the softmax gradient. At Scout's vocabulary (202,048) and 4,096 tokens the full fp32
logits would be 3.1 GiB, their gradient as much again; a chunk (moefit.loss_chunk: 320 tokens at this vocabulary)
is 0.24 GiB, freed at once.
"""

from __future__ import annotations

import torch

from ..loss_chunk import loss_chunk_tokens


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        for s in range(0, n, chunk):
            logits = (hidden[s:s + chunk] @ w.t()).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            total += (lse[s:s + chunk] - picked).sum()
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        w = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            g = (h @ w.t()).float()
            g.sub_(lse[s:s + chunk, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), targets[s:s + chunk]] -= 1.0
            g.mul_(grad_total)
            if grad_hidden is not None:
                grad_hidden[s:s + chunk] = (g.to(hidden.dtype) @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += g.t() @ h.float()
            del g
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int | None = None) -> torch.Tensor:
    """Sum over rows of -log softmax(hidden @ weight^T)[target]; hidden [N, H], weight [V, H], targets [N].
    `chunk`: tokens per lm_head chunk (default: moefit.loss_chunk's rule for this vocabulary)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk or loss_chunk_tokens(weight.shape[0]))

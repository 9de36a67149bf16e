"""Matmuls over tokens sorted by expert: x[offs[e-1]:offs[e]] @ W[e] for every expert e.

Two implementations of one contract: `torch._grouped_mm` (one kernel for all experts; CUDA, bf16, SM >= 80) and a
plain per-expert loop (CPU, other dtypes, old GPUs). `grouped_matmul` picks the first that applies; the loop is
also the slow, obviously-correct reference the tests compare against.

`frozen_expert_matmul` multiplies by a quantized weight without ever saving its dequantized copy for backward:
the backward pass dequantizes again (the DESIGN's "save inputs, recompute dequantized weights").
"""

from __future__ import annotations

import torch

from ..quant.nf4 import FrozenWeight, NF4Weight

_GROUPED_MM = getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if _GROUPED_MM is None or not x.is_cuda or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    # 16-byte alignment of the contraction and output widths (kernel requirement).
    return major >= 8 and x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, counts_cpu: list[int] | None = None
                   ) -> torch.Tensor:
    """x: [N, K] rows sorted by expert; w: [E, K, M]; counts: [E] rows per expert. Returns [N, M]. Differentiable
    in x and w."""
    if grouped_mm_supported(x, w):
        return _GROUPED_MM(x, w, offs=offsets_from_counts(counts))
    return loop_grouped_matmul(x, w, counts_cpu if counts_cpu is not None else counts.tolist())


def loop_grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            outs.append(x[start:start + n] @ w[e])
        start += n
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[-1])
    return torch.cat(outs, 0)


class _FrozenExpertMatmul(torch.autograd.Function):
    """y = x @ W_e^T per expert, W stored quantized as [E, out, in]; backward re-dequantizes for dx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: torch.Tensor, weight: NF4Weight | FrozenWeight,
                counts_cpu: list[int] | None):
        ctx.weight = weight
        ctx.counts_cpu = counts_cpu
        ctx.save_for_backward(counts)
        return _apply(x, weight, counts, counts_cpu, transpose=True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (counts,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _apply(grad_out, ctx.weight, counts, ctx.counts_cpu, transpose=False)
        return grad_x, None, None, None


def _apply(x: torch.Tensor, weight: NF4Weight | FrozenWeight, counts: torch.Tensor, counts_cpu: list[int] | None,
           transpose: bool) -> torch.Tensor:
    """transpose=True: x @ W^T ([N, in] -> [N, out]); False: x @ W ([N, out] -> [N, in])."""
    if x.is_cuda and _GROUPED_MM is not None and x.dtype == torch.bfloat16:
        w = weight.dequantize(dtype=x.dtype)  # [E, out, in]: one layer's experts, transient
        w = w.transpose(1, 2) if transpose else w
        if grouped_mm_supported(x, w):
            out = _GROUPED_MM(x, w, offs=offsets_from_counts(counts))
            del w
            return out
        return loop_grouped_matmul(x, w, counts_cpu if counts_cpu is not None else counts.tolist())
    # Per-expert loop: dequantize one expert at a time (lowest memory; CPU and fallback path).
    sizes = counts_cpu if counts_cpu is not None else counts.tolist()
    outs = []
    start = 0
    for e, n in enumerate(sizes):
        if n:
            w = weight.dequantize(expert=e, dtype=x.dtype)
            outs.append(x[start:start + n] @ (w.t() if transpose else w))
        start += n
    if not outs:
        width = weight.slice_shape[0] if transpose else weight.slice_shape[1]
        return x.new_zeros(x.shape[0], width)
    return torch.cat(outs, 0)


def frozen_expert_matmul(x: torch.Tensor, weight: NF4Weight | FrozenWeight, counts: torch.Tensor,
                         counts_cpu: list[int] | None = None) -> torch.Tensor:
    """x: [N, in] sorted by expert -> [N, out], with W frozen and stored as [E, out, in]."""
    return _FrozenExpertMatmul.apply(x, counts, weight, counts_cpu)


class _FrozenLinear(torch.autograd.Function):
    """y = x @ W^T for a frozen (quantized) W; saves nothing but the weight's handle."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight | FrozenWeight):
        ctx.weight = weight
        w = weight.dequantize(dtype=x.dtype)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.weight.dequantize(dtype=grad_out.dtype)
        return grad_out @ w, None


def frozen_linear(x: torch.Tensor, weight: NF4Weight | FrozenWeight) -> torch.Tensor:
    return _FrozenLinear.apply(x, weight)

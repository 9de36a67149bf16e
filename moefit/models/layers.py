"""The frozen (NF4) linear moefit puts inside an HF model in place of nn.Linear, with an optional LoRA adapter
built in (lora_A [r, in], lora_B [out, r]: PEFT's own layout). The routed experts' bank is moe.experts.MoefitExperts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..lora_copies import compute_copy
from ..lora_scale import exact_scale
from ..moe import recompute
from ..moe.grouped import cast_copy, frozen_linear
from ..quant.nf4 import make_weight


class MoefitLinear(nn.Module):
    """y = x W^T (+ b) with W frozen (NF4 or plain), plus an optional LoRA delta (x A^T B^T) * scale."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, quantization: str = "nf4",
                 dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, double_quant: bool = True,
                 device: torch.device | str | None = None, scales_fp32: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.qweight = make_weight((out_features, in_features), quantization=quantization, dtype=dtype,
                                   blocksize=blocksize, double_quant=double_quant, device=device,
                                   scales_fp32=scales_fp32)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scale = 0.0
        self.lora_dropout: nn.Module = nn.Identity()
        # Set by the owner when this projection's output only feeds a sum that backward never reads (an MoE
        # layer's shared-expert down projection): the recomputation of a checkpointed layer skips the frozen matmul.
        self.discard_output_in_recompute = False

    def load_weight(self, weight: torch.Tensor) -> None:
        self.qweight.quantize_(weight)

    def add_lora(self, r: int, alpha: float, dropout: float, dtype: torch.dtype, generator: torch.Generator) -> None:
        device = self.qweight.packed.device if hasattr(self.qweight, "packed") else self.qweight.weight.device
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.lora_scale = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.discard_output_in_recompute and recompute.recomputing()
        if self.lora_A is not None:
            dropout = self.lora_dropout
            xd = x if isinstance(dropout, nn.Identity) else dropout(x)  # (p = 0: not even a module call)
            y = _LoraLinear.apply(x, xd, self.qweight, self.bias, self.lora_A, self.lora_B, self.lora_scale, skip)
            return y.view(*x.shape[:-1], self.out_features)  # (a view made outside the Function: in-place safe)
        y = frozen_linear(x, self.qweight, skip=skip)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        lora = f", lora_r={self.lora_A.shape[0]}" if self.lora_A is not None else ""
        return f"in={self.in_features}, out={self.out_features}{lora}"


class _LoraLinear(torch.autograd.Function):
    """y = x W^T (+ b) + ((xd A^T) * scale) B^T with W frozen (decoded on each pass, never saved) and xd = x or
    its dropout: one autograd node for what took nine (the frozen matmul, two casts, the LoRA GEMMs, the scaling,
    transposes and reshapes), with the same arithmetic, forward and backward, the LoRA product added in addmm's
    epilogue. A power-of-two scale (exact: lora_scale.exact_scale) is multiplied into B's copy as it is cast and
    into B's gradient as it is cast back, no kernel of its own; another scale multiplies the rank-r activation.
    `skip`: the recomputation of a checkpointed layer throws this output away (moe.recompute): the frozen matmul
    is not run (a zero output)."""

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_a, lora_b, scale: float, skip: bool):
        dtype = x.dtype
        out = lora_b.shape[0]
        x2, xd2 = x.reshape(-1, x.shape[-1]), xd.reshape(-1, xd.shape[-1])
        y = x2.new_zeros(x2.shape[0], out) if skip else x2.mm(weight.dequantize(dtype=dtype).t())
        if bias is not None:
            y = y + bias
        fold = exact_scale(scale)
        a16 = compute_copy(lora_a, dtype)
        b16 = compute_copy(lora_b, dtype, scale if fold else None)
        h = xd2.mm(a16.t())
        if not fold:
            h.mul_(scale)
        y = torch.addmm(y, h, b16.t())
        ctx.save_for_backward(xd2, h, a16, b16)
        ctx.weight, ctx.scale, ctx.fold = weight, scale, fold
        ctx.dtypes, ctx.x_shape = (lora_a.dtype, lora_b.dtype), x.shape
        return y  # [tokens, out]

    @staticmethod
    def backward(ctx, g2):
        xd2, h, a16, b16 = ctx.saved_tensors
        need_x, need_xd, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        grad_x = grad_xd = grad_a = grad_b = None
        if need_x:  # the frozen matmul's input gradient: W decoded again
            grad_x = g2.mm(ctx.weight.dequantize(dtype=g2.dtype)).view(ctx.x_shape)
        if need_b:
            grad_b = g2.t().mm(h)
            grad_b = cast_copy(grad_b, ctx.dtypes[1], ctx.scale if ctx.fold else None)
        if need_xd or need_a:
            grad_h = g2.mm(b16)
            if not ctx.fold:
                grad_h.mul_(ctx.scale)
            if need_a:
                grad_a = grad_h.t().mm(xd2).to(ctx.dtypes[0])
            if need_xd:
                grad_xd = grad_h.mm(a16).view(ctx.x_shape)
        return grad_x, grad_xd, None, None, grad_a, grad_b, None, None


def is_lora_name(name: str) -> bool:
    """Whether a parameter name (full or leaf) is one of the LoRA tensors these modules hold."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B") or leaf.endswith(("_lora_A", "_lora_B"))

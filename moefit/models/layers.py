"""The frozen (NF4) linear moefit puts inside an HF model in place of nn.Linear, with an optional LoRA adapter
built in (lora_A [r, in], lora_B [out, r]: PEFT's own layout). The routed experts' bank is moe.experts.MoefitExperts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..moe import recompute
from ..moe.grouped import frozen_linear
from ..moe.recompute import discarded_output
from ..quant.nf4 import make_weight


class MoefitLinear(nn.Module):
    """y = x W^T (+ b) with W frozen (NF4 or plain), plus an optional LoRA delta (x A^T B^T) * scale."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, quantization: str = "nf4",
                 dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, double_quant: bool = True,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.qweight = make_weight((out_features, in_features), quantization=quantization, dtype=dtype,
                                   blocksize=blocksize, double_quant=double_quant, device=device)
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
        if self.discard_output_in_recompute and recompute.recomputing():
            y = discarded_output(x, self.out_features)
        else:
            y = frozen_linear(x, self.qweight)
        if self.bias is not None:
            y = y + self.bias
        if self.lora_A is not None:
            # The scale goes on the rank-r activation and the add into the GEMM's epilogue: no extra pass over
            # the [tokens, out] output.
            h = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)) * self.lora_scale
            y = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]),
                            self.lora_B.to(x.dtype).t()).view(y.shape)
        return y

    def extra_repr(self) -> str:
        lora = f", lora_r={self.lora_A.shape[0]}" if self.lora_A is not None else ""
        return f"in={self.in_features}, out={self.out_features}{lora}"


def is_lora_name(name: str) -> bool:
    """Whether a parameter name (full or leaf) is one of the LoRA tensors these modules hold."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B") or leaf.endswith(("_lora_A", "_lora_B"))

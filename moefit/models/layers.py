"""The modules moefit puts inside an HF model: a frozen (NF4) linear and a bank of routed experts, each with an
optional LoRA adapter built in.

LoRA layouts (what `moefit.lora` saves and `moefit export` maps to PEFT):
  linear:  lora_A [r, in], lora_B [out, r]                       (PEFT's own layout)
  experts: {gate,up,down}_lora_A [E, in, r], {gate,up,down}_lora_B [E, r, out]
           (per expert e: delta_W_e^T = A[e] @ B[e] * scale, applied to the tokens routed to e only;
           the [E, in, out] delta is never materialised)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.grouped import ExpertGroups, frozen_expert_matmul, frozen_linear, grouped_matmul
from ..quant.nf4 import make_weight
from . import recompute
from .recompute import discarded_output


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


EXPERT_PROJECTIONS = ("gate", "up", "down")


def is_lora_name(name: str) -> bool:
    """Whether a parameter name (full or leaf) is one of the LoRA tensors these modules hold."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B") or leaf.endswith(("_lora_A", "_lora_B"))


class MoefitExperts(nn.Module):
    """Routed experts of one MoE layer: gate/up/down weights stored frozen per expert as [E, out, in].

    forward(x, groups): x holds the routed tokens sorted by expert (groups.counts[e] rows for expert e), already scaled
    by the router where the family scales inputs. Only those rows are computed: cost per token is independent of
    the number of experts.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, act: str = "silu",
                 quantization: str = "nf4", dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                 double_quant: bool = True, device: torch.device | str | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        kw = dict(quantization=quantization, dtype=dtype, blocksize=blocksize, double_quant=double_quant,
                  device=device)
        self.gate = make_weight((num_experts, intermediate_size, hidden_size), **kw)
        self.up = make_weight((num_experts, intermediate_size, hidden_size), **kw)
        self.down = make_weight((num_experts, hidden_size, intermediate_size), **kw)
        if act != "silu":
            raise ValueError(f"unsupported expert activation {act!r}")
        self.lora_scale = 0.0
        self.lora_dropout: nn.Module = nn.Identity()
        self.keep_gate_up = False  # set by MoefitCausalLM.enable_gradient_checkpointing
        for p in EXPERT_PROJECTIONS:
            setattr(self, f"{p}_lora_A", None)
            setattr(self, f"{p}_lora_B", None)

    def projection_shape(self, proj: str) -> tuple[int, int]:
        """(in, out) of one expert's projection."""
        h, i = self.hidden_size, self.intermediate_size
        return (i, h) if proj == "down" else (h, i)

    def add_lora(self, r: int, alpha: float, dropout: float, dtype: torch.dtype, generator: torch.Generator,
                 projections: tuple[str, ...] = EXPERT_PROJECTIONS) -> None:
        device = self.gate.packed.device if hasattr(self.gate, "packed") else self.gate.weight.device
        for p in projections:
            fan_in, fan_out = self.projection_shape(p)
            a = torch.empty(self.num_experts, r, fan_in, dtype=torch.float32)
            for e in range(self.num_experts):  # same init as a per-expert nn.Linear LoRA
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5), generator=generator)
            setattr(self, f"{p}_lora_A", nn.Parameter(a.transpose(1, 2).contiguous().to(device=device, dtype=dtype)))
            setattr(self, f"{p}_lora_B",
                    nn.Parameter(torch.zeros(self.num_experts, r, fan_out, dtype=dtype, device=device)))
        self.lora_scale = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _lora(self, proj: str, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor | None:
        a = getattr(self, f"{proj}_lora_A")
        if a is None:
            return None
        b = getattr(self, f"{proj}_lora_B")
        xd = self.lora_dropout(x)
        h = grouped_matmul(xd, a.to(x.dtype), groups) * self.lora_scale  # scale the rank-r activation
        return grouped_matmul(h, b.to(x.dtype), groups)

    def _frozen_kept(self, proj: str, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """The frozen projection; with `keep_gate_up` its first-pass result is kept for the recomputation of a
        checkpointed layer (models.recompute)."""
        weight = getattr(self, proj)
        if not self.keep_gate_up:
            return frozen_expert_matmul(x, weight, groups)
        known = recompute.kept((self, proj))
        y = frozen_expert_matmul(x, weight, groups, result=known)
        if known is None:
            recompute.keep((self, proj), y)
        return y

    def forward(self, x: torch.Tensor, groups: ExpertGroups, discard_output: bool = False) -> torch.Tensor:
        """`discard_output`: the caller throws the result away (recomputation of a checkpointed layer whose MoE
        output only feeds the residual sum); the frozen down projection is skipped, everything backward reads
        is still computed."""
        gate = self._frozen_kept("gate", x, groups)
        up = self._frozen_kept("up", x, groups)
        delta = self._lora("gate", x, groups)
        if delta is not None:
            gate = gate + delta
        delta = self._lora("up", x, groups)
        if delta is not None:
            up = up + delta
        h = F.silu(gate) * up
        if discard_output:
            out = discarded_output(h, self.hidden_size)
        else:
            out = frozen_expert_matmul(h, self.down, groups)
        delta = self._lora("down", h, groups)
        if delta is not None:
            out = out + delta
        return out

    def extra_repr(self) -> str:
        lora = ""
        if self.gate_lora_A is not None or self.down_lora_A is not None:
            a = self.gate_lora_A if self.gate_lora_A is not None else self.down_lora_A
            lora = f", lora_r={a.shape[-1]}"
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}{lora}"

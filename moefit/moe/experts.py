"""Routed experts of one MoE layer, stored frozen (NF4 or plain) per expert, with an optional LoRA per expert.

LoRA layout: {gate,up,down}_lora_A [E, in, r], {gate,up,down}_lora_B [E, r, out] (per expert e: delta_W_e^T =
A[e] @ B[e] * scale, applied to the tokens routed to e only; the [E, in, out] delta is never materialised).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.nf4 import make_weight
from . import recompute
from .grouped import ExpertGroups, frozen_expert_matmul, grouped_lora

EXPERT_PROJECTIONS = ("gate", "up", "down")


def silu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Llama 4, Qwen3-MoE, Mixtral, GLM-4.5, DeepSeek-V3."""
    return F.silu(gate) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gpt-oss: gate clamped above at `limit`, up to [-limit, limit]; gate * sigmoid(alpha gate) * (up + 1)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


ACTIVATIONS = {"silu_glu": silu_glu, "clamped_swiglu": clamped_swiglu}


class MoefitExperts(nn.Module):
    """Routed experts of one MoE layer: gate/up/down weights stored frozen per expert as [E, out, in].

    forward(x, groups): x holds the routed tokens sorted by expert (groups.counts[e] rows for expert e), already scaled
    by the router where the family scales inputs. Only those rows are computed: cost per token is independent of
    the number of experts. `act`: a name in ACTIVATIONS, with `act_kwargs`; `bias`: frozen per-expert biases
    (gate_bias, up_bias [E, I], down_bias [E, H]; gpt-oss), added to each row by its expert (groups.row_expert).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, act: str = "silu_glu",
                 act_kwargs: dict | None = None, bias: bool = False, quantization: str = "nf4",
                 dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, double_quant: bool = True,
                 device: torch.device | str | None = None, expert_offset: int = 0, total_experts: int | None = None):
        super().__init__()
        self.num_experts = num_experts  # held here
        # Expert parallelism: this module holds experts [expert_offset, expert_offset + num_experts) of the layer's
        # total_experts (moefit.parallel.expert_parallel); checkpoints and adapters name experts globally.
        self.expert_offset = expert_offset
        self.total_experts = num_experts if total_experts is None else total_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        kw = dict(quantization=quantization, dtype=dtype, blocksize=blocksize, double_quant=double_quant,
                  device=device)
        self.gate = make_weight((num_experts, intermediate_size, hidden_size), **kw)
        self.up = make_weight((num_experts, intermediate_size, hidden_size), **kw)
        self.down = make_weight((num_experts, hidden_size, intermediate_size), **kw)
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported expert activation {act!r} (known: {', '.join(ACTIVATIONS)})")
        self.act, self.act_kwargs = ACTIVATIONS[act], dict(act_kwargs or {})
        self.has_bias = bias
        for p in EXPERT_PROJECTIONS:
            width = hidden_size if p == "down" else intermediate_size
            self.register_buffer(f"{p}_bias", torch.zeros(num_experts, width, dtype=dtype, device=device)
                                 if bias else None)
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
            # Every expert of the layer is initialised (same init as a per-expert nn.Linear LoRA), this module keeps
            # its own: a rank holding a slice gets the values a one-GPU run has for those experts.
            a = torch.empty(self.total_experts, r, fan_in, dtype=torch.float32)
            for e in range(self.total_experts):
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5), generator=generator)
            a = a[self.expert_offset:self.expert_offset + self.num_experts]
            setattr(self, f"{p}_lora_A", nn.Parameter(a.transpose(1, 2).contiguous().to(device=device, dtype=dtype)))
            setattr(self, f"{p}_lora_B",
                    nn.Parameter(torch.zeros(self.num_experts, r, fan_out, dtype=dtype, device=device)))
        self.lora_scale = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _lora(self, proj: str, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor | None:
        a = getattr(self, f"{proj}_lora_A")
        if a is None:
            return None
        dropout = self.lora_dropout
        xd = x if isinstance(dropout, nn.Identity) else dropout(x)  # (p = 0: not even a module call)
        return grouped_lora(xd, a, getattr(self, f"{proj}_lora_B"), self.lora_scale, groups)

    def _frozen_kept(self, proj: str, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """The frozen projection; with `keep_gate_up` its first-pass result is kept for the recomputation of a
        checkpointed layer (moe.recompute)."""
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
        if self.has_bias:
            gate = gate + self.gate_bias[groups.row_expert].to(gate.dtype)
            up = up + self.up_bias[groups.row_expert].to(up.dtype)
        h = self.act(gate, up, **self.act_kwargs)
        if discard_output:
            out = frozen_expert_matmul(h, self.down, groups, result=h.new_zeros(h.shape[0], self.hidden_size))
        else:
            out = frozen_expert_matmul(h, self.down, groups)
            if self.has_bias:
                out = out + self.down_bias[groups.row_expert].to(out.dtype)
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

"""moefit model -> tensors under transformers' own parameter names and in-memory layout (the family spec's
`in_memory` expert layout: fused experts), e.g. to run the HF model class with moefit's weights.

Used by the merged export and by parity tests. It yields one tensor at a time (dequantized NF4, optionally with the
LoRA delta merged in), so a caller can write shards without the whole bf16 model in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..moe.experts import MoefitExperts
from .expert_layout import fused_bias_names, fused_names, join_fused, join_outputs, part_projections
from .families import FusedExperts, require_family
from .layers import MoefitLinear, is_lora_name


def _lora_delta_linear(m: MoefitLinear) -> torch.Tensor | None:
    if m.lora_A is None:
        return None
    return (m.lora_B.float() @ m.lora_A.float()) * m.lora_scale  # [out, in]


def _lora_delta_expert(m: MoefitExperts, proj: str, e: int) -> torch.Tensor | None:
    a = getattr(m, f"{proj}_lora_A")
    if a is None:
        return None
    b = getattr(m, f"{proj}_lora_B")
    return (a[e].float() @ b[e].float()).t() * m.lora_scale  # [out, in]


@torch.no_grad()
def linear_weight(m: MoefitLinear, merge_lora: bool, dtype: torch.dtype) -> torch.Tensor:
    w = m.qweight.dequantize(dtype=torch.float32)
    delta = _lora_delta_linear(m) if merge_lora else None
    if delta is not None:
        w = w + delta.to(w.device)
    return w.to(dtype)


@torch.no_grad()
def expert_weight(m: MoefitExperts, proj: str, e: int, merge_lora: bool, dtype: torch.dtype) -> torch.Tensor:
    """One expert's [out, in] weight for proj in gate/up/down."""
    w = getattr(m, proj).dequantize(expert=e, dtype=torch.float32)
    delta = _lora_delta_expert(m, proj, e) if merge_lora else None
    if delta is not None:
        w = w + delta.to(w.device)
    return w.to(dtype)


@torch.no_grad()
def fused_expert_tensors(m: MoefitExperts, layout: FusedExperts, merge_lora: bool, dtype: torch.dtype
                         ) -> dict[str, torch.Tensor]:
    """The bank as fused tensors of `layout` (e.g. Llama 4: gate_up_proj [E, H, 2I], down_proj [E, I, H])."""
    out = {}
    for part, name in fused_names(layout).items():
        out[name] = torch.stack([
            join_fused(layout, part, {p: expert_weight(m, p, e, merge_lora, dtype) for p in part_projections(part)})
            for e in range(m.num_experts)])
    for part, name in fused_bias_names(layout).items():
        out[name] = torch.stack([join_outputs(layout, part, {p: getattr(m, f"{p}_bias")[e].detach().to(dtype)
                                                              for p in part_projections(part)})
                                 for e in range(m.num_experts)])
    return out


def iter_hf_tensors(model: nn.Module, *, merge_lora: bool = False, dtype: torch.dtype = torch.bfloat16,
                    device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in the causal LM's own naming (`model.layers.N...`, `lm_head.weight`), in module order."""
    root = getattr(model, "hf", model)
    spec = require_family(root.config)
    owners = {}
    for name, module in root.named_modules():
        if isinstance(module, (MoefitLinear, MoefitExperts)):
            owners[name] = module
    emitted: set[str] = set()
    for name, module in root.named_modules():
        if name in owners:
            if isinstance(module, MoefitLinear):
                yield f"{name}.weight", linear_weight(module, merge_lora, dtype).to(device)
                if module.bias is not None:
                    yield f"{name}.bias", module.bias.detach().to(device=device, dtype=dtype)
            else:
                for leaf, t in fused_expert_tensors(module, spec.moe.in_memory, merge_lora, dtype).items():
                    yield f"{name}.{leaf}", t.to(device)
            continue
        if any(name.startswith(o + ".") for o in owners if o):
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if full in emitted or is_lora_name(pname):
                continue
            emitted.add(full)
            yield full, p.detach().to(device=device, dtype=dtype)
        for bname, b in module.named_buffers(recurse=False):
            if bname in module._non_persistent_buffers_set:
                continue
            full = f"{name}.{bname}" if name else bname
            yield full, b.detach().to(device)

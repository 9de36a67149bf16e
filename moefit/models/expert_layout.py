"""Routed-expert tensors of a checkpoint <-> moefit's expert banks ([E, out, in] per projection, optional biases),
as a family spec describes them (models.families): fused tensors of all experts (gate and up one after the other
or interleaved, [in, out] or [out, in] slices, plain or MXFP4), or one nn.Linear weight per expert.

The loader, the merged export, the HF-state view and the PEFT export all go through here, so an expert layout is
written once.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from ..errors import MoefitError
from .families import FamilySpec, FusedExperts, PerExpert


@dataclass(frozen=True)
class ExpertTensor:
    """A checkpoint tensor that belongs to a routed-expert bank."""

    module: str  # the experts module's path in the model (e.g. model.layers.0.mlp.experts)
    layout: FusedExperts | PerExpert
    part: str  # fused: "gate_up" or "down"; per expert: "gate", "up" or "down"
    expert: int | None  # per expert: its index; fused: None (the tensor holds them all)
    kind: str = "weight"  # "weight", "bias", or "scales" (MXFP4 exponents, read together with the weight)


def _fused_tensor_names(layout: FusedExperts) -> dict[str, tuple[str, str]]:
    """tensor name under the experts module -> (part, kind)."""
    suffix = "_blocks" if layout.mxfp4 else ""
    names = {layout.gate_up + suffix: ("gate_up", "weight"), layout.down + suffix: ("down", "weight")}
    if layout.mxfp4:
        names.update({layout.gate_up + "_scales": ("gate_up", "scales"), layout.down + "_scales": ("down", "scales")})
    if layout.has_bias:
        names.update({layout.gate_up_bias: ("gate_up", "bias"), layout.down_bias: ("down", "bias")})
    return names


@functools.cache
def _patterns(spec: FamilySpec) -> tuple[tuple[re.Pattern, FusedExperts | PerExpert, dict[str, tuple[str, str]]], ...]:
    experts = re.escape(spec.moe.experts)
    out = []
    for layout in spec.moe.on_disk:
        if isinstance(layout, FusedExperts):
            parts = _fused_tensor_names(layout)
            rx = re.compile(rf"^(?P<mod>.+\.{experts})\.(?P<name>{'|'.join(map(re.escape, parts))})$")
        else:
            parts = {name: (proj, "weight") for proj, name in layout.names().items()}
            rx = re.compile(rf"^(?P<mod>.+\.{experts})\.(?P<e>\d+)\.(?P<name>{'|'.join(map(re.escape, parts))})"
                            r"\.weight$")
        out.append((rx, layout, parts))
    return tuple(out)


def match_expert_tensor(name: str, spec: FamilySpec) -> ExpertTensor | None:
    """`name` is a checkpoint key already mapped to the model's module names (loading.normalize_name)."""
    if spec.moe is None:
        return None
    for rx, layout, parts in _patterns(spec):
        m = rx.match(name)
        if m:
            e = m.groupdict().get("e")
            part, kind = parts[m["name"]]
            return ExpertTensor(m["mod"], layout, part, None if e is None else int(e), kind)
    return None


def part_projections(part: str) -> tuple[str, ...]:
    """The moefit projections a tensor part holds, in their order along its output dimension."""
    return ("gate", "up") if part == "gate_up" else (part,)


def output_index(layout: FusedExperts, part: str, proj: str, width: int) -> torch.Tensor:
    """Positions of `proj`'s `width` outputs along the fused tensor's output dimension."""
    projs = part_projections(part)
    j = projs.index(proj)
    if layout.interleaved:
        return torch.arange(j, width * len(projs), len(projs))
    return torch.arange(j * width, (j + 1) * width)


def split_outputs(layout: FusedExperts, part: str, t: torch.Tensor, intermediate: int) -> dict[str, torch.Tensor]:
    """t [out, ...] (one expert's weight in [out, in], or its bias) -> {projection: its rows}."""
    projs = part_projections(part)
    if t.shape[0] != intermediate * len(projs) and part == "gate_up":
        raise MoefitError(f"a fused gate/up expert tensor has {t.shape[0]} outputs, not 2 x the intermediate size "
                          f"{intermediate} of config.json: checkpoint and config do not match.")
    if len(projs) == 1:
        return {projs[0]: t}
    if layout.interleaved:
        return {p: t[j::len(projs)] for j, p in enumerate(projs)}
    return {p: t[j * intermediate:(j + 1) * intermediate] for j, p in enumerate(projs)}


def join_outputs(layout: FusedExperts, part: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of split_outputs."""
    projs = part_projections(part)
    if len(projs) == 1:
        return parts[projs[0]]
    if layout.interleaved:
        return torch.stack([parts[p] for p in projs], dim=1).flatten(0, 1)
    return torch.cat([parts[p] for p in projs], dim=0)


def split_fused(layout: FusedExperts, part: str, expert_slice: torch.Tensor, intermediate: int
                ) -> dict[str, torch.Tensor]:
    """One expert's slice of a fused weight -> {projection: weight [out, in]}."""
    return split_outputs(layout, part, expert_slice.t() if layout.transposed else expert_slice, intermediate)


def join_fused(layout: FusedExperts, part: str, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of split_fused: {projection: [out, in]} -> one expert's slice of the fused weight."""
    w = join_outputs(layout, part, weights)
    return w.t() if layout.transposed else w


def fused_names(layout: FusedExperts) -> dict[str, str]:
    """part -> the fused weight's name under the experts module."""
    return {"gate_up": layout.gate_up, "down": layout.down}


def fused_bias_names(layout: FusedExperts) -> dict[str, str]:
    """part -> the fused bias's name under the experts module ({} without biases)."""
    return {"gate_up": layout.gate_up_bias, "down": layout.down_bias} if layout.has_bias else {}

"""Routed-expert tensors of a checkpoint <-> moefit's expert banks ([E, out, in] per projection), as a family
spec describes them (models.families): fused tensors of all experts, or one nn.Linear weight per expert.

The loader, the merged export and the HF-state view all go through here, so an expert layout is written once.
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


@functools.cache
def _patterns(spec: FamilySpec) -> tuple[tuple[re.Pattern, FusedExperts | PerExpert, dict[str, str]], ...]:
    experts = re.escape(spec.moe.experts)
    out = []
    for layout in spec.moe.on_disk:
        if isinstance(layout, FusedExperts):
            parts = {layout.gate_up: "gate_up", layout.down: "down"}
            rx = re.compile(rf"^(?P<mod>.+\.{experts})\.(?P<name>{'|'.join(map(re.escape, parts))})$")
        else:
            parts = {name: proj for proj, name in layout.names().items()}
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
            return ExpertTensor(m["mod"], layout, parts[m["name"]], None if e is None else int(e))
    return None


def split_fused(layout: FusedExperts, part: str, expert_slice: torch.Tensor, intermediate: int
                ) -> dict[str, torch.Tensor]:
    """One expert's slice of a fused tensor -> {projection: weight [out, in]}."""
    w = expert_slice.t() if layout.transposed else expert_slice  # [out, in]
    if part == "gate_up":
        if w.shape[0] != 2 * intermediate:
            raise MoefitError(f"a fused gate/up expert slice has shape {tuple(expert_slice.shape)}, which does not "
                              f"hold 2 x the intermediate size {intermediate} of config.json: checkpoint and config "
                              "do not match.")
        return {"gate": w[:intermediate], "up": w[intermediate:]}
    return {"down": w}


def join_fused(layout: FusedExperts, part: str, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of split_fused: {projection: [out, in]} -> one expert's slice of the fused tensor."""
    w = torch.cat([weights["gate"], weights["up"]], dim=0) if part == "gate_up" else weights["down"]
    return w.t() if layout.transposed else w


def fused_names(layout: FusedExperts) -> dict[str, str]:
    """part -> the fused tensor's name under the experts module."""
    return {"gate_up": layout.gate_up, "down": layout.down}


def part_projections(part: str) -> tuple[str, ...]:
    """The moefit projections a tensor part holds."""
    return ("gate", "up") if part == "gate_up" else (part,)

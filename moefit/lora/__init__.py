"""LoRA on attention, shared expert, dense MLPs and every routed expert, with a separate rank for routed experts.

Adapters live inside moefit's modules (`MoefitLinear.lora_A/B`, `MoefitExperts.{gate,up,down}_lora_A/B`); this
module decides where they go and saves/loads them. Saved layout (`adapter_model.safetensors`): the model's own
parameter names, e.g. `model.layers.0.self_attn.q_proj.lora_A` [r, in] and
`model.layers.0.feed_forward.experts.gate_lora_A` [E, in, r_e]; `adapter_config.json` records ranks, alphas,
targets and the base model. `moefit export --adapter` converts to PEFT's format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import LoraConfig, normalize_targets
from ..dtypes import resolve_dtype
from ..errors import MoefitError
from ..models.families import family_for
from ..models.layers import MoefitLinear, is_lora_name
from ..moe.experts import EXPERT_PROJECTIONS, MoefitExperts
from ..rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config, read_adapter_weights

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "add_lora", "adapter_config", "load_adapter", "load_lora_state_dict",
           "lora_parameters", "lora_state_dict", "read_adapter_config", "save_adapter"]


def _root(model: nn.Module) -> nn.Module:
    return getattr(model, "hf", model)


def add_lora(model: nn.Module, r: int | None = None, alpha: float | None = None, dropout: float | None = None,
             targets: list[str] | None = None, expert_r: int | None = None, routed_experts: bool | None = None,
             dtype: torch.dtype | str | None = None, seed: int | None = None, expert_alpha: float | None = None,
             cfg: LoraConfig | None = None) -> dict[str, nn.Parameter]:
    """Add LoRA adapters and freeze everything else. Returns {name: parameter} of the trainable parameters.

    Keyword arguments override `cfg` (default: LoraConfig()). `expert_r=0` or `routed_experts=False` leaves the
    routed experts without LoRA; `expert_alpha` defaults to keeping alpha/r of the attention adapters.
    """
    cfg = cfg or LoraConfig()
    r = cfg.r if r is None else r
    alpha = cfg.alpha if alpha is None else alpha
    dropout = cfg.dropout if dropout is None else dropout
    targets = normalize_targets(cfg.targets if targets is None else targets)
    expert_r = cfg.expert_r if expert_r is None else expert_r
    routed_experts = cfg.routed_experts if routed_experts is None else routed_experts
    expert_alpha = cfg.expert_alpha if expert_alpha is None else expert_alpha
    dtype = resolve_dtype(cfg.dtype if dtype is None else dtype)
    seed = cfg.init_seed if seed is None else seed
    root = _root(model)
    if any(p.requires_grad for p in root.parameters()):
        raise MoefitError("the model already has trainable parameters; add LoRA once, to a freshly loaded model.")
    generator = torch.Generator().manual_seed(seed)
    r_e = r if expert_r is None else expert_r
    alpha_e = expert_alpha if expert_alpha is not None else alpha * r_e / r if r_e else 0.0
    expert_projs = tuple(p for p in EXPERT_PROJECTIONS if f"{p}_proj" in targets)
    spec = family_for(getattr(root.config, "model_type", None))
    leaf_targets = spec.lora_leaves(targets) if spec else set(targets)
    placed = 0
    for name, module in root.named_modules():
        if isinstance(module, MoefitLinear) and name.rsplit(".", 1)[-1] in leaf_targets:
            module.add_lora(r, alpha, dropout, dtype, generator)
        elif isinstance(module, MoefitExperts) and routed_experts and r_e > 0 and expert_projs:
            module.add_lora(r_e, alpha_e, dropout, dtype, generator, expert_projs)
        else:
            continue
        module.train(module.training)  # new submodules (LoRA dropout) start in training mode: match the model's
        placed += 1
    if placed == 0:
        raise MoefitError(f"LoRA targets {targets} match no module of this model.")
    params = {n: p for n, p in root.named_parameters() if is_lora_name(n)}
    for p in params.values():
        p.requires_grad_(True)
    model._moefit_lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": sorted(leaf_targets),
                          "expert_r": r_e if routed_experts and expert_projs else 0, "expert_alpha": alpha_e,
                          "routed_experts": bool(routed_experts and r_e > 0 and expert_projs),
                          "dtype": str(dtype).removeprefix("torch."), "seed": seed}
    return params


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in _root(model).named_parameters() if is_lora_name(n)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = lora_parameters(model)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise MoefitError(f"adapter does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
                          f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Was it trained with the same "
                          "targets and ranks?")
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise MoefitError(f"adapter tensor {n} has shape {tuple(state[n].shape)}, model expects {tuple(p.shape)}.")
        p.copy_(state[n].to(device=p.device, dtype=p.dtype))


def adapter_config(model: nn.Module) -> dict[str, Any]:
    info = getattr(model, "_moefit_lora", None)
    if info is None:
        raise MoefitError("the model has no LoRA adapters (call moefit.add_lora first).")
    return {"format": "moefit-lora", "version": 1, "base_model": getattr(model, "source", None),
            "model_type": getattr(_root(model).config, "model_type", None), **info}


def save_adapter(model: nn.Module, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors of `model`'s LoRA (or of `state`, the whole model's LoRA
    when this process holds a slice of the experts)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {n: t.contiguous().cpu() for n, t in (lora_state_dict(model) if state is None else state).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model), indent=2) + "\n")
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Add LoRA with the saved settings to a freshly loaded model and load the saved weights. The files are
    checked before the model is touched (see moefit.rundir); the new modules take the model's train/eval mode."""
    cfg = read_adapter_config(adapter_dir)
    state = read_adapter_weights(adapter_dir, cfg)
    add_lora(model, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], targets=cfg["targets"],
             expert_r=cfg["expert_r"], routed_experts=cfg["routed_experts"], expert_alpha=cfg["expert_alpha"],
             dtype=cfg["dtype"], seed=cfg.get("seed", 0))
    load_lora_state_dict(model, state)
    return cfg

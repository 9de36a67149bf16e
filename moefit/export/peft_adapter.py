"""Adapter export in PEFT's format (`peft.PeftModel.from_pretrained(base, DIR)` loads it).

Attention, shared-expert and dense-MLP LoRA are PEFT's own layout (lora_A [r, in], lora_B [out, r]) under the
base model class's module names. Routed experts map exactly onto PEFT's `target_parameters` LoRA on the fused
tensors transformers holds in memory (the family spec's `in_memory` layout; peft >= 0.17, checked with 0.21):
Llama 4 `experts.gate_up_proj` [E, H, 2I] / `down_proj` [E, I, H] (slices [in, out]); Qwen3-MoE and Mixtral
`experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] (slices [out, in], as nn.Linear).

  PEFT, per expert e:   delta[e] = scaling * lhs_e @ rhs_e  with
                        rhs_e = lora_A.weight.reshape(E, r', in')[e]          (in' = param.shape[2])
                        lhs_e = lora_B.weight.reshape(out', r', E)[:, :, e]   (out' = param.shape[1])
  moefit, per expert e: delta_gate[e]^T = A_gate[e] @ B_gate[e] * s  ([H, I]), same for up and down.

[in, out] slices, gate_up_proj: lhs_e = [A_gate[e] | A_up[e]] ([H, 2r]), rhs_e = blockdiag(B_gate[e], B_up[e])
               ([2r, 2I]), so rank r' = 2 r_e and lora_alpha' = 2 alpha_e (same alpha/r scaling);
               down_proj: lhs_e = A_down[e] ([I, r_e]), rhs_e = B_down[e] ([r_e, H]), r' = r_e, alpha' = alpha_e.
[out, in] slices: the same with lhs_e = blockdiag(B_gate[e]^T, B_up[e]^T), rhs_e = [A_gate[e]^T ; A_up[e]^T].
Interleaved gate/up (gpt-oss) puts each projection's columns at its strided positions instead of a block. Where
the experts module says `is_transposed` (gpt-oss), PEFT computes delta[e] = (B_e A_e)^T instead of B_e A_e, and
lora_A / lora_B are laid out accordingly (`_put`).
These ranks go in `rank_pattern` / `alpha_pattern`; `r` / `lora_alpha` are the attention ranks.
PEFT refuses dropout on parameter targets, so such an adapter is written with lora_dropout 0 (inference is the
same: dropout is off at inference).

A family whose transformers class holds experts otherwise gets the routed-expert LoRA in `moefit_expert_lora.safetensors` in
moefit's own layout, described in `moefit_expert_lora.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import MoefitError
from ..models.expert_layout import fused_names, output_index, part_projections
from ..models.families import FusedExperts, require_family
from ..rundir import RunInfo
from .merge import ExportReport, LoraSource, copy_side_files
from .staging import check_out_dir, staged_dir

EXPERT_FILE = "moefit_expert_lora.safetensors"
EXPERT_LAYOUT_FILE = "moefit_expert_lora.json"
EXPERT_LAYOUT = {
    "format": "moefit-expert-lora",
    "tensors": "<experts module>.{gate,up,down}_lora_A [E, in, r] and .{gate,up,down}_lora_B [E, r, out] "
               "(module names of the text causal LM, e.g. model.layers.0.feed_forward.experts)",
    "delta": "for expert e and projection p: W_p[e] (nn.Linear layout [out, in]) += (A_p[e] @ B_p[e]).T * scale",
    "hf_fused": "fused tensors: gate_up_proj[e] = [W_gate[e] ; W_up[e]] ([2I, H]), down_proj[e] = W_down[e] "
                "([H, I]); Llama 4 stores the transposes ([H, 2I], [I, H])",
}


def _meta_model(base_dir: Path):
    """The base's own architecture class on the meta device (no memory), for module names."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is None:
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            model = cls(config)
    return model, arch


def _text_prefix(model) -> str:
    """Where the text causal LM's `model.` lives in this class: '' (ForCausalLM) or e.g. 'language_model.'."""
    for name, m in model.named_modules():
        if hasattr(m, "embed_tokens") and hasattr(m, "layers"):
            if name == "model" or name.endswith(".model"):
                return name[: -len("model")]
            return name + ".__decoder__."
    raise MoefitError("cannot find the text decoder in the base model class.")


def _full(prefix: str, text_name: str) -> str:
    if prefix.endswith(".__decoder__."):
        return prefix.removesuffix("__decoder__.") + text_name.removeprefix("model.")
    return prefix + text_name


def _peft_would_retarget(model, target_modules: list[str]) -> set[str]:
    """The target modules that PEFT's transformers-v5 config conversion would rewrite when loading the adapter.
    For Qwen-style and Mixtral-style MoE models it takes every target named `*.gate_proj` / `*.up_proj` /
    `*.down_proj` (`w1`/`w3`/`w2`) for a pre-fusion expert and turns it into an expert parameter target, so a dense
    MLP's LoRA (Qwen3's `mlp_only_layers`) would silently not load. Asks PEFT itself, on the meta model."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without that conversion leaves every target as it is
        return set()
    probe = LoraConfig(r=1, target_modules=list(target_modules))
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    return set(target_modules) - set(probe.target_modules or ())


def _fused_experts_params(model, full_name: str, layout: FusedExperts) -> bool:
    try:
        m = model.get_submodule(full_name)
    except AttributeError:
        return False
    return all(isinstance(getattr(m, p, None), torch.nn.Parameter) and getattr(m, p).dim() == 3
               for p in fused_names(layout).values())


def _peft_factors(layout: FusedExperts, part: str, present: list[str], a: dict[str, torch.Tensor],
                  b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """moefit's per-projection LoRA (A [E, in, r], B [E, r, out]) of the projections `present` in one fused
    tensor -> (lhs [E, d1, R], rhs [E, R, d2]) with lhs[e] @ rhs[e] = that tensor's delta slice [d1, d2], R =
    r x len(present). Each projection's outputs sit where the layout puts them (one after another, or
    interleaved)."""
    num, in_dim, r = a[present[0]].shape
    width = b[present[0]].shape[2]
    out_total = width * len(part_projections(part))
    rank = r * len(present)
    if layout.transposed:  # slice [in, out]: delta^T = A @ B
        lhs, rhs = torch.zeros(num, in_dim, rank), torch.zeros(num, rank, out_total)
    else:  # slice [out, in]: delta = B^T @ A^T
        lhs, rhs = torch.zeros(num, out_total, rank), torch.zeros(num, rank, in_dim)
    for i, p in enumerate(present):
        ranks = slice(i * r, (i + 1) * r)
        outs = output_index(layout, part, p, width)
        if layout.transposed:
            lhs[:, :, ranks] = a[p]
            rhs[:, ranks, :].index_copy_(2, outs, b[p])
        else:
            lhs[:, :, ranks].index_copy_(1, outs, b[p].transpose(1, 2))
            rhs[:, ranks, :] = a[p].transpose(1, 2)
    return lhs, rhs


def peft_export(info: RunInfo, out: Path, *, base: Path | None = None, overwrite: bool = False) -> ExportReport:
    out = Path(out)
    check_out_dir(out, overwrite)
    base_dir = Path(base).expanduser() if base is not None else info.base_dir
    lora = LoraSource(info)
    cfg = info.adapter_config
    model, arch = _meta_model(base_dir)
    spec = require_family(model.config, str(base_dir / "config.json"))
    prefix = _text_prefix(model)
    report = ExportReport(out_dir=out, kind="adapter", base_dir=base_dir)

    tensors: dict[str, torch.Tensor] = {}
    target_modules, target_parameters, rank_pattern, alpha_pattern = [], [], {}, {}
    full_names = {mod: _full(prefix, mod) for mod in sorted(lora.linears)}
    as_parameters = _peft_would_retarget(model, list(full_names.values()))
    for mod, full in full_names.items():
        # A linear PEFT would mistake for a pre-fusion expert is targeted through its weight parameter instead
        # (a 2-D parameter target is plain LoRA: delta = B A * scaling).
        target = f"{full}.weight" if full in as_parameters else full
        tensors[f"base_model.model.{target}.lora_A.weight"] = lora.reader.read(f"{mod}.lora_A").contiguous()
        tensors[f"base_model.model.{target}.lora_B.weight"] = lora.reader.read(f"{mod}.lora_B").contiguous()
        (target_parameters if full in as_parameters else target_modules).append(target)

    separate: dict[str, torch.Tensor] = {}
    r_e, alpha_e = cfg.get("expert_r") or 0, cfg.get("expert_alpha") or 0.0
    layout = spec.moe.in_memory if spec.moe else None
    for mod in sorted(lora.experts):
        full = _full(prefix, mod)
        projs = lora.experts[mod]
        if layout is None or not _fused_experts_params(model, full, layout):
            for p in sorted(projs):
                for leaf in (f"{p}_lora_A", f"{p}_lora_B"):
                    separate[f"{mod}.{leaf}"] = lora.reader.read(f"{mod}.{leaf}").contiguous()
            continue
        a = {p: lora.reader.read(f"{mod}.{p}_lora_A").float() for p in projs}  # [E, in, r]
        b = {p: lora.reader.read(f"{mod}.{p}_lora_B").float() for p in projs}  # [E, r, out]
        for part, pname in fused_names(layout).items():
            present = [p for p in part_projections(part) if p in projs]
            if present:
                lhs, rhs = _peft_factors(layout, part, present, a, b)
                _put(tensors, target_parameters, rank_pattern, alpha_pattern, f"{full}.{pname}", lhs, rhs,
                     alpha_e * len(present), peft_swaps=not getattr(model.get_submodule(full), "is_transposed", False))
    tensors = {k: v.to(_adapter_dtype(cfg)).contiguous() for k, v in tensors.items()}

    wrappers = _param_wrapper_keys(model, target_modules, target_parameters, cfg, rank_pattern, alpha_pattern)
    renamed = {}
    for key, t in tensors.items():
        renamed[wrappers.get(key, key)] = t

    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(info.source if base is None
                                                                                       else base_dir),
        "r": int(cfg["r"]), "lora_alpha": float(cfg["alpha"]),
        "lora_dropout": 0.0 if target_parameters else float(cfg.get("dropout", 0.0)),
        "target_modules": target_modules, "target_parameters": target_parameters or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False,
    }
    with staged_dir(out, overwrite) as tmp:
        save_file(renamed, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2) + "\n")
        report.tensors_written = len(renamed)
        report.total_bytes = sum(t.numel() * t.element_size() for t in renamed.values())
        if separate:
            save_file(separate, str(tmp / EXPERT_FILE), metadata={"format": "pt"})
            layout = {**EXPERT_LAYOUT, "scale": lora.expert_scale, "expert_r": r_e, "expert_alpha": alpha_e}
            (tmp / EXPERT_LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n")
            report.tensors_written += len(separate)
            report.total_bytes += sum(t.numel() * t.element_size() for t in separate.values())
            report.notes.append(f"routed-expert LoRA of {len({k.rpartition('.')[0] for k in separate})} modules is "
                                f"not expressible by PEFT for {arch}: written to {EXPERT_FILE} ({EXPERT_LAYOUT_FILE} "
                                "describes the layout); PEFT loads the rest.")
        elif target_parameters:
            report.notes.append(f"routed experts exported as PEFT target_parameters ({len(target_parameters)} fused "
                                "expert tensors; rank_pattern/alpha_pattern hold their ranks); lora_dropout set to 0 "
                                "(PEFT refuses dropout on parameter targets; inference is unchanged).")
        copy_side_files(base_dir, tmp, report, tokenizer_only=True)
    report.notes += info.notes
    return report


def _adapter_dtype(cfg: dict) -> torch.dtype:
    return torch.bfloat16 if cfg.get("dtype") == "bfloat16" else torch.float32


def _put(tensors, target_parameters, rank_pattern, alpha_pattern, full_param: str, lhs: torch.Tensor,
         rhs: torch.Tensor, alpha: float, peft_swaps: bool) -> None:
    """lhs [E, d1, r'], rhs [E, r', d2] (delta[e] = lhs[e] @ rhs[e], param [E, d1, d2]) -> PEFT's lora_A [E*r', in]
    (expert-major) and lora_B [out, r'*E] (rank-major, expert-minor). PEFT computes delta[e] = B_e A_e when it
    swaps in/out (the parameter's module has no `is_transposed`, e.g. Llama 4, Qwen3-MoE), else (B_e A_e)^T
    (gpt-oss)."""
    num, _, rank = lhs.shape
    a, b = (rhs, lhs) if peft_swaps else (lhs.transpose(1, 2), rhs.transpose(1, 2))  # A [E, r', in], B [E, out, r']
    tensors[f"base_model.model.{full_param}.lora_A.weight"] = a.reshape(num * rank, a.shape[2])
    tensors[f"base_model.model.{full_param}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], rank * num)
    target_parameters.append(full_param)
    rank_pattern[full_param] = rank
    alpha_pattern[full_param] = alpha


def _param_wrapper_keys(model, target_modules, target_parameters, cfg, rank_pattern, alpha_pattern
                        ) -> dict[str, str]:
    """PEFT nests one wrapper per targeted parameter of a module (`experts`, `experts.base_layer`, ...), in an
    order of its choosing: ask PEFT itself, on the meta model, which wrapper holds which parameter."""
    if not target_parameters:
        return {}
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=int(cfg["r"]), lora_alpha=float(cfg["alpha"]), lora_dropout=0.0,
                    target_modules=list(target_modules) or None, target_parameters=list(target_parameters),
                    rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, lc, low_cpu_mem_usage=True)
    mapping = {}
    for name, m in peft_model.named_modules():
        if type(m).__name__ == "ParamWrapper":
            unwrapped = name.replace(".base_layer", "")
            src = f"{unwrapped}.{m.parameter_name}".removeprefix("base_model.model.")
            for leaf in ("lora_A", "lora_B"):
                mapping[f"base_model.model.{src}.{leaf}.weight"] = f"{name}.{leaf}.weight"
    return mapping

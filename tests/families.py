"""Tiny checkpoints of every MoE family moefit trains, written by transformers itself (so the files have the hub's
on-disk expert layout), and the reference math the family-parametrized tests compare moefit against.

A new family gets tests/test_families.py's tests by adding its tiny config to CASES.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from moefit.assets import tiny_model_dir
from moefit.lora import lora_parameters
from moefit.models.expert_layout import fused_names, join_fused, part_projections
from moefit.models.families import FamilySpec, family_for
from moefit.models.hf_state import iter_hf_tensors
from moefit.models.layers import MoefitLinear
from moefit.moe.experts import EXPERT_PROJECTIONS, MoefitExperts
from tests.test_engine_parity import CONFIGS as LLAMA4_CONFIGS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


@dataclass(frozen=True)
class Case:
    """A tiny model of one family: its transformers config and causal-LM classes and their arguments."""

    config_class: str
    model_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def config(self, **overrides):
        return getattr(transformers, self.config_class)(**{**COMMON, **self.kwargs, **overrides})

    def spec(self) -> FamilySpec:
        return family_for(self.config().model_type)


LLAMA4 = dict(intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=3, attention_chunk_size=8,
              use_qk_norm=True)
CASES = {
    **{f"llama4-{name}": Case("Llama4TextConfig", "Llama4ForCausalLM", {**LLAMA4, **kw})
       for name, kw in LLAMA4_CONFIGS.items()},
    # a dense layer between two MoE layers (mlp_only_layers), renormalised top-k as in Qwen3-30B-A3B
    "qwen3_moe": Case("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe-unnormalized": Case("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False)),
    "mixtral": Case("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=32, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)),
    # sliding + full attention layers with sinks; a small SwiGLU limit so the clamp is exercised
    "gpt_oss": Case("GptOssConfig", "GptOssForCausalLM", dict(
        intermediate_size=32, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
        swiglu_limit=0.1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # a dense first layer, 2 expert groups of 4 with 1 chosen, scaling 2.5, a shared expert, partial RoPE
    "glm4_moe": Case("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, n_shared_experts=1,
        first_k_dense_replace=1, norm_topk_prob=True, attention_bias=True, partial_rotary_factor=0.5)),
    # GLM-4.5's MoE with multi-head latent attention (low-rank q and kv, decoupled RoPE dims)
    "deepseek_v3": Case("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, head_dim=8, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, n_shared_experts=1,
        first_k_dense_replace=1, norm_topk_prob=True, rope_scaling=None)),
}
FAMILY_CASES = ("llama4-top2-4e-rope", "qwen3_moe", "mixtral", "gpt_oss", "glm4_moe", "deepseek_v3")  # one case per family, for the slower tests


def experts_override(case: Case, num_experts: int, top_k: int) -> dict[str, int]:
    """Config arguments that set the number of routed experts and top-k of `case`'s family."""
    moe = case.spec().moe
    return {moe.num_experts: num_experts, moe.top_k: top_k}


def tokenizer_ids() -> dict[str, int]:
    """vocab_size and special ids that fit the shipped tiny tokenizer."""
    tok = json.loads((tiny_model_dir() / "tokenizer.json").read_text())
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return dict(vocab_size=max(ids) + 9, pad_token_id=5, bos_token_id=0, eos_token_id=4)


def write_checkpoint(path: Path, case: Case, seed: int = 0, tokenizer: bool = False, **overrides):
    """`case`'s model with random fp32 weights, saved by transformers' save_pretrained into `path`; returns the
    transformers model (eager attention, eval mode). Router and expert weights get a larger spread so routing is
    decisive and the experts matter. `tokenizer`: ids of the shipped tiny tokenizer, whose files are copied."""
    config = case.config(**({**tokenizer_ids(), **overrides} if tokenizer else overrides))
    spec = family_for(config.model_type)
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(config).float().eval()
    router = f".{spec.moe.router}."
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{spec.moe.experts}." in name or router in name:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():  # a router's score-correction bias (GLM-4.5) decides the choice
            if router in name and b.is_floating_point():
                b.normal_(0.0, 0.1)
    model.save_pretrained(path)
    if tokenizer:
        for f in TOKENIZER_FILES:
            shutil.copy(tiny_model_dir() / f, Path(path) / f)
    model.config._attn_implementation = "eager"
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def reference_params(moe_model, merge: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """transformers' parameter dict holding moefit's dequantized frozen weights, plus deltas added by name."""
    params = dict(iter_hf_tensors(moe_model, dtype=torch.float32))
    for name, delta in (merge or {}).items():
        params[name] = params[name] + delta
    return params


def randomize_lora(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def lora_deltas(model) -> dict[str, torch.Tensor]:
    """transformers-named weight deltas (its in-memory layout) as differentiable functions of moefit's LoRA
    parameters: linear W += B A * s; expert e, projection p: W_p[e] ([out, in]) += (A_p[e] B_p[e])^T * s."""
    layout = family_for(model.config.model_type).moe
    deltas = {}
    for name, m in model.hf.named_modules():
        if isinstance(m, MoefitLinear) and m.lora_A is not None:
            deltas[f"{name}.weight"] = (m.lora_B @ m.lora_A) * m.lora_scale
        elif isinstance(m, MoefitExperts) and m.gate_lora_A is not None:
            per = {p: torch.bmm(getattr(m, f"{p}_lora_A"), getattr(m, f"{p}_lora_B")).transpose(1, 2) * m.lora_scale
                   for p in EXPERT_PROJECTIONS}
            for part, tensor in fused_names(layout.in_memory).items():
                deltas[f"{name}.{tensor}"] = torch.stack([
                    join_fused(layout.in_memory, part, {p: per[p][e] for p in part_projections(part)})
                    for e in range(m.num_experts)])
    return deltas


def write_mxfp4_copy(src: Path, dst: Path) -> Path:
    """gpt-oss's hub layout from a checkpoint save_pretrained wrote: fused expert weights as MXFP4 `*_blocks` /
    `*_scales` ([E, out, in/32, 16] / [E, out, in/32]), biases and the rest unchanged, and the mxfp4
    quantization_config the hub's config.json carries."""
    from safetensors.torch import load_file, save_file

    from moefit.quant.mxfp4 import quantize_mxfp4

    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, t in load_file(str(Path(src) / "model.safetensors")).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] in memory and in bf16 files
            out[key + "_blocks"], out[key + "_scales"] = quantize_mxfp4(t.transpose(1, 2).contiguous())
        else:
            out[key] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def write_fp8_copy(src: Path, dst: Path, block: tuple[int, int] = (32, 32)) -> Path:
    """DeepSeek-V3's hub layout from a checkpoint save_pretrained wrote: every 2-D projection weight (attention,
    dense and shared MLPs, each expert; not embeddings, norms, router) float8_e4m3fn with a `weight_scale_inv` per
    block, and the fp8 quantization_config (a block smaller than the hub's 128 so the tiny weights span several)."""
    from safetensors.torch import load_file, save_file

    from moefit.quant.fp8 import quantize_fp8_blocks

    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, t in load_file(str(Path(src) / "model.safetensors")).items():
        if key.endswith("_proj.weight") or key.endswith(("w1.weight", "w2.weight", "w3.weight")):
            out[key], out[key + "_scale_inv"] = quantize_fp8_blocks(t, block)
        else:
            out[key] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (Path(src) / f).is_file():
            shutil.copy(Path(src) / f, dst / f)
    return dst

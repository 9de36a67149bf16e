"""Build an HF model skeleton with moefit's modules put in, without allocating the bf16 model anywhere.

The HF model class is instantiated on the meta device (no memory); then, by module path, every frozen linear
becomes a `MoefitLinear` (NF4 storage) and every MoE block a `MoefitMoE` with `MoefitExperts`, created directly
on the target device. With `engine.rms_norm: fused` the RMS norms become `FusedRMSNorm` (models/rms_norm.py).
What is left on meta (embeddings, norms, router, lm_head) is allocated empty in the compute dtype; the loader (or
the synthetic-weight builder) then fills every tensor exactly once.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from .. import engine_switches
from ..config import QuantConfig
from ..moe.block import MoefitMoE
from ..moe.experts import MoefitExperts
from ..moe.routing import ROUTING, RoutingRule
from .families import FamilySpec, require_family
from .host_embedding import HostEmbedding
from .layers import MoefitLinear
from .rms_norm import replace_rms_norms

if TYPE_CHECKING:
    from ..parallel.expert_parallel import ExpertShard


def text_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """Llama4Config (multimodal) -> its text config; text configs unchanged."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _keep_unquantized(name: str, keep: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(leaf == k or name.endswith("." + k) or name == k for k in keep)


def build_skeleton(config: PretrainedConfig, *, quant: QuantConfig, dtype: torch.dtype,
                   device: torch.device | str, attn_implementation: str = "sdpa",
                   expert_shard: ExpertShard | None = None) -> nn.Module:
    """The HF model with moefit's modules, weights empty. `expert_shard`: build only that slice of every MoE
    layer's routed experts (expert parallelism)."""
    config = text_config_of(config)
    spec = require_family(config)
    config._attn_implementation = _attention_for(config, attn_implementation, spec)
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    kw = dict(quantization=quant.weights, dtype=dtype, blocksize=quant.blocksize, double_quant=quant.double_quant,
              device=device)
    _replace_moe_blocks(model, config, spec, kw, expert_shard)
    _replace_linears(model, quant.keep_unquantized, {**kw, "scales_fp32": quant.fp32_linear_scales})
    if quant.embeddings_on_host:
        _embeddings_to_host(model, config, dtype, device)
    if engine_switches.current().rms_norm == "fused":
        replace_rms_norms(model)
    for module in model.modules():
        if isinstance(module, MoefitMoE):
            module.mark_discardable_outputs()
    _materialize_meta(model, dtype, device)
    _reset_rotary(model, config, device)
    model.requires_grad_(False)
    return model


def _attention_for(config: PretrainedConfig, wanted: str, spec: FamilySpec) -> str:
    """`wanted`; for SDPA in a family with attention sinks, moefit's fused form of it (sink_attention); eager where
    the model class has no SDPA path otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if wanted == "sdpa" and spec.attention_sinks:
        from . import sink_attention

        return sink_attention.register()
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if wanted == "sdpa" and cls is not None and not getattr(cls, "_supports_sdpa", True):
        return "eager"
    return wanted


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _replace_moe_blocks(model: nn.Module, config: PretrainedConfig, spec: FamilySpec, kw: dict,
                        shard: ExpertShard | None = None) -> None:
    """Every instance of the family's MoE block class -> a MoefitMoE with the spec's routing rule, keeping the
    block's router and shared expert (their linears become MoefitLinear afterwards)."""
    moe = spec.moe
    if moe is None:
        return
    if moe.hidden_act is not None and getattr(config, "hidden_act", moe.hidden_act) != moe.hidden_act:
        from ..errors import MoefitError

        raise MoefitError(f"config.json: hidden_act {config.hidden_act!r}; moefit's {spec.name} experts implement "
                          f"{moe.hidden_act!r} only.")
    block_class = getattr(importlib.import_module(spec.modeling), moe.block_class)
    rule = RoutingRule(top_k=getattr(config, moe.top_k), fn=ROUTING[moe.routing],
                       normalize_topk=moe.normalize(config), scale_inputs=moe.scale_inputs,
                       fp32_logits=moe.router_fp32, options=moe.routing_options(config))
    for name, module in list(model.named_modules()):
        if isinstance(module, block_class):
            total = getattr(config, moe.num_experts)
            if shard is not None and shard.num_experts != total:
                raise ValueError(f"expert shard of {shard.num_experts} experts for a model with {total}")
            experts = MoefitExperts(shard.local if shard else total, config.hidden_size,
                                    getattr(config, moe.expert_intermediate), act=moe.activation,
                                    act_kwargs=moe.activation_kwargs(getattr(module, moe.experts)),
                                    bias=moe.in_memory.has_bias,
                                    expert_offset=shard.start if shard else 0, total_experts=total, **kw)
            shared = getattr(module, moe.shared_expert) if moe.shared_expert else None
            block = MoefitMoE(
                getattr(module, moe.router), experts, shared, rule, output_feeds_residual=moe.output_feeds_residual,
                router_name=moe.router, shared_name=moe.shared_expert or "shared_expert", experts_name=moe.experts,
                return_router_logits=moe.returns_router_logits)
            block.num_experts = total  # routing is over every expert; the dispatch sends rows to their owner
            _set_module(model, name, block)


def _embeddings_to_host(model: nn.Module, config: PretrainedConfig, dtype: torch.dtype,
                        device: torch.device | str) -> None:
    if getattr(config, "tie_word_embeddings", False):
        from ..errors import MoefitError

        raise MoefitError("quantization.embeddings_on_host: this model ties its lm_head to the input embedding, "
                          "and the lm_head must stay on the GPU. Set embeddings_on_host: false for it.")
    emb = model.get_input_embeddings()
    model.set_input_embeddings(HostEmbedding(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, dtype, device))


def _replace_linears(model: nn.Module, keep: list[str], kw: dict) -> None:
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not _keep_unquantized(name, keep):
            _set_module(model, name, MoefitLinear(module.in_features, module.out_features,
                                                  bias=module.bias is not None, **kw))


def _kept_in_fp32(model: nn.Module, dtype: torch.dtype) -> re.Pattern[str] | None:
    """Names of the tensors from_pretrained keeps in fp32 when it loads the model in fp16 / bf16: the model's
    `_keep_in_fp32_modules_strict`, searched in each name with `*` for any run, as transformers matches them.
    transformers 5.17 creates some of them in the build dtype (DeepSeek-V3's e_score_correction_bias), leaving
    the upcast to its loader; 5.24 creates them in fp32."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None)
    if not keep or dtype not in (torch.float16, torch.bfloat16):
        return None
    return re.compile("|".join(k.replace("*", ".*") for k in sorted(keep)))


def _materialize_meta(model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> None:
    fp32 = _kept_in_fp32(model, dtype)

    def dtype_of(name: str, t: torch.Tensor, default: torch.dtype) -> torch.dtype:
        keep = fp32 is not None and t.is_floating_point() and fp32.search(name) is not None
        return torch.float32 if keep else default

    for prefix, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                # fp32 where the model class asks for it against the build dtype (GLM-4.5's router weight)
                keep = p.dtype if p.dtype == torch.float32 and p.is_floating_point() else dtype
                setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=dtype_of(f"{prefix}.{name}", p, keep),
                                                               device=device), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                module.register_buffer(name, torch.empty(b.shape, dtype=dtype_of(f"{prefix}.{name}", b, b.dtype),
                                                         device=device),
                                       persistent=name not in module._non_persistent_buffers_set)


def _reset_rotary(model: nn.Module, config: PretrainedConfig, device: torch.device | str) -> None:
    """Rotary tables are computed at construction, which happened on meta: compute them again for real."""
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            _set_module(model, name, type(module)(config=config).to(device))


def tie_if_needed(model: nn.Module, config: PretrainedConfig) -> None:
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.get_input_embeddings().weight

"""Models with synthetic weights at real shapes: no download, no disk, no bf16 copy of the model.

`build_synthetic_model` makes the model from a preset's config.json (or any config) directly in NF4 on the target
device, tensor by tensor from random numbers: the same modules, layouts and code paths as a loaded checkpoint.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ..config import LoraConfig, QuantConfig
from ..models.causal_lm import MoefitCausalLM
from ..models.layers import MoefitLinear
from ..moe.experts import EXPERT_PROJECTIONS, MoefitExperts
from ..plan.model_facts import resolve_config_path


def load_config_json(model: str):
    """A model name as `moefit plan` reads it (a preset, a directory with config.json, a config.json path or a hub
    id; plan.model_facts.resolve_config_path) -> transformers text config."""
    from transformers import AutoConfig

    from ..models.build import text_config_of

    path = resolve_config_path(model)
    values = json.loads(path.read_text())
    model_type = values.pop("model_type")
    return text_config_of(AutoConfig.for_model(model_type, **values))


def truncate_layers(config, num_layers: int) -> None:
    """Keep the first `num_layers` decoder layers of a config: per-layer lists are cut, layer-index lists
    (`moe_layers`) keep the indices that still exist."""
    config.num_hidden_layers = num_layers
    for key in ("no_rope_layers", "layer_types"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            setattr(config, key, value[:num_layers])
    moe_layers = getattr(config, "moe_layers", None)
    if isinstance(moe_layers, list):
        config.moe_layers = [i for i in moe_layers if i < num_layers]


# Recorded with every measurement of a synthetic model (moefit bench, plan_validation): records without it ran
# with frozen weights that decoded to 0 (the fill before 2026-12-02), 4-6 % less GPU time on GPU-bound steps.
SYNTHETIC_WEIGHTS = "random normal (std = initializer_range), NF4 as filled"


@torch.no_grad()
def fill_synthetic(model: nn.Module, *, std: float, seed: int = 0) -> None:
    """Random weights for every tensor, generated and quantized on the tensors' own devices."""
    root = getattr(model, "hf", model)
    device = root.get_output_embeddings().weight.device  # (the input embedding may be in host memory)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape, dtype):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)

    owned = set()
    for name, module in root.named_modules():
        if isinstance(module, MoefitLinear):
            module.load_weight(randn((module.out_features, module.in_features), torch.bfloat16))
            owned.add(name)
        elif isinstance(module, MoefitExperts):
            for proj in EXPERT_PROJECTIONS:
                store = getattr(module, proj)
                for e in range(module.num_experts):
                    store.quantize_(randn(store.slice_shape, torch.bfloat16), expert=e)
            owned.add(name)

    def filled(name: str) -> bool:  # a tensor of a module filled (and quantized) above
        return any(name.startswith(o + ".") for o in owned)

    for name, p in root.named_parameters():
        if filled(name) or p.requires_grad:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(randn(p.shape, p.dtype))
    # Persistent buffers, e.g. GLM-4.5's router correction bias: zero, not garbage. Not those of the quantized
    # weights just filled (their NF4Weight holds the double quantization's second-level scales and offset as
    # float buffers: zeroed, every frozen weight decoded to 0, as all synthetic models did from 2026-11-30 07:39
    # to 2026-12-02).
    for name, module in root.named_modules():
        if name in owned or filled(name):
            continue
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and bname not in module._non_persistent_buffers_set:
                b.zero_()
    table = root.get_input_embeddings().weight
    if not isinstance(table, nn.Parameter):  # a HostEmbedding's buffer
        table.copy_(randn(table.shape, table.dtype))


def build_synthetic_model(model: str, *, num_layers: int | None = None, quant: QuantConfig | None = None,
                          lora: LoraConfig | None = None, device: str | torch.device = "cuda",
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0, expert_shard=None) -> MoefitCausalLM:
    """`expert_shard` (moefit.parallel.expert_parallel.ExpertShard): build only that slice of the routed experts
    (attach the dispatch before running it)."""
    from ..lora import add_lora
    from ..models.build import build_skeleton

    quant = quant or QuantConfig()
    config = load_config_json(model)
    if num_layers is not None:
        truncate_layers(config, num_layers)
    hf = build_skeleton(config, quant=quant, dtype=dtype, device=device, expert_shard=expert_shard)
    fill_synthetic(hf, std=getattr(config, "initializer_range", 0.02), seed=seed)
    out = MoefitCausalLM(hf, source=model, source_dir=None, quantization=quant.weights, dtype=dtype)
    if lora is not None:
        add_lora(out, cfg=lora)
    return out

"""Model loading: an HF checkpoint (or the embedded tiny model) -> a moefit model with NF4 weights."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..config import EngineConfig, QuantConfig
from ..dtypes import resolve_dtype

if TYPE_CHECKING:
    import torch

    from .causal_lm import MoefitCausalLM

# torch is imported on first use: `models.families` (the family specs) is read by the torch-free planner.
__all__ = ["CausalLMOutput", "MoefitCausalLM", "load", "load_model", "resolve_dtype"]



def __getattr__(name: str) -> Any:
    if name in ("CausalLMOutput", "MoefitCausalLM"):
        from . import causal_lm

        return getattr(causal_lm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_model(source: str = "tiny", quantization: str = "nf4", dtype: torch.dtype | str = "bfloat16",
               device: torch.device | str = "cpu", quant: QuantConfig | None = None,
               attn_implementation: str = "sdpa", engine: EngineConfig | None = None,
               expert_shard=None) -> MoefitCausalLM:
    """Load a causal LM for QLoRA training: `source` is 'tiny', a local directory (config.json + safetensors,
    no tokenizer needed) or a hub id. Frozen weights are NF4 (`quantization="nf4"`) or plain ("none").
    `engine` (config `engine:`) picks the kernels for this process; None keeps the current ones.
    `expert_shard` (a moefit.parallel.expert_parallel.ExpertShard): build and read only that slice of every MoE
    layer's routed experts; attach the dispatch with `expert_parallel.attach_dispatch` before running it."""
    from transformers import AutoConfig

    from .. import engine_switches
    from ..loading import resolve_source, stream_weights
    from .build import build_skeleton, text_config_of, tie_if_needed
    from .causal_lm import MoefitCausalLM

    engine_switches.use(engine or engine_switches.current())
    dtype = resolve_dtype(dtype)
    quant = quant or QuantConfig()
    if quantization != quant.weights:
        quant = dataclasses.replace(quant, weights=quantization)
    model_dir = resolve_source(source)
    config = text_config_of(AutoConfig.from_pretrained(model_dir))
    hf = build_skeleton(config, quant=quant, dtype=dtype, device=device, attn_implementation=attn_implementation,
                        expert_shard=expert_shard)
    report = stream_weights(hf, model_dir, device)
    tie_if_needed(hf, hf.config)
    model = MoefitCausalLM(hf, source=source, source_dir=model_dir, quantization=quant.weights, dtype=dtype)
    model.load_report = report
    model.eval()
    return model


def load(source: str = "tiny", quantization: str = "nf4", **kwargs):
    """(model, tokenizer) for `source`."""
    from ..data import load_tokenizer

    model = load_model(source, quantization=quantization, **kwargs)
    return model, load_tokenizer(str(model.source_dir))

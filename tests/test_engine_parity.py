"""Tiny Llama 4 checkpoints written by transformers (the variants below are also cases of the family-parametrized
parity tests, tests/test_families.py) and the NF4 storage of their routed experts."""

from __future__ import annotations

import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

import moefit
from moefit.moe.experts import MoefitExperts

CONFIGS = {
    "top1-4e-norope": dict(num_local_experts=4, num_experts_per_tok=1, no_rope_layers=[1, 1, 0]),
    "top2-4e-rope": dict(num_local_experts=4, num_experts_per_tok=2, no_rope_layers=[1, 1, 1]),
    "top1-8e-rope": dict(num_local_experts=8, num_experts_per_tok=1, no_rope_layers=[1, 1, 1]),
    "top2-8e-norope": dict(num_local_experts=8, num_experts_per_tok=2, no_rope_layers=[0, 1, 1]),
    # Maverick's layout: MoE every 2nd layer, dense MLP (intermediate_size_mlp) between, no qk-norm
    "top1-4e-interleaved": dict(num_local_experts=4, num_experts_per_tok=1, no_rope_layers=[1, 1, 0],
                                interleave_moe_layer_step=2, use_qk_norm=False),
}


def tiny_config(**kw) -> Llama4TextConfig:
    base = dict(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, attention_chunk_size=8,
                max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_qk_norm=True,
                tie_word_embeddings=False)
    base.update(kw)
    return Llama4TextConfig(**base)


def write_checkpoint(path, config: Llama4TextConfig, seed: int = 0) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    model.config._attn_implementation = "eager"
    return model


def test_nf4_storage_is_four_bit(tmp_path):
    cfg = tiny_config(**CONFIGS["top1-8e-rope"])
    write_checkpoint(tmp_path, cfg)
    model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.bfloat16)
    experts = [m for m in model.hf.modules() if isinstance(m, MoefitExperts)]
    assert len(experts) == cfg.num_hidden_layers
    for m in experts:
        assert m.gate.packed.dtype == torch.uint8
        values = m.num_experts * m.hidden_size * m.intermediate_size
        assert m.gate.packed.numel() == values // 2
        bits = 8 * m.gate.nbytes() / values
        assert 4.0 < bits < 4.3  # 4 bits + double-quantized absmax (~0.127 bit at blocksize 64)
    assert not any(p.dtype == torch.bfloat16 and p.ndim == 3 for p in model.parameters())

"""Routed-only compute: expert FLOPs per token are proportional to top_k and independent of the expert count."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Llama4ForCausalLM

import moefit
from moefit.lora import add_lora
from tests.test_engine_parity import tiny_config


def expert_flops(tmp_path, num_experts: int, top_k: int, tokens: int = 64) -> tuple[int, int]:
    cfg = tiny_config(num_local_experts=num_experts, num_experts_per_tok=top_k, no_rope_layers=[1, 1, 0])
    torch.manual_seed(0)
    Llama4ForCausalLM(cfg).save_pretrained(tmp_path / f"e{num_experts}k{top_k}")
    model = moefit.load_model(str(tmp_path / f"e{num_experts}k{top_k}"), quantization="nf4", dtype=torch.float32)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    ids = torch.randint(3, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, labels=ids).loss.backward()
    per_module = counter.get_flop_counts()
    experts = sum(sum(v.values()) for k, v in per_module.items() if k.endswith("feed_forward.experts"))
    return experts, counter.get_total_flops()


def test_expert_flops_scale_with_top_k_not_num_experts(tmp_path):
    cfg = tiny_config()
    h, i, r, layers, tokens = cfg.hidden_size, cfg.intermediate_size, 4, cfg.num_hidden_layers, 64
    f4k1, _ = expert_flops(tmp_path, 4, 1, tokens)
    f8k1, _ = expert_flops(tmp_path, 8, 1, tokens)
    f8k2, _ = expert_flops(tmp_path, 8, 2, tokens)
    assert f4k1 > 0
    assert f8k1 == f4k1  # twice the experts, same work per token
    assert f8k2 == 2 * f4k1  # twice top_k, twice the work
    # Exact count for routed rows only: forward 3 matmuls (2*H*I each) + LoRA, backward 2x forward for the
    # LoRA matmuls and 1x for the frozen weights (no weight gradient). Every expert on every token would be
    # num_experts/top_k times this.
    frozen = 3 * 2 * h * i
    lora = 2 * (2 * h * r + 2 * r * i) + (2 * i * r + 2 * r * h)
    per_token = frozen * 2 + lora * 3
    assert f4k1 == layers * tokens * per_token

"""The planner's weight and LoRA budget against a real moefit model built on CPU (tiny shapes, same code path
as on the GPU: moefit.models.build.build_skeleton + moefit.lora.add_lora)."""

from __future__ import annotations

import pytest

from moefit.config import LoraConfig, QuantConfig
from moefit.plan.calibration import load_calibration
from moefit.plan.memory import RunShape, estimate_memory
from moefit.plan.model_facts import facts_from_config

torch = pytest.importorskip("torch")

TINY = {
    "llama4_text": dict(model_type="llama4_text", hidden_size=64, intermediate_size=128, intermediate_size_mlp=256,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        num_local_experts=4, num_experts_per_tok=1, vocab_size=512, interleave_moe_layer_step=2,
                        tie_word_embeddings=False),
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}



def _family_configs() -> dict[str, dict]:
    """The tiny MoE families of the family-parametrized tests (tests/families.py), as config.json dicts.
    DeepSeek-V3 is left out: the planner counts its latent attention's LoRA approximately."""
    from tests.families import CASES

    return {name: CASES[name].config().to_dict() for name in ("qwen3_moe", "mixtral", "gpt_oss", "glm4_moe")}


TINY.update(_family_configs())


def _hf_config(d):
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("expert_r", [None, 0, 4])
def test_weights_and_lora_match_a_built_model(family, expert_r):
    from moefit.lora import add_lora
    from moefit.models.build import build_skeleton

    quant = QuantConfig()
    lora = LoraConfig(r=8, expert_r=expert_r, routed_experts=expert_r != 0)
    model = build_skeleton(_hf_config(TINY[family]), quant=quant, dtype=torch.bfloat16, device="cpu")
    frozen = [t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if "inv_freq" not in n]
    real_frozen = sum(t.numel() * t.element_size() for t in frozen)
    params = add_lora(model, cfg=lora)
    real_trainable = sum(p.numel() for p in params.values())

    facts = facts_from_config(TINY[family], name=f"tiny-{family}")
    m = estimate_memory(facts, RunShape(seq_len=64, quant=quant, lora=lora), load_calibration())
    planned_frozen = sum(c.bytes for c in m.components if c.kind == "weights")
    assert m.trainable_params == real_trainable
    # the planner charges each tensor the allocator's 512-byte rounding; nothing more, nothing less
    assert real_frozen <= planned_frozen <= real_frozen + 512 * len(frozen)
    assert facts.total_params() == sum(p.numel() for p in model.parameters() if not p.requires_grad) + sum(
        w.numel() * 2 for mod in model.modules() for n, w in mod.named_buffers(recurse=False)
        if n == "packed") + sum(b.numel() for mod in model.modules() for n, b in mod.named_buffers(recurse=False)
                                if n.endswith("bias"))  # linear, expert (gpt-oss) and router-correction biases


@pytest.mark.parametrize("family", ["llama4_text", "qwen3_moe", "gpt_oss"])
def test_one_gpus_share_under_expert_parallelism_matches_a_built_shard(family):
    """parallel.expert 2: the planner's per-GPU weights and LoRA equal a model built with half the experts."""
    from moefit.lora import add_lora
    from moefit.models.build import build_skeleton
    from moefit.parallel.expert_parallel import ExpertShard

    quant, lora = QuantConfig(), LoraConfig(r=8, expert_r=4)
    facts = facts_from_config(TINY[family], name=f"tiny-{family}")
    model = build_skeleton(_hf_config(TINY[family]), quant=quant, dtype=torch.bfloat16, device="cpu",
                           expert_shard=ExpertShard(1, 2, facts.num_experts))
    frozen = [t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if "inv_freq" not in n]
    real_frozen = sum(t.numel() * t.element_size() for t in frozen)
    real_trainable = sum(p.numel() for p in add_lora(model, cfg=lora).values())
    m = estimate_memory(facts, RunShape(seq_len=64, quant=quant, lora=lora, num_gpus=2, expert_parallel=2),
                        load_calibration())
    planned_frozen = sum(c.bytes for c in m.components if c.kind == "weights")
    assert m.trainable_params == real_trainable
    assert real_frozen <= planned_frozen <= real_frozen + 512 * len(frozen)

"""moefit's engine against transformers' own Llama 4 on tiny checkpoints written by transformers.

quantization="none": logits and LoRA gradients equal transformers run with the same effective weights
(W + scale * B A), fp32, relative error < 1e-4. NF4: logits equal transformers run on the dequantized weights.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from transformers import Llama4ForCausalLM, Llama4TextConfig

import moefit
from moefit.lora import add_lora, lora_parameters
from moefit.models.hf_state import iter_hf_tensors
from moefit.models.layers import MoefitLinear
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


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def reference_params(moe_model, merge: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """HF parameter dict with moefit's dequantized frozen weights, plus optional deltas added by name."""
    params = dict(iter_hf_tensors(moe_model, dtype=torch.float32))
    for name, delta in (merge or {}).items():
        params[name] = params[name] + delta
    return params


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_unquantized(tmp_path, name):
    cfg = tiny_config(**CONFIGS[name])
    ref = write_checkpoint(tmp_path, cfg)
    model = moefit.load_model(str(tmp_path), quantization="none", dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids).logits
    assert rel(got, expected) < 1e-4
    out = model(ids, labels=ids)
    assert abs(out.loss.item() - ref(ids, labels=ids).loss.item()) < 1e-4


def _randomize_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _lora_deltas(model) -> dict[str, torch.Tensor]:
    """HF-named weight deltas as differentiable functions of moefit's LoRA parameters."""
    deltas = {}
    for name, m in model.hf.named_modules():
        if isinstance(m, MoefitLinear) and m.lora_A is not None:
            deltas[f"{name}.weight"] = (m.lora_B @ m.lora_A) * m.lora_scale
        elif isinstance(m, MoefitExperts) and m.gate_lora_A is not None:
            s = m.lora_scale
            gate = torch.bmm(m.gate_lora_A, m.gate_lora_B) * s  # [E, H, I] = delta of W^T
            up = torch.bmm(m.up_lora_A, m.up_lora_B) * s
            deltas[f"{name}.gate_up_proj"] = torch.cat([gate, up], dim=2)
            deltas[f"{name}.down_proj"] = torch.bmm(m.down_lora_A, m.down_lora_B) * s
    return deltas


@pytest.mark.parametrize("name", ["top1-4e-norope", "top2-8e-norope"])
def test_lora_logits_and_gradients_match_transformers(tmp_path, name):
    cfg = tiny_config(**CONFIGS[name])
    ref = write_checkpoint(tmp_path, cfg)
    model = moefit.load_model(str(tmp_path), quantization="none", dtype=torch.float32, attn_implementation="eager")
    params = add_lora(model, r=4, alpha=8, dropout=0.0, expert_r=2)
    _randomize_lora(model)
    model.train()
    ids = torch.randint(3, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    out = model(ids, labels=ids, return_logits=True)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None

    ref_params = reference_params(model, {k: v.detach() * 0 for k, v in _lora_deltas(model).items()})
    merged = {k: (ref_params[k] + v) if k in ref_params else v for k, v in _lora_deltas(model).items()}
    ref.train()
    ref_out = functional_call(ref, {**ref_params, **merged}, args=(ids,), kwargs={"labels": ids})
    assert rel(out.logits.detach(), ref_out.logits.detach()) < 1e-4
    ref_out.loss.backward()
    assert len(ours) == len(params) and len(ours) > 0
    for n, p in params.items():
        assert p.grad is not None, n
        assert rel(ours[n], p.grad) < 1e-4, n


@pytest.mark.parametrize("name", ["top1-4e-norope", "top2-8e-norope"])
def test_nf4_logits_match_transformers_on_dequantized_weights(tmp_path, name):
    cfg = tiny_config(**CONFIGS[name])
    ref = write_checkpoint(tmp_path, cfg)
    model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32, attn_implementation="eager")
    ids = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model(ids).logits
        expected = functional_call(ref, reference_params(model), args=(ids,)).logits
        original = ref(ids).logits
    assert rel(got, expected) < 1e-4
    assert rel(got, original) > 1e-3  # the NF4 path really quantized


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

"""Activation checkpointing with moefit's recomputation shortcut (moe.recompute): the LoRA gradients equal
those of a run without checkpointing, and the recomputation really skips the MoE layers' frozen down
projections."""

from __future__ import annotations

import pytest
import torch

import moefit
from moefit.lora import add_lora
from moefit.moe.experts import MoefitExperts
from tests.families import randomize_lora
from tests.test_engine_parity import CONFIGS, tiny_config, write_checkpoint


def _count_dequantize(store, calls: dict[str, int], key: str) -> None:
    """Count calls of `store.dequantize` (a frozen NF4 bank) in `calls[key]`."""
    original = store.dequantize

    def dequantize(*args, **kwargs):
        calls[key] += 1
        return original(*args, **kwargs)
    store.dequantize = dequantize


def _grads(model, batches: list[torch.Tensor], checkpointing: bool, seed: int = 0, keep: bool = False
           ) -> dict[str, torch.Tensor]:
    """LoRA gradients of the summed losses of `batches` (one forward each, then one backward); `keep`: the
    checkpointed recomputation reuses the routed gate/up outputs."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    if checkpointing:
        model.enable_gradient_checkpointing(keep_routed_gate_up=keep)
    else:
        getattr(model.hf, "activation_checkpointing_disable", model.hf.gradient_checkpointing_disable)()
    model.train()
    torch.manual_seed(seed)  # same dropout masks in both runs
    sum(model(ids, labels=ids).loss for ids in batches).backward()
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("name,dropout,routed", [("top1-4e-norope", 0.0, True), ("top2-8e-norope", 0.1, True),
                                                  ("top1-4e-norope", 0.1, False), ("top2-8e-norope", 0.0, False)])
def test_checkpointed_gradients_equal_plain_and_down_projections_run_twice_not_three_times(tmp_path, name, dropout,
                                                                                          routed):
    cfg = tiny_config(**CONFIGS[name])
    write_checkpoint(tmp_path, cfg)
    model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32)
    add_lora(model, r=4, alpha=8, dropout=dropout, targets=["q", "k", "v", "o", "gate", "up", "down"],
             routed_experts=routed)  # without routed-expert LoRA the routed output requires grad only through x
    randomize_lora(model)
    ids = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))

    calls = {"routed_down": 0, "shared_down": 0}
    for module in model.modules():
        if isinstance(module, MoefitExperts):
            _count_dequantize(module.down, calls, "routed_down")
    for layer in model.hf.model.layers:
        shared = getattr(layer.feed_forward, "shared_expert", None)
        if shared is not None:
            _count_dequantize(shared.down_proj.qweight, calls, "shared_down")

    plain = _grads(model, [ids], checkpointing=False)
    plain_calls = dict(calls)
    calls.update(routed_down=0, shared_down=0)
    ckpt = _grads(model, [ids], checkpointing=True)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-7), n
    # Forward + backward in both runs: the recomputation added no down-projection work.
    assert plain_calls["shared_down"] > 0 and plain_calls["routed_down"] > 0
    assert calls == plain_calls


def test_kept_gate_up_outputs_give_the_same_gradients_with_two_forwards_before_backward(tmp_path):
    """keep_routed_gate_up: the recomputation reuses the routed gate/up outputs of the first pass (each
    bank decoded twice per micro-step, not three times), also when two forwards share one backward."""
    cfg = tiny_config(**CONFIGS["top2-8e-norope"])
    write_checkpoint(tmp_path, cfg)
    model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32)
    add_lora(model, r=4, alpha=8, dropout=0.1, targets=["q", "k", "v", "o", "gate", "up", "down"])
    randomize_lora(model)
    gen = torch.Generator().manual_seed(2)
    ids_a = torch.randint(3, cfg.vocab_size, (2, 24), generator=gen)
    ids_b = torch.randint(3, cfg.vocab_size, (1, 17), generator=gen)
    calls = {"gate": 0, "up": 0}
    for module in model.modules():
        if isinstance(module, MoefitExperts):
            for proj in calls:
                _count_dequantize(getattr(module, proj), calls, proj)

    plain = _grads(model, [ids_a, ids_b], checkpointing=False)
    plain_calls = dict(calls)
    calls.update(gate=0, up=0)
    kept = _grads(model, [ids_a, ids_b], checkpointing=True, keep=True)
    assert calls == plain_calls and plain_calls["gate"] > 0  # forward + backward only
    for n in plain:
        assert torch.allclose(plain[n], kept[n], rtol=1e-5, atol=1e-7), n
    calls.update(gate=0, up=0)
    recomputed = _grads(model, [ids_a, ids_b], checkpointing=True)
    assert calls["gate"] > plain_calls["gate"]  # without keeping, the recomputation decodes the banks again
    for n in plain:
        assert torch.allclose(plain[n], recomputed[n], rtol=1e-5, atol=1e-7), n


def test_enabling_checkpointing_twice_adds_nothing_and_disable_then_enable_checkpoints_again(tmp_path):
    """moefit bench and the planner's set enable checkpointing once per measured configuration on one model:
    transformers added its input-requires-grad hook on the embedding at each call (4 hooks after 4)."""
    cfg = tiny_config(**CONFIGS["top1-4e-norope"])
    write_checkpoint(tmp_path, cfg)
    model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32)
    add_lora(model, r=4, alpha=8, targets=["q", "v"])
    embed = model.hf.get_input_embeddings()
    model.enable_gradient_checkpointing()
    hooks = len(embed._forward_hooks)
    model.enable_gradient_checkpointing(keep_routed_gate_up=True)
    assert len(embed._forward_hooks) == hooks
    assert all(m.keep_gate_up for m in model.modules() if isinstance(m, MoefitExperts))
    getattr(model.hf, "activation_checkpointing_disable", model.hf.gradient_checkpointing_disable)()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.hf.modules())
    model.enable_gradient_checkpointing()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.hf.modules())

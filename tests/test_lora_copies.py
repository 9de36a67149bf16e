"""engine.lora_cast_cache: the bf16 copies of LoRA weights made once per optimizer step, never stale."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moefit import engine_switches
from moefit.lora_copies import compute_copy


@pytest.fixture
def cache_on(monkeypatch):
    monkeypatch.setattr(engine_switches, "_current",
                        dataclasses.replace(engine_switches.current(), lora_cast_cache=True))


def test_off_casts_every_time_on_keeps_one_copy(monkeypatch, cache_on):
    w = torch.nn.Parameter(torch.randn(8, 64))
    a, b = compute_copy(w, torch.bfloat16), compute_copy(w, torch.bfloat16)
    assert a is b and torch.equal(a, w.detach().to(torch.bfloat16))
    scaled = compute_copy(w, torch.bfloat16, 2.0)
    assert scaled is not a and torch.equal(scaled, (w.detach() * 2.0).to(torch.bfloat16))
    assert compute_copy(w, torch.float32) is w  # no cast, nothing kept
    monkeypatch.setattr(engine_switches, "_current",
                        dataclasses.replace(engine_switches.current(), lora_cast_cache=False))
    assert compute_copy(w, torch.bfloat16) is not compute_copy(w, torch.bfloat16)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "sgd"])
def test_a_copy_is_made_again_after_any_change_of_its_weight(cache_on, optimizer):
    """An optimizer step (bitsandbytes' 8-bit AdamW writes without moving the version counter), an in-place
    torch op, a replaced storage: each gives a fresh copy with the new values."""
    import bitsandbytes as bnb

    w = torch.nn.Parameter(torch.randn(4096 * 2))
    before = compute_copy(w, torch.bfloat16)
    opt = bnb.optim.AdamW8bit([w], lr=0.1) if optimizer == "adamw_8bit" else torch.optim.SGD([w], lr=0.1)
    w.grad = torch.randn_like(w)
    version = w._version
    opt.step()
    after = compute_copy(w, torch.bfloat16)
    assert not torch.equal(after, before) and torch.equal(after, w.detach().to(torch.bfloat16))
    if optimizer == "adamw_8bit":
        assert w._version == version  # why the optimizer's step has to count as a change
    with torch.no_grad():
        w.mul_(0.5)
    assert torch.equal(compute_copy(w, torch.bfloat16), w.detach().to(torch.bfloat16))
    w.data = torch.randn(4096 * 2)
    assert torch.equal(compute_copy(w, torch.bfloat16), w.detach().to(torch.bfloat16))


def test_training_with_the_cache_is_bit_identical(tmp_path):
    """`moefit train` in bf16 with 8-bit AdamW, two micro-steps per step, LoRA dropout: the same losses and the same
    adapter with the copies kept as with them cast in every pass."""
    from safetensors.torch import load_file

    from moefit.assets import tiny_model_dir
    from moefit.train import train
    from tests.test_train import small

    runs = {}
    for on in (False, True):
        settings = small(tiny_model_dir(), **{"train.max_steps": 3, "train.precision": "bf16",
                                              "train.eval_every": 100, "engine.lora_cast_cache": on})
        result = train(output_dir=tmp_path / str(on), echo=False, **settings)
        runs[on] = (result.train_losses, load_file(tmp_path / str(on) / "adapter_model.safetensors"))
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys()
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[False][1])


def _planned_components(cache: bool, **lora) -> dict[str, int]:
    """Scout at seq 2048 planned for an H200: bytes per memory component, with these LoRA settings."""
    from moefit.config import RunConfig
    from moefit.plan import plan

    cfg = RunConfig(model="llama4-scout")
    cfg.train.max_length = 2048
    for key, value in lora.items():
        setattr(cfg.lora, key, value)
    cfg.engine.lora_cast_cache = cache
    return {c.key: c.bytes for c in plan(cfg, gpus=["h200"], search=False).memory.components}


def test_the_plan_counts_the_copies():
    off, on = _planned_components(False), _planned_components(True)
    assert "lora_copies" not in off
    # Scout r=32 on q,k,v,o and the shared expert's gate/up/down: 2.33 M LoRA weights per layer, 48 layers, bf16
    assert 0.20e9 < on["lora_copies"] < 0.25e9
    assert sum(on.values()) - sum(off.values()) >= on["lora_copies"] * 0.99


def test_invalidate_makes_every_copy_again(cache_on):
    """Writes that move no version counter and are no optimizer step (a collective's broadcast): invalidate()."""
    from moefit.lora_copies import invalidate

    w = torch.nn.Parameter(torch.randn(8, 64))
    first = compute_copy(w, torch.bfloat16)
    invalidate()
    again = compute_copy(w, torch.bfloat16)
    assert again is not first and torch.equal(again, first)


def test_the_plan_counts_only_the_copies_that_are_made():
    """bf16 LoRA weights need no cast: only B's copy is held, where the scale (alpha / r a power of two) is folded
    into it; with another scale, nothing."""

    def held(alpha: float) -> int:
        return _planned_components(True, dtype="bfloat16", alpha=alpha).get("lora_copies", 0)

    assert 0.09e9 < held(64.0) < 0.13e9  # r=32, scale 2: B only, about half of the fp32 case's A + B
    assert held(48.0) == 0  # scale 1.5: B is not copied either

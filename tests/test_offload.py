"""train.offload_checkpoints: each checkpointed layer's saved input held in host memory, its recomputation
backpropagated in the backward (models/offload.py).

On CPU the "host copy" is a copy in the same memory, so what runs is the GPU's bookkeeping (the saved inputs in
the order of the first passes, loaded in reverse with the next one fetched ahead, random-number states, kept
tensors, the recomputation's backward): it must give torch's checkpoint's losses and gradients bit for bit. The
device memory saved and the copies' streams are checked on the GPU (tests/test_gpu.py)."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from moefit import engine_switches
from moefit.bench import build_synthetic_model
from moefit.config import LoraConfig
from moefit.models import offload
from tests.families import CASES
from tests.test_layer_graphs import train_three_steps


def _model(folder, case: str, keep: bool, offloaded: bool):
    CASES[case].config().save_pretrained(folder)
    model = build_synthetic_model(str(folder), device="cpu", dtype=torch.float32,
                                  lora=LoraConfig(r=4, alpha=8, dropout=0.1), seed=3)
    model.enable_gradient_checkpointing(keep_routed_gate_up=keep, offload_checkpoints=offloaded)
    model.train()
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _batches():
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 256, (2, 24), generator=gen) for _ in range(3)]
    packed = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # two samples per row
    return [(ids[0], None), (ids[1], packed), (ids[2], None)]


@pytest.mark.parametrize("case,keep,skip", [("llama4-top1-4e-norope", False, True),
                                            ("llama4-top2-8e-norope", True, True),
                                            ("llama4-top1-4e-norope", False, False), ("qwen3_moe", False, True),
                                            ("gpt_oss", True, True)])
def test_offloaded_checkpoints_give_torch_checkpoints_gradients(tmp_path, monkeypatch, case, keep, skip):
    """Three micro-steps accumulated (one with packed rows), LoRA dropout on: the same losses and accumulated LoRA
    gradients, bit for bit, as torch's checkpoint; every saved input loaded once, none left behind."""
    monkeypatch.setattr(engine_switches, "_current",
                        dataclasses.replace(engine_switches.current(), recompute_skip=skip))
    results = {}
    for offloaded in (False, True):
        model = _model(tmp_path / str(offloaded), case, keep, offloaded)
        assert (model.host_checkpoints is not None) == offloaded
        losses = []
        for i, (ids, positions) in enumerate(_batches()):
            torch.manual_seed(100 + i)
            out = model(ids, labels=ids, position_ids=positions)
            if offloaded:
                layers = model.config.num_hidden_layers
                assert len(model.host_checkpoints.pending()) == layers  # one saved input per layer, until backward
            out.loss.backward()
            losses.append(out.loss.detach())
            if offloaded:
                assert model.host_checkpoints.pending() == []
        results[offloaded] = (losses, _grads(model))
    (plain_losses, plain), (losses, grads) = results[False], results[True]
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, losses, strict=True))
    assert grads.keys() == plain.keys() and len(grads) > 10
    assert all(grads[k].abs().sum() > 0 for k in grads if k.endswith("lora_B"))  # (a test of zeros proves nothing)
    assert all(torch.equal(grads[k], plain[k]) for k in grads), \
        [k for k in grads if not torch.equal(grads[k], plain[k])]


def test_offloaded_training_steps_match_and_evaluation_saves_nothing(tmp_path):
    """Three AdamW steps of two micro-steps: the trained LoRA weights equal torch's checkpoint's bit for bit (each
    step's recomputation reads the updated weights); a forward without grad (evaluation) saves nothing; a forward
    whose backward never runs leaves nothing held once its graph is gone."""
    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, 256, (2, 24), generator=gen) for _ in range(6)]
    trained = {}
    for offloaded in (False, True):
        model = _model(tmp_path / str(offloaded), "llama4-top1-4e-norope", False, offloaded)
        trained[offloaded] = train_three_steps(model, ids)
    assert all(torch.equal(trained[False][k], trained[True][k]) for k in trained[False])
    store = model.host_checkpoints
    with torch.no_grad():
        model(ids[0], labels=ids[0])
    assert store.pending() == []
    out = model(ids[1], labels=ids[1])
    assert len(store.pending()) == model.config.num_hidden_layers and store.peak_saved_bytes > 0
    del out
    gc.collect()
    assert store.pending() == []


def test_offloading_replaces_the_layer_graphs_and_back(tmp_path, monkeypatch):
    """Offloading turns the layer graphs off (they hold every layer's output on the GPU); enabling checkpointing
    again without it gives the layers torch's checkpoint (or the graphs) back."""
    from moefit.models.layer_graphs import LayerGraphs

    model = _model(tmp_path, "llama4-top1-4e-norope", False, False)
    model.use_layer_graphs(LayerGraphs(stand_in=True))
    model.enable_gradient_checkpointing(offload_checkpoints=True)
    funcs = [m._gradient_checkpointing_func for m in model.hf.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert model.layer_graphs is None and funcs and all(isinstance(f, offload.OffloadedCheckpoint) for f in funcs)
    monkeypatch.setattr(engine_switches, "_current",
                        dataclasses.replace(engine_switches.current(), layer_graphs=False))
    model.enable_gradient_checkpointing()
    funcs = [m._gradient_checkpointing_func for m in model.hf.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert model.host_checkpoints is None and not any(isinstance(f, offload.OffloadedCheckpoint) for f in funcs)


def test_the_host_memory_counted_is_what_the_pinned_allocator_holds(tmp_path):
    """torch's pinned-memory allocator rounds each block up to a power of two: the trainer's check and the plan count
    the saved inputs so (Scout at 8 x 2048: 48 inputs of 160 MiB in 256 MiB blocks, 12 GiB), and refuse, naming the
    setting, when the host has not got it."""
    from moefit.errors import MoefitError
    from moefit.plan.memory import RunShape, offloaded_host_bytes
    from moefit.plan.model_facts import load_model_facts

    assert offload.pinned_block_bytes(160 * 2**20) == 256 * 2**20 and offload.pinned_block_bytes(2**20) == 2**20
    scout = load_model_facts("llama4-scout")
    assert offloaded_host_bytes(scout, RunShape(seq_len=2048, batch=8, offload_checkpoints=True)) == 12 * 2**30
    model = _model(tmp_path, "llama4-top1-4e-norope", False, True)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert offload.saved_input_bytes(model.hf, 3, 100) == layers * offload.pinned_block_bytes(3 * 100 * hidden * 4)
    assert "pinned host memory" in offload.check_host_memory(model.hf, 3, 100)
    with pytest.raises(MoefitError, match="train.offload_checkpoints"):
        offload.check_host_memory(model.hf, 2**16, 2**16)

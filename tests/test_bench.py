"""Synthetic-weight models (what `moefit bench` measures on the GPU) on CPU: same modules, real NF4, trains."""

from __future__ import annotations

import pytest
import torch

from moefit.bench import active_params_per_token, build_synthetic_model, load_config_json, measure_training
from moefit.cli import main
from moefit.config import LoraConfig
from moefit.moe.experts import MoefitExperts
from tests.test_engine_parity import tiny_config


def test_synthetic_model_is_nf4_with_lora_and_trains(tmp_path):
    tiny_config(num_local_experts=4, num_experts_per_tok=1).save_pretrained(tmp_path)
    model = build_synthetic_model(str(tmp_path), device="cpu", dtype=torch.float32,
                                  lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    experts = [m for m in model.modules() if isinstance(m, MoefitExperts)]
    assert experts and all(m.gate.packed.dtype == torch.uint8 and m.gate.packed.any() for m in experts)
    assert all(m.gate_lora_A is not None for m in experts)
    r = measure_training(model, seq_len=32, batch=2, steps=1, warmup=0, optimizer="adamw", grad_accum=2,
                         keep_routed_gate_up=True)
    assert r["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss_first"])) and r["grad_accum"] == 2
    assert all(m.keep_gate_up for m in experts)
    assert "gpu_busy_fraction" not in r  # measured on CUDA only (tests/test_gpu.py)
    assert 1e-8 < r["host_op_s"] < 1e-3  # the host's speed at issuing ops, recorded with every measurement


def test_scout_preset_active_parameters():
    # 16.14 B active per token incl. lm_head (DESIGN's figure), from the shipped config.json
    assert active_params_per_token(load_config_json("llama4-scout")) == pytest.approx(16.13e9, rel=2e-3)


def test_bench_and_plan_count_the_same_active_parameters_for_every_preset():
    """One source for active parameters per token: bench's count (from the transformers config it builds) is
    the planner's ModelFacts count (from config.json) for every shipped preset."""
    from moefit.plan.model_facts import PRESETS, load_model_facts

    for name in PRESETS:
        assert active_params_per_token(load_config_json(name)) == load_model_facts(name).active_params_per_token(), \
            name


def test_bench_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--model", "llama4-scout"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--grad-accum", "0"), ("--batch", "0"), ("--seq-len", "1")])
def test_bench_refuses_impossible_sizes_before_building(capsys, flag, value):
    assert main(["bench", "--model", "llama4-scout", "--device", "cpu", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "at least" in err and "Traceback" not in err


def test_bench_passes_accumulation_and_kept_outputs_through(tmp_path):
    """`moefit bench --grad-accum 2 --keep-routed-gate-up` on CPU: two micro-batches per step, the routed experts
    keep their gate/up outputs, and the planned peak is the plan of that same setting."""
    from moefit.bench import bench

    tiny_config(num_local_experts=4, num_experts_per_tok=1).save_pretrained(tmp_path)
    res = bench(model=str(tmp_path), seq_lens=[16], batch=1, rank=4, steps=1, warmup=0, device="cpu",
                optimizer="adamw", grad_accum=2, keep_routed_gate_up=True)
    run = res["runs"][0]
    assert res["keep_routed_gate_up"] is True and run["grad_accum"] == 2 and run["tokens_per_s"] > 0
    from moefit.config import RunConfig, TrainConfig
    from moefit.plan import plan

    lora = LoraConfig(**res["lora"])
    planned = plan(RunConfig(model=str(tmp_path), lora=lora, train=TrainConfig(
        max_length=16, batch_size=1, grad_accum=2, optimizer="adamw", keep_routed_gate_up=True)), gpus=["h200"],
        search=False).memory.peak_allocated
    assert run["planned_peak_bytes"] == planned


def test_cuda_index_of_a_device_name():
    from moefit.devices import cuda_index

    assert cuda_index("cuda:1") == 1
    if torch.cuda.is_available():
        assert cuda_index("cuda") == torch.cuda.current_device()

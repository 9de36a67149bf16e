"""Synthetic-weight models (what `moefit bench` measures on the GPU) on CPU: same modules, real NF4, trains."""

from __future__ import annotations

import pytest
import torch

from moefit.bench import active_params_per_token, build_synthetic_model, load_config_json, measure_training
from moefit.cli import main
from moefit.config import LoraConfig
from moefit.models.layers import MoefitExperts
from tests.test_engine_parity import tiny_config


def test_synthetic_model_is_nf4_with_lora_and_trains(tmp_path):
    tiny_config(num_local_experts=4, num_experts_per_tok=1).save_pretrained(tmp_path)
    model = build_synthetic_model(str(tmp_path), device="cpu", dtype=torch.float32,
                                  lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    experts = [m for m in model.modules() if isinstance(m, MoefitExperts)]
    assert experts and all(m.gate.packed.dtype == torch.uint8 and m.gate.packed.any() for m in experts)
    assert all(m.gate_lora_A is not None for m in experts)
    r = measure_training(model, seq_len=32, batch=2, steps=1, warmup=0, optimizer="adamw")
    assert r["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(r["loss_first"]))
    assert "gpu_busy_fraction" not in r  # measured on CUDA only (tests/test_gpu.py)


def test_scout_preset_active_parameters():
    # 16.14 B active per token incl. lm_head (DESIGN's figure), from the shipped config.json
    assert active_params_per_token(load_config_json("llama4-scout")) == pytest.approx(16.13e9, rel=2e-3)


def test_bench_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--model", "llama4-scout"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err

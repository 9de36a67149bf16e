"""Pieces of the training loop that need no model: schedule, optimizer groups, checkpoints, RNG, smoke verdict."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from moefit.config import TrainConfig
from moefit.errors import MoefitError
from moefit.train import checkpoint as ckpt
from moefit.train.metrics import MetricsLog
from moefit.train.optim import build_optimizer, build_scheduler, lr_factor, total_optimizer_steps
from moefit.train.smoke import judge_smoke


def test_warmup_then_cosine_to_min_ratio():
    f = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[2] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 7)))


def test_linear_and_constant_schedules():
    lin = [lr_factor(s, 5, 0, "linear", 0.0) for s in range(5)]
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert [lr_factor(s, 5, 1, "constant", 0.0) for s in range(5)] == [1.0] * 5


def test_scheduler_drives_the_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, scheduler="linear", optimizer="adamw")
    opt = build_optimizer({"a": p}, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([5e-3, 1e-2, 1e-2, 0.0])


def test_total_steps_from_epochs_or_max_steps():
    assert total_optimizer_steps(TrainConfig(batch_size=2, grad_accum=4, epochs=1.5), 100) == math.ceil(1.5 * 13)
    assert total_optimizer_steps(TrainConfig(max_steps=7), 100) == 7


def test_weight_decay_only_on_lora_matrices_and_8bit_optimizer():
    mat, vec = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    opt = build_optimizer({"m": mat, "v": vec}, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    import bitsandbytes as bnb

    assert isinstance(opt, bnb.optim.AdamW8bit)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {id(mat): 0.1, id(vec): 0.0}


def test_paged_optimizer_falls_back_on_cpu_with_a_note():
    notes = []
    opt = build_optimizer({"m": torch.nn.Parameter(torch.randn(4, 4))}, TrainConfig(optimizer="paged_adamw_8bit"),
                          torch.device("cpu"), note=notes.append)
    import bitsandbytes as bnb

    assert type(opt) is bnb.optim.AdamW8bit and "paged_adamw_8bit" in notes[0]


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def _fake_checkpoint(root, step, complete=True):
    d = root / f"step-{step}"
    d.mkdir(parents=True)
    if complete:
        (d / ckpt.COMPLETE).write_text("x")
    return d


def test_latest_complete_checkpoint_ignores_partial_ones(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 10)
    _fake_checkpoint(root, 12, complete=False)  # killed while writing
    (root / ".tmp-step-14").mkdir()
    assert ckpt.latest_checkpoint(root) == root / "step-10"
    assert ckpt.resolve_resume(True, tmp_path) == root / "step-10"
    assert ckpt.resolve_resume(tmp_path, None) == root / "step-10"
    assert ckpt.resolve_resume(root / "step-2", None) == root / "step-2"
    with pytest.raises(MoefitError, match="incomplete"):
        ckpt.resolve_resume(root / "step-12", None)
    removed = ckpt.prune_checkpoints(root, keep=1)
    assert sorted(p.name for p in removed) == [".tmp-step-14", "step-2"]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [10]


def test_resume_without_any_checkpoint_says_so(tmp_path):
    with pytest.raises(MoefitError, match="no complete checkpoint"):
        ckpt.resolve_resume(tmp_path, None)
    with pytest.raises(MoefitError, match="does not exist"):
        ckpt.resolve_resume(tmp_path / "nope", None)
    with pytest.raises(MoefitError, match="--output-dir"):
        ckpt.resolve_resume(True, None)


def test_metrics_log_drops_records_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for s in range(1, 6):
        log.write({"kind": "train", "step": s, "loss": 1.0 / s})
    log.write({"kind": "eval", "step": 5, "eval_loss": 0.3})
    resumed = MetricsLog(path, resume_step=3)
    assert [r["step"] for r in resumed.records] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    MetricsLog(path)  # a fresh run starts a fresh file
    assert not path.exists()


def test_smoke_verdicts():
    ok = judge_smoke([3.0, 2.9, 2.5, 2.4, 2.0, 1.9, 1.8, 1.7], peak_bytes=2**30, max_bytes=2 * 2**30, min_loss_drop=0.1)
    assert ok.passed and all(line.startswith("PASS") for line in ok.lines())
    flat = judge_smoke([2.0] * 8, peak_bytes=2**30, max_bytes=None, min_loss_drop=0.0)
    assert not flat.passed and "loss falls" in flat.failure_message()
    small = judge_smoke([3.0, 2.0, 2.0, 2.9], 0, None, min_loss_drop=0.05)  # 3.0 -> 2.9 is 3.3 %
    assert not small.passed
    nan = judge_smoke([2.0, float("nan")], 0, None, 0.0)
    assert not nan.passed and "NaN" in nan.failure_message()
    mem = judge_smoke([3.0, 1.0], peak_bytes=3 * 2**30, max_bytes=2 * 2**30, min_loss_drop=0.0)
    assert not mem.passed and "peak memory" in mem.failure_message()


def test_fit_check_refuses_a_run_that_does_not_fit_with_numbers_and_a_suggestion():
    from moefit.config import load_config
    from moefit.train.loop import fit_check

    cfg = load_config("recipes/llama4-scout-qlora.yaml")
    plan, msg = fit_check(cfg, "RTX 4090", 24 * 2**30)
    assert not plan.fits and msg is not None
    assert "does not fit on this RTX 4090" in msg and "GiB" in msg and "--force" in msg
    assert plan.suggestion and plan.suggestion in msg
    plan, msg = fit_check(cfg, "H200", 141 * 10**9)
    assert plan.fits and msg is None


def test_fit_check_on_a_device_name_plans_the_time_and_the_faster_layout():
    """What the trainer passes is torch's device name: it must find the GPU's speed in the catalogue, or
    train.layout: auto never has a faster layout to apply."""
    from moefit.config import load_config
    from moefit.train.loop import fit_check

    cfg = load_config("recipes/llama4-scout-qlora.yaml")
    plan, msg = fit_check(cfg, "NVIDIA H200", int(74.5 * 2**30))
    assert msg is None and plan.gpus[0].step is not None
    assert plan.faster and plan.faster_settings.get("train.batch_size", 1) > 1


def test_bench_layout_auto_takes_the_trainers_choice():
    from moefit.bench.run import choose_layout
    from moefit.config import LoraConfig, QuantConfig, TrainConfig

    chosen = choose_layout("llama4-scout", LoraConfig(r=32, alpha=64), QuantConfig(),
                           TrainConfig(max_length=2048, batch_size=1, grad_accum=8), "cpu", int(74.5 * 2**30))
    settings = chosen["settings"]
    assert settings["train.batch_size"] * settings["train.grad_accum"] == 8 and settings["train.batch_size"] > 1
    assert chosen["as_written"]["batch"] == 1 and "faster" in chosen["why"]


def test_bench_layout_auto_of_a_cut_model_keeps_the_layout_when_the_whole_model_does_not_fit():
    """The plan describes the whole model: with 40 GiB the whole Scout does not fit, so the bench of a model cut
    to 1 layer (which fits) keeps the layout as written and says why; uncut, the same settings are refused."""
    from moefit.bench.run import choose_layout
    from moefit.config import LoraConfig, QuantConfig, TrainConfig

    args = ("llama4-scout", LoraConfig(r=8, alpha=16), QuantConfig(),
            TrainConfig(max_length=256, batch_size=1, grad_accum=2), "cpu", 40 * 2**30)
    chosen = choose_layout(*args, layers=1)
    assert chosen["settings"] == {} and "cut to 1 layers" in chosen["why"] and "does not fit" in chosen["why"]
    with pytest.raises(MoefitError, match="does not fit"):
        choose_layout(*args)

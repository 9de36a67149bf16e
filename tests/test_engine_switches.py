"""Engine switches are run-config fields (`engine:`), applied by load_model and recorded by the run; the retired
environment variables are refused by name instead of read or ignored."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moefit import engine_switches
from moefit.config import EngineConfig, load_config
from moefit.errors import ConfigError
from moefit.kernels import nf4_grouped_mm, triton_nf4
from moefit.models import load_model
from moefit.moe import recompute


@pytest.fixture(autouse=True)
def _restore_engine(monkeypatch):
    monkeypatch.setattr(engine_switches, "_current", engine_switches.current())


def test_engine_section_is_validated_like_the_rest(tmp_path):
    assert load_config().engine == EngineConfig()
    cfg = load_config(None, {"engine.expert_matmul": "fused", "engine.nf4_gemm_variant": "shfl-join"})
    assert cfg.engine.expert_matmul == "fused" and cfg.engine.nf4_gemm_variant == "shfl-join"
    with pytest.raises(ConfigError, match=r"engine\.nf4_decoder=fast: expected one of 'bnb', 'triton', 'triton-load', 'triton-gather', got 'fast'"):
        load_config(None, {"engine.nf4_decoder": "fast"})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"engine": {"recompute_skp": False}}))
    with pytest.raises(ConfigError, match="Did you mean 'engine.recompute_skip'"):
        load_config(path)
    assert nf4_grouped_mm.VARIANTS[0] == nf4_grouped_mm.DEFAULT_VARIANT == "select-join"


def test_load_model_applies_the_engine_settings():
    load_model("tiny", engine=EngineConfig(expert_matmul="fused", recompute_skip=False))
    assert engine_switches.current().expert_matmul == "fused"
    assert all(isinstance(c, contextlib.nullcontext) for c in recompute.context_fn())
    load_model("tiny")  # None keeps the current settings
    assert not engine_switches.current().recompute_skip
    load_model("tiny", engine=EngineConfig())
    assert not any(isinstance(c, contextlib.nullcontext) for c in recompute.context_fn())
    assert not nf4_grouped_mm.enabled() and not triton_nf4.available()


def test_retired_environment_variables_are_refused_by_name(monkeypatch):
    monkeypatch.setenv("MOEFIT_NF4_DECODER", "triton")
    with pytest.raises(ConfigError, match=r"MOEFIT_NF4_DECODER is no longer read: set engine\.nf4_decoder"):
        load_model("tiny")


def test_bench_engine_option_parses_and_validates():
    assert engine_switches.parse(["expert_matmul=fused", "recompute_skip=false"]) == EngineConfig(
        expert_matmul="fused", recompute_skip=False)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        engine_switches.parse(["fused"])
    with pytest.raises(ConfigError, match="--engine: unknown key 'engine.expert_mm'"):
        engine_switches.parse(["expert_mm=fused"])


def test_core_does_not_import_the_triton_kernels_on_cpu():
    """The Triton kernels (moefit.kernels) run on GPUs only: importing the core and training a step of the tiny
    model on the CPU with the default engine (whose NF4 decoder is Triton's on a GPU) never imports them
    (bitsandbytes may import triton itself; that is not ours)."""
    code = ("import sys, torch, moefit, moefit.train, moefit.models, moefit.moe, moefit.moe.grouped, moefit.quant.nf4, "
            "moefit.lora, moefit.loading, moefit.export, moefit.bench, moefit.cli\n"
            "from moefit.config import LoraConfig\n"
            "from moefit.lora import add_lora\n"
            "m = moefit.models.load_model('tiny')\n"
            "add_lora(m, cfg=LoraConfig(r=4))\n"
            "ids = torch.randint(0, m.config.vocab_size, (1, 16))\n"
            "m(ids, labels=ids).loss.backward()\n"
            "print([n for n in sys.modules if n.startswith('moefit') and ('triton' in n or 'nf4_gemm' in n "
            "or 'nf4_grouped_mm' in n or n.startswith('moefit.kernels'))])\n")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"

"""Engine switches are run-config fields (`engine:`), applied by load_model and recorded by the run; the retired
environment variables are refused by name instead of read or ignored."""

from __future__ import annotations

import contextlib

import pytest
import yaml

from moefit import engine_switches
from moefit.config import EngineConfig, load_config
from moefit.errors import ConfigError
from moefit.models import load_model
from moefit.moe import recompute
from moefit.quant import nf4_grouped_mm, triton_nf4


@pytest.fixture(autouse=True)
def _restore_engine(monkeypatch):
    monkeypatch.setattr(engine_switches, "_current", engine_switches.current())


def test_engine_section_is_validated_like_the_rest(tmp_path):
    assert load_config().engine == EngineConfig()
    cfg = load_config(None, {"engine.expert_matmul": "fused", "engine.nf4_gemm_variant": "shfl-join"})
    assert cfg.engine.expert_matmul == "fused" and cfg.engine.nf4_gemm_variant == "shfl-join"
    with pytest.raises(ConfigError, match=r"engine\.nf4_decoder=fast: expected one of 'bnb', 'triton', got 'fast'"):
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

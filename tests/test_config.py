"""The run config: defaults are the seed's recipe, every kind of mistake names its key, recipes parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from moefit.cli import main
from moefit.config import RunConfig, load_config
from moefit.errors import ConfigError
from moefit.train import default_recipe_path, resolve_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_are_the_seed_recipe():
    c = RunConfig()
    assert (c.quantization.weights, c.quantization.double_quant) == ("nf4", True)
    assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (32, 64.0, 0.05)
    assert c.lora.targets == ["q", "k", "v", "o", "gate", "up", "down"] and c.lora.routed_experts
    t = c.train
    assert t.gradient_checkpointing and t.optimizer == "adamw_8bit" and t.precision == "bf16"
    assert (t.lr, t.scheduler, t.warmup_steps, t.weight_decay) == (2e-5, "cosine", 100, 0.01)
    assert (t.batch_size, t.grad_accum, t.max_length) == (1, 8, 2048)


def test_scout_recipe_is_exactly_the_defaults_plus_model_and_data():
    cfg = load_config(REPO / "recipes" / "llama4-scout-qlora.yaml").to_dict()
    defaults = RunConfig().to_dict()
    diffs = {(s, k) for s, sec in cfg.items() if isinstance(sec, dict) for k in sec if sec[k] != defaults[s][k]}
    diffs |= {(s,) for s, v in cfg.items() if not isinstance(v, dict) and v != defaults[s]}
    assert diffs == {("model",), ("data", "train")}
    assert cfg["model"] == "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    assert cfg["data"]["train"] == "data/train.jsonl"


def test_tiny_recipe_is_the_embedded_default():
    shipped = (REPO / "recipes" / "tiny.yaml").read_text(encoding="utf-8")
    assert shipped == default_recipe_path().read_text(encoding="utf-8")
    cfg = resolve_config(None)
    assert cfg.model == "tiny" and cfg.quantization.weights == "nf4" and cfg.lora.routed_experts
    assert cfg.data.train is None  # the shipped chat data


@pytest.mark.parametrize("text, needles", [
    ("train:\n  warmup_step: 10\n", ["train.warmup_step", "Did you mean 'train.warmup_steps'"]),
    ("lora:\n  rank: 8\n", ["lora.rank"]),
    ("trian:\n  lr: 1e-4\n", ["trian", "Did you mean 'train'"]),
    ("train:\n  lr: fast\n", ["train.lr", "expected a number", "fast"]),
    ("train:\n  grad_accum: 2.5\n", ["train.grad_accum", "integer"]),
    ("train:\n  optimizer: sgd\n", ["train.optimizer", "adamw_8bit"]),
    ("lora:\n  r: 0\n", ["lora.r", "at least 1"]),
    ("lora:\n  dropout: 1.5\n", ["lora.dropout"]),
    ("train:\n  warmup_steps: -3\n", ["train.warmup_steps"]),
    ("lora:\n  targets: [q, qq]\n", ["lora.targets[1]", "qq"]),
    ("train: [1, 2]\n", ["train", "mapping"]),
    ("train:\n  lr: [1\n", ["not valid YAML", "line"]),
])
def test_bad_config_names_the_key(tmp_path, text, needles):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    for needle in needles:
        assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_overrides_apply_and_are_validated():
    cfg = resolve_config(None, {"lr": 1e-3, "lora.r": 4, "train__max_steps": 7})
    assert (cfg.train.lr, cfg.lora.r, cfg.train.max_steps) == (1e-3, 4, 7)
    with pytest.raises(ConfigError, match="train.lr"):
        resolve_config(None, {"train.lr": "x"})
    with pytest.raises(ConfigError, match="unknown setting 'nonsense'"):
        resolve_config(None, {"nonsense": 1})


def test_overrides_on_a_config_object():
    cfg = resolve_config(RunConfig(), {"batch_size": 2})
    assert cfg.train.batch_size == 2
    with pytest.raises(ConfigError, match="train.batch_size"):
        resolve_config(RunConfig(), {"batch_size": 0})


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.lrr=1"], "Did you mean 'train.lr'"),
    (["--set", "train.lr=fast"], "error: --set train.lr=fast: expected a number, got 'fast'."),
    (["--set", "train.max_length=4"], "--set train.max_length=4: must be at least 16"),
    (["--set", "oops"], "expected KEY=VALUE"),
])
def test_cli_config_errors_exit_2_without_traceback(capsys, args, needle):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert "tiny.yaml" not in err  # the override is to blame, not the config it overrides
    assert err.startswith("moefit train: error:")


def test_cli_bad_config_file(tmp_path, capsys):
    path = write(tmp_path, "train:\n  lr_rate: 1e-4\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.lr_rate" in err and str(path) in err and "Traceback" not in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads `2e-5` as a string; in a run config it can only mean the number.
    cfg = load_config(write(tmp_path, "train:\n  lr: 2e-5\nsmoke:\n  max_memory_gib: 1e2\n"))
    assert cfg.train.lr == 2e-5 and cfg.smoke.max_memory_gib == 100.0
    assert resolve_config(None, {"train.lr": "1e-4"}).train.lr == 1e-4


def test_override_errors_blame_the_override_and_file_errors_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  max_steps: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run.yaml: train.max_steps: must be at least 1"):
        load_config(path, {"lora.r": 8})  # the file's own mistake
    assert load_config(path, {"train.max_steps": 5}).train.max_steps == 5  # an override may fix the file
    with pytest.raises(ConfigError, match=r"^--set lora.r=0: must be at least 1, got 0.$"):
        load_config(path, {"train.max_steps": 5, "lora.r": 0})
    with pytest.raises(ConfigError, match=r"^--set train.batch_size=0: must be at least 1"):
        resolve_config(RunConfig(), {"batch_size": 0})
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="run.yaml: cannot read it as a text file"):
        load_config(path)

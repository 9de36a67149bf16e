"""End-to-end training on a tiny Llama 4 MoE written here: NF4 base, LoRA everywhere, exact resume, run dir, smoke,
user errors through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moefit.assets import tiny_model_dir
from moefit.cli import build_parser, main
from moefit.config import load_config
from moefit.train import train

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CONVERSATION = {"messages": [
    {"role": "user", "content": "What time does the shop open on Sundays?"},
    {"role": "assistant", "content": "On Sundays the shop opens at ten and closes at four."},
]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 2-expert Llama 4 text checkpoint with random weights and the shipped tokenizer."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from moefit.data import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama4")
    for name in TOKENIZER_FILES:
        if (tiny_model_dir() / name).is_file():
            shutil.copy(tiny_model_dir() / name, out / name)
    tok = load_tokenizer(out)
    config = Llama4TextConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
        num_experts_per_tok=1, moe_layers=[0, 1], no_rope_layers=[1, 0], use_qk_norm=True,
        attention_chunk_size=128, max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Llama4ForCausalLM(config).save_pretrained(out)
    return out


def small(model_dir: Path, **kw) -> dict:
    """Settings for a run of a few seconds: short sequences, few steps, small evals, LoRA dropout on."""
    base = {"model": str(model_dir), "train.max_length": 128, "train.grad_accum": 2, "train.max_steps": 4,
            "train.eval_every": 2, "train.eval_batches": 2, "train.save_every": 2, "train.keep_checkpoints": 3,
            "train.lr": 5e-3, "train.warmup_steps": 1, "train.precision": "fp32", "train.num_threads": 2,
            "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.1}
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """One uninterrupted run, and one stopped after step 3 (newest checkpoint: step 2) then resumed."""
    root = tmp_path_factory.mktemp("runs")
    full = train(output_dir=root / "full", echo=False, **small(model_dir))
    cut = train(output_dir=root / "cut", stop_after=3, echo=False, **small(model_dir))
    resumed = train(resume=root / "cut", echo=False)
    return full, cut, resumed


def test_resume_ends_with_the_same_adapter(runs):
    full, cut, resumed = runs
    assert full.completed and not cut.completed and cut.step == 3 and resumed.completed
    assert cut.adapter_dir is None
    a = load_file(full.run_dir / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # LoRA B starts at zero: equality is only meaningful because training moved it.
    assert any(k.endswith("lora_B") and a[k].abs().max() > 0 for k in a)
    # The resumed run re-did step 3 from the step-2 checkpoint and logged the same losses as the full run.
    assert resumed.train_losses == full.train_losses[2:]
    logs = [[(r["kind"], r["step"], r.get("loss", r.get("eval_loss")))
             for r in map(json.loads, (run.run_dir / "metrics.jsonl").read_text().splitlines())]
            for run in (full, resumed)]
    assert logs[0] == logs[1]


def test_lora_reaches_routed_experts_and_attention(runs):
    keys = load_file(runs[0].run_dir / "adapter_model.safetensors").keys()
    assert any("experts" in k for k in keys) and any("q_proj" in k for k in keys)


def test_run_directory_holds_everything(runs, model_dir):
    run = runs[0]
    d = run.run_dir
    for name in ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl",
                 "report.json", "loss.png", "train.log"):
        assert (d / name).is_file(), name
    cfg = load_config(d / "config.yaml")
    assert cfg.model == str(model_dir) and cfg.train.max_steps == 4 and cfg.output_dir == str(d)
    assert (d / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
                 "trainer_state.json", "complete"):
        assert (d / "checkpoints" / "step-2" / name).is_file(), name
    state = json.loads((d / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data_index"] + state["data_epoch"] > 0
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    for r in train_recs:
        assert {"loss", "lr", "tokens_per_s", "peak_mem_bytes", "grad_norm", "elapsed_s"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    report = json.loads((d / "report.json").read_text())
    assert report["steps"] == 4 and report["tokens"] > 0 and report["data"]["train"]
    assert report["start_eval_loss"] == run.start_eval_loss and report["end_eval_loss"] == run.end_eval_loss
    assert report["versions"]["torch"] == torch.__version__ and report["device"].startswith("cpu")
    # the engine asks for the Triton decoder; on the CPU bitsandbytes decodes, and the report says so
    assert report["engine"]["nf4_decoder"] == "triton-load" and report["nf4_decoder_used"] == "bnb"
    assert "done: 4 steps" in (d / "train.log").read_text()


def test_existing_run_dir_is_not_overwritten(runs, capsys):
    assert main(["train", "--output-dir", str(runs[0].run_dir), "--set", "train.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--resume" in err and "--overwrite" in err


def _smoke_data(tmp_path: Path) -> Path:
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(CONVERSATION) + "\n" for _ in range(8)), encoding="utf-8")
    return path


def _smoke_args(model_dir: Path, tmp_path: Path, lr: float) -> list[str]:
    sets = {"model": str(model_dir), "data.train": str(_smoke_data(tmp_path)), "data.packing": False,
            "train.max_length": 64, "train.grad_accum": 1, "train.lr": lr, "train.warmup_steps": 0,
            "train.precision": "fp32", "lora.r": 4, "lora.dropout": 0.0, "smoke.min_loss_drop": 0.02,
            "smoke.max_memory_gib": 64}
    args = ["train", "--smoke", "--steps", "6", "--output-dir", str(tmp_path / "run")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def test_smoke_passes_when_the_loss_falls(model_dir, tmp_path, capsys):
    assert main(_smoke_args(model_dir, tmp_path, lr=1e-2)) == 0
    out = capsys.readouterr().out
    assert "PASS  loss falls" in out and "PASS  peak memory" in out and "FAIL" not in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["mode"] == "smoke" and report["smoke"]["passed"] and report["steps"] == 6
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_smoke_fails_when_the_loss_does_not_fall(model_dir, tmp_path, capsys):
    assert main(_smoke_args(model_dir, tmp_path, lr=1e-9)) == 1
    cap = capsys.readouterr()
    assert "FAIL  loss falls" in cap.out
    assert "smoke run failed: loss falls" in cap.err and "Traceback" not in cap.err


def test_smoke_fails_when_memory_exceeds_the_limit(model_dir, tmp_path, capsys):
    args = _smoke_args(model_dir, tmp_path, lr=1e-2) + ["--set", "smoke.max_memory_gib=0.01", "--steps", "2"]
    assert main(args) == 1
    assert "peak memory" in capsys.readouterr().err


def test_missing_data_file(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--set", f"model={model_dir}",
                 "--set", f"data.train={tmp_path / 'nope.jsonl'}"])
    err = capsys.readouterr().err
    assert code == 2 and "nope.jsonl" in err and "not found" in err and "Traceback" not in err
    assert not out.exists()  # a run that could not start leaves nothing behind


def test_broken_json_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CONVERSATION) + "\n" + '{"messages": [oops\n' + json.dumps(CONVERSATION) + "\n")
    code = main(["train", "--set", f"model={model_dir}", "--set", f"data.train={bad}",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl line 2" in err and "invalid JSON" in err and "Traceback" not in err


def test_console_entry_point_prints_no_traceback(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"lr": 1e-4, "gradient_acumulation": 4}}))
    exe = Path(sys.executable).with_name("moefit")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "moefit"]
    proc = subprocess.run([*cmd, "train", str(cfg)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'train.gradient_acumulation'" in proc.stderr and str(cfg) in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_describes_every_option(capsys):
    parser = build_parser()
    train_parser = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices["train"]
    for action in train_parser._actions:
        assert action.help and len(action.help) > 15, action.dest
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in train_parser._actions:
        for opt in action.option_strings:
            assert opt in text
    assert "CONFIG" in text and "exit codes" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out

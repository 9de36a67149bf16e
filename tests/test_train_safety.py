"""Nothing lost, nothing silent (issue 14): a run never destroys an earlier result, stops cleanly on SIGTERM /
SIGINT, NaN and out-of-memory, and resumes only from checkpoints that verify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moefit import engine_switches
from moefit.cli import main
from moefit.config import RunConfig, load_config
from moefit.errors import MoefitError
from moefit.models.causal_lm import MoefitCausalLM
from moefit.train import checkpoint as ckpt
from moefit.train import failures, preempt, train, verify
from moefit.train.metrics import MetricsLog
from tests.test_train import model_dir, small  # noqa: F401  (model_dir is a fixture)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):  # noqa: F811
    """The uninterrupted run every interrupted one must reproduce."""
    return train(output_dir=tmp_path_factory.mktemp("ref") / "run", echo=False, **small(model_dir))


def _same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys() and len(x) > 0
    for k in x:
        assert torch.equal(x[k], y[k]), k


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------- previous results

def test_a_folder_without_checkpoint_is_refused_unless_overwrite(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(engine_switches, "_current", engine_switches.current())  # the run below changes it
    run_dir = tmp_path / "run"
    train(output_dir=run_dir, smoke=True, steps=2, echo=False, **small(model_dir))
    before = _snapshot(run_dir)
    assert "metrics.jsonl" in before and not (run_dir / "checkpoints").exists()
    assert main(["train", "--output-dir", str(run_dir), "--set", f"model={model_dir}"]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(run_dir) == before  # the smoke run's files are untouched
    (run_dir / "notes.txt").write_text("mine")
    result = train(output_dir=run_dir, overwrite=True, echo=False,
                   **small(model_dir, **{"train.max_steps": 2, "engine.recompute_skip": False}))
    assert result.completed and (run_dir / "notes.txt").read_text() == "mine"  # only moefit's files are replaced
    report = json.loads((run_dir / "report.json").read_text())
    assert report["mode"] == "train" and report["engine"]["recompute_skip"] is False  # the run records its engine
    assert set(report["versions"]) >= {"torch", "transformers", "bitsandbytes", "gpu"}
    assert load_config(run_dir / "config.yaml").engine.recompute_skip is False
    with pytest.raises(MoefitError, match="contradict"):
        train(output_dir=run_dir, overwrite=True, resume=True, echo=False)
    with pytest.raises(MoefitError, match="is a file, not a folder"):
        train(output_dir=run_dir / "notes.txt", echo=False, **small(model_dir))


def test_resuming_a_finished_run_changes_nothing(reference, capsys):
    before = _snapshot(reference.run_dir)
    again = train(resume=reference.run_dir)
    assert "already finished (4 of 4 steps)" in capsys.readouterr().out
    assert again.completed and again.step == 4 and again.end_eval_loss == reference.end_eval_loss
    assert _snapshot(reference.run_dir) == before


def test_extending_a_finished_run_keeps_its_adapter(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.run_dir, run_dir)
    longer = train(resume=run_dir, max_steps=6)
    out = capsys.readouterr().out
    kept = run_dir / "final-step-4"
    assert f"final adapter (step 4) is kept in {kept}" in out
    assert longer.completed and longer.step == 6 and "resumed from" in out and "step-4" in out
    _same_adapter(kept, reference.run_dir)
    assert (kept / "adapter_config.json").is_file() and json.loads((kept / "report.json").read_text())["steps"] == 4
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 6
    assert load_file(run_dir / "adapter_model.safetensors").keys() == load_file(kept / "adapter_model.safetensors").keys()


# --------------------------------------------------------------------------------------------- signals

def _signal_at_step(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Send `signum` to this process while the loop logs `step` (inside the step, before its boundary)."""
    write = MetricsLog.write

    def write_then_signal(self, record):
        write(self, record)
        if record.get("kind") == "train" and record["step"] == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)


def test_sigterm_saves_a_checkpoint_and_resume_is_bit_identical(reference, model_dir, tmp_path, monkeypatch):  # noqa: F811
    run_dir = tmp_path / "run"
    _signal_at_step(monkeypatch, 3)
    with pytest.raises(preempt.Preempted) as e:
        train(output_dir=run_dir, echo=False, **small(model_dir))
    monkeypatch.undo()
    assert e.value.exit_code == 143 and f"--resume {run_dir}" in str(e.value) and "step-3" in str(e.value)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [2, 3]  # 2 periodic, 3 on SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are gone after the run
    with pytest.raises(MoefitError, match=r"already holds a run \(newest checkpoint step-3\)\. Continue it with --resume"):
        train(output_dir=run_dir, echo=False, **small(model_dir))
    resumed = train(resume=run_dir, echo=False)
    assert resumed.completed and resumed.train_losses == reference.train_losses[3:]
    _same_adapter(run_dir, reference.run_dir)


def test_second_signal_stops_at_once(capfd, monkeypatch):
    # What was there before comes back: Python's handler, or SIG_IGN in a process started in the background by a
    # non-interactive shell (`cmd &`), which ignores SIGINT from its start.
    before = signal.getsignal(signal.SIGINT)
    with preempt.stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested() and flag.agreed() and flag.name() == "SIGINT"
        assert "SIGINT received: finishing this optimizer step" in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)  # at once: the launcher passing on the same Ctrl-C
        assert capfd.readouterr().err == ""
        monkeypatch.setattr(preempt, "REPEAT_AFTER_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert "SIGINT again: stopping now" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
    assert flag.preempted(5, None, Path("r")).exit_code == 130


def test_sigterm_to_the_cli_exits_143_with_the_resume_command(model_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    sets = small(model_dir, **{"train.max_steps": 40, "train.save_every": 100, "train.eval_every": 100})
    args = [sys.executable, "-m", "moefit", "train", "--quiet", "--output-dir", str(run_dir)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() or '"train"' not in (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM received" in err and "stopped by SIGTERM" in err and "Traceback" not in err
    assert f"moefit train --resume {run_dir}" in err
    (step, path), = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert 1 <= step < 40 and verify.problem(path) is None
    assert f"checkpoint: {path}" in (run_dir / "train.log").read_text()


# ------------------------------------------------------------------------------------- NaN and OOM

def _break_forward(monkeypatch, at_step: int, grad_accum: int, fault) -> None:
    """From the first micro-batch of optimizer step `at_step` on, training forwards go through `fault`."""
    forward = MoefitCausalLM.forward
    calls = {"n": 0}

    def broken(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > (at_step - 1) * grad_accum:
                return fault(out)
        return out

    monkeypatch.setattr(MoefitCausalLM, "forward", broken)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, tmp_path, monkeypatch):  # noqa: F811
    def nan(out):
        out.loss_sum = out.loss_sum * float("nan")
        return out

    _break_forward(monkeypatch, 3, 2, nan)
    run_dir = tmp_path / "run"
    with pytest.raises(MoefitError, match="the training loss became nan at step 3") as e:
        train(output_dir=run_dir, echo=False, **small(model_dir))
    assert "train.lr" in str(e.value) and f"--resume {run_dir}" in str(e.value) and "step-2" in str(e.value)
    assert [s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")] == [2]
    weights = load_file(run_dir / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_out_of_memory_says_what_to_change_and_leaves_the_run_resumable(reference, model_dir, tmp_path,  # noqa: F811
                                                                       monkeypatch, capsys):
    def oom(out):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _break_forward(monkeypatch, 3, 2, oom)
    run_dir = tmp_path / "run"
    args = ["train", "--output-dir", str(run_dir)] + [a for k, v in small(model_dir).items()
                                                        for a in ("--set", f"{k}={v}")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ran out of GPU memory" in err and "train.batch_size (now 1" in err and "train.max_length (now 128)" in err
    assert "lora.expert_r" in err and "embeddings_on_host" in err and f"--resume {run_dir}" in err
    assert "Traceback" not in err
    monkeypatch.undo()
    resumed = train(resume=run_dir, echo=False)
    assert resumed.completed
    _same_adapter(run_dir, reference.run_dir)


def test_out_of_memory_message_quotes_the_plan(tmp_path):
    from moefit.plan import check_fits

    cfg = RunConfig(model="llama4-scout")
    plan = check_fits(cfg, gpu="h100-80gb")
    msg = failures.oom_message(cfg, tmp_path, planned=(plan, 80 * 2**30, "NVIDIA H100"))
    total, peak = (f"{n / 2**30:.2f} GiB" for n in (plan.memory.needed, plan.memory.peak_allocated))
    assert f"The plan for this run predicts {total} on the GPU (peak allocated {peak})" in msg
    assert "NVIDIA H100" in msg
    assert "No checkpoint was saved yet" in msg and "--overwrite" in msg


# --------------------------------------------------------------------------------------- verification

def test_truncated_newest_checkpoint_falls_back_and_finishes(reference, model_dir, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    train(output_dir=run_dir, stop_after=3, echo=False, **small(model_dir, **{"train.save_every": 1}))
    bad = run_dir / "checkpoints" / "step-3" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    assert main(["train", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {bad.parent} is damaged" in out and "truncated" in out
    assert f"resuming from {run_dir / 'checkpoints' / 'step-2'}" in out
    _same_adapter(run_dir, reference.run_dir)


def test_unreadable_checkpoint_without_manifest_is_one_clear_error(model_dir, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    train(output_dir=run_dir, stop_after=2, echo=False, **small(model_dir))
    step2 = run_dir / "checkpoints" / "step-2"
    (step2 / verify.MANIFEST).unlink()  # as written before manifests existed
    (step2 / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume from {step2}" in err and "Traceback" not in err


def test_manifest_detects_truncated_changed_and_missing_files(tmp_path):
    d = tmp_path / "step-1"
    d.mkdir()
    (d / "a.bin").write_bytes(b"abcdef")
    (d / "b.bin").write_bytes(b"xyz")
    verify.write_manifest(d, {"data_fingerprint": "f"})
    assert verify.problem(d) is None
    (d / "a.bin").write_bytes(b"abcdeX")
    assert "checksum" in verify.problem(d)
    (d / "a.bin").write_bytes(b"abc")
    assert "truncated" in verify.problem(d)
    (d / "b.bin").unlink()
    (d / "a.bin").write_bytes(b"abcdef")
    assert "missing" in verify.problem(d)
    (d / verify.MANIFEST).write_text("{not json")
    assert "damaged" in verify.problem(d)
    with pytest.raises(MoefitError, match="no checkpoint verifies"):
        verify.pick_verified([d])


def test_resume_warns_when_the_data_or_config_changed(tmp_path):
    d = tmp_path / "step-1"
    d.mkdir()
    cfg = RunConfig()
    verify.write_manifest(d, verify.run_identity(cfg, "aaaa"))
    assert verify.identity_changes(d, verify.run_identity(cfg, "aaaa")) == []
    cfg.train.save_every, cfg.train.max_steps = 7, 99  # settings a resume may change: no warning
    cfg.engine.layer_graphs = False  # (the trainer turns the graphs off where their memory does not fit)
    cfg.engine.backward_graphs, cfg.train.offload_checkpoints = False, True  # (... or the offloading on)
    assert verify.identity_changes(d, verify.run_identity(cfg, "aaaa")) == []
    old = json.loads((d / verify.MANIFEST).read_text())  # a manifest written when engine settings were recorded
    old["config"]["engine.layer_graphs"], old["config_fingerprint"] = True, "older"
    (d / verify.MANIFEST).write_text(json.dumps(old))
    assert verify.identity_changes(d, verify.run_identity(cfg, "aaaa")) == []
    cfg.train.lr = 1e-3
    warnings = verify.identity_changes(d, verify.run_identity(cfg, "bbbb"))
    assert len(warnings) == 2
    assert "training data changed" in warnings[0] and "aaaa -> bbbb" in warnings[0]
    assert "train.lr 2e-05 -> 0.001" in warnings[1]


def test_sigterm_to_a_two_process_run_stops_both_ranks_after_the_same_step(tmp_path):
    """`--gpus 2`: the launcher passes SIGTERM on; the ranks agree on the step, rank 0 saves every rank's RNG."""
    from tests.test_data_parallel import _env

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "moefit", "train", "--gpus", "2", "--output-dir", str(run_dir)]
    for k, v in {"train.max_steps": 200, "train.max_length": 128, "train.eval_every": 1000,
                 "train.save_every": 1000, "data.eval_fraction": 0}.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and '"train"' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM after step" in err and f"moefit train --resume {run_dir}" in err
    assert "Traceback" not in err + out, err[-3000:]
    (step, path), = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert step < 200 and verify.problem(path) is None and (path / ckpt.rng_file(1)).is_file()
    assert ckpt.read_trainer_state(path).world_size == 2

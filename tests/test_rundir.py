"""Reading run directories (moefit.rundir): a damaged or missing adapter file makes `export`, `eval` and
`generate` exit 2 with one message naming the file and what to do, no traceback, no output left behind; a failed
export leaves nothing in --out (moefit.export.staging)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moefit
from moefit.cli import main
from moefit.errors import MoefitError
from moefit.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_run

W, C = ADAPTER_WEIGHTS, ADAPTER_CONFIG


def _truncate(p: Path, keep: float) -> None:
    p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])


def _wrong_shape(p: Path) -> None:
    state = load_file(str(p))
    key = next(k for k in state if k.endswith(".lora_A"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(p))


def _config(edit):
    def apply(p: Path) -> None:
        cfg = json.loads(p.read_text())
        edit(cfg)
        p.write_text(json.dumps(cfg))
    return apply


# (name, file damaged, how, what the message must say)
CASES = [
    ("weights-truncated-header", W, lambda p: _truncate(p, 0.01), "truncated"),
    ("weights-truncated-data", W, lambda p: _truncate(p, 0.9), "truncated"),
    ("weights-garbage", W, lambda p: p.write_bytes(bytes(range(256)) * 40), "not a valid safetensors file"),
    ("weights-empty", W, lambda p: p.write_bytes(b""), "0 bytes"),
    ("weights-missing", W, lambda p: p.unlink(), "missing"),
    ("weights-wrong-shape", W, _wrong_shape, "expected A ["),
    ("weights-no-tensor", W, lambda p: save_file({}, str(p)), "no tensors"),
    ("config-empty", C, lambda p: p.write_text(""), "not readable JSON"),
    ("config-garbage", C, lambda p: p.write_bytes(b"\x00\xff{{garbage"), "not readable JSON"),
    ("config-not-object", C, lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    ("config-key-missing", C, _config(lambda c: c.pop("r")), "'r' is missing"),
    ("config-wrong-type", C, _config(lambda c: c.update(r="four")), "'r' must be a positive integer"),
    ("config-missing", C, lambda p: p.unlink(), "no adapter_config.json"),
    ("run-config-binary", "config.yaml", lambda p: p.write_bytes(b"\x00\xff\xfe\x80"), "cannot read it as a text"),
    ("run-config-not-yaml", "config.yaml", lambda p: p.write_text("model: [tiny\n"), "not valid YAML"),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def damaged(request, tiny_run, tmp_path):
    _, name, damage, says = request.param
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    damage(run / name)
    return run, name, says


def _fails_cleanly(capsys, argv: list[str], file: Path | None, says: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"moefit {argv[0]}: error: ") and says in err, err
    if file is not None:
        assert str(file) in err, err


def test_damaged_adapter_fails_cleanly_everywhere(damaged, tmp_path, capsys):
    run, name, says = damaged
    file = None if name == C and not (run / C).exists() else run / name
    out = tmp_path / "exports" / "out"
    _fails_cleanly(capsys, ["export", str(run), "--merge", "--out", str(out)], file, says)
    _fails_cleanly(capsys, ["export", str(run), "--adapter", "--out", str(out)], file, says)
    assert not (tmp_path / "exports").exists()  # not even the parent folder the export would have made
    _fails_cleanly(capsys, ["eval", str(run), "--device", "cpu"], file, says)
    _fails_cleanly(capsys, ["generate", str(run), "--prompt", "hi", "--device", "cpu"], file, says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_damaged_file_advice_points_at_newest_checkpoint(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for step in (2, 10):  # numeric order, not text order
        shutil.copytree(tiny_run, run / "checkpoints" / f"step-{step}", ignore=shutil.ignore_patterns("config.yaml"))
    _truncate(run / W, 0.5)
    with pytest.raises(MoefitError, match=r"use its newest checkpoint instead: pass \S+step-10 in place of"):
        read_run(run)
    info = read_run(run / "checkpoints" / "step-10")  # a checkpoint folder reads with the run's config.yaml
    assert info.config is not None and info.adapter_dir.name == "step-10"


def test_load_adapter_checks_files_before_touching_the_model(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _truncate(run / W, 0.5)
    model = moefit.load_model(moefit.load_config(run / "config.yaml").model, dtype=torch.float32)
    with pytest.raises(MoefitError, match="adapter_model.safetensors: not a valid safetensors file"):
        moefit.lora.load_adapter(model, run)
    assert not moefit.lora.lora_parameters(model)


def test_load_adapter_matches_the_model_mode(tiny_run):
    """Loading a trained adapter into a model in eval mode: the LoRA modules (dropout) are in eval mode too."""
    cfg = moefit.load_config(tiny_run / "config.yaml")
    for training in (False, True):
        model = moefit.load_model(cfg.model, dtype=torch.float32).train(training)
        info = moefit.lora.load_adapter(model, tiny_run)
        assert info["r"] == 4
        modes = {m.training for n, m in model.named_modules() if "lora" in n}
        assert modes == {training}, (training, modes)


def _writes_then_fail(monkeypatch, fail_at: int) -> list[int]:
    """The `fail_at`-th write into a shard file (a header, or a piece of a tensor) fails: the disk is full."""
    import moefit.export.safetensors_stream as stream

    real, calls = stream._write_at, []

    def write_or_fail(fd, data, offset):
        calls.append(offset)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(stream, "_write_at", write_or_fail)
    return calls


def test_failed_merge_leaves_no_partial_output(tiny_run, tmp_path, monkeypatch, capsys):
    calls = _writes_then_fail(monkeypatch, fail_at=20)
    out = tmp_path / "merged"
    assert main(["export", str(tiny_run), "--merge", "--out", str(out), "--max-shard-size", "200KB",
                 "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was left in" in err and "Traceback" not in err
    assert len(calls) >= 20  # shards were being written when the disk filled up
    assert list(tmp_path.iterdir()) == []  # no out, no .partial folder, no shard


def test_failed_overwrite_keeps_the_earlier_export(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(tiny_run), "--merge", "--out", str(out), "--max-shard-size", "200KB"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sum(n.startswith("model-") for n in before) >= 2
    _writes_then_fail(monkeypatch, fail_at=1)
    assert main(["export", str(tiny_run), "--merge", "--out", str(out), "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    monkeypatch.undo()
    assert main(["export", str(tiny_run), "--merge", "--out", str(out), "--overwrite"]) == 0  # one shard now
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in out.glob("model*.safetensors")) == sorted(set(index["weight_map"].values()))
    assert "merged checkpoint written" in capsys.readouterr().out


def test_adapter_export_written_whole(tiny_run, tmp_path):
    out = tmp_path / "a" / "b" / "adapter"
    moefit.export(tiny_run, out, merge=False)
    assert (out / "adapter_model.safetensors").is_file() and not list(out.parent.glob(".*partial"))

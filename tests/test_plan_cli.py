"""`moefit plan` on the command line: fast, no torch, table and --json agree, a run that does not fit says why."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from moefit.cli import main


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moefit", "plan", *args], capture_output=True, text=True,
                          timeout=60)


def test_plan_is_fast_and_never_imports_torch():
    code = ("import sys, time; t = time.perf_counter(); from moefit.cli import main; "
            "rc = main(['plan', '--model', 'llama4-scout', '--gpu', 'h100-80gb']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
            "print('elapsed', time.perf_counter() - t)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert "TOTAL on the GPU" in out.stdout and "H100 80GB SXM" in out.stdout and "$2.69" in out.stdout
    assert wall < 2.0, f"moefit plan took {wall:.2f} s"


def test_json_has_the_table_numbers(capsys):
    args = ["plan", "--model", "llama4-scout", "--gpu", "h100-80gb", "h200", "--steps", "3000"]
    main(args)
    table = capsys.readouterr().out
    main(args + ["--json"])
    d = json.loads(capsys.readouterr().out)
    for c in d["memory"]["components"]:
        row = re.search(rf"^  {re.escape(c['label'])}\s+(-?[\d.]+)", table, re.M)
        assert row and float(row.group(1)) == c["gib"], c["label"]
    assert f"{d['memory']['total_gib']:.2f}" in re.search(r"TOTAL on the GPU.*", table).group(0)
    for g in d["gpus"]:
        line = next(x for x in table.splitlines() if x.startswith(g["label"]))
        assert f"{g['margin_gib']:+.2f}" in line and ("yes" if g["fits"] else "NO") in line
        assert f"${g['cost_usd']:,.2f}" in line and str(g["max_seq_len"]) in line


def test_not_fitting_exits_1_with_a_suggestion():
    out = _run(["--model", "llama4-scout", "--gpu", "h100-80gb", "--seq-len", "32768"])
    assert out.returncode == 1
    assert "does not fit" in out.stdout and "Options:" in out.stdout
    assert "--seq-len" in out.stdout or "--expert-rank" in out.stdout or "--gpu" in out.stdout


def test_bad_gpu_is_a_one_line_error():
    out = _run(["--model", "llama4-scout", "--gpu", "h1000"])
    assert out.returncode == 2 and "unknown GPU 'h1000'" in out.stderr and "Traceback" not in out.stderr


def test_config_file_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: mixtral-8x7b\ntrain:\n  max_length: 1024\nlora:\n  r: 16\n", encoding="utf-8")
    main(["plan", str(cfg), "--gpu", "h200", "--expert-rank", "4", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["model"]["name"] == "mixtral-8x7b"
    assert d["settings"]["seq_len"] == 1024 and d["settings"]["lora_rank"] == 16 and d["settings"]["expert_rank"] == 4


def test_config_after_gpu_list_is_the_config(tmp_path, capsys):
    """`--gpu` takes several names; a run config written after them is read as the config, not as a GPU."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: mixtral-8x7b\ntrain:\n  max_length: 1024\n", encoding="utf-8")
    main(["plan", "--gpu", "h200", "h100-80gb", str(cfg), "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["model"]["name"] == "mixtral-8x7b" and d["settings"]["seq_len"] == 1024
    assert sorted(g["gpu"] for g in d["gpus"]) == ["h100-80gb", "h200"]
    assert main(["plan", str(cfg), "--gpu", "h200", str(cfg)]) == 2  # two configs: which one?
    err = capsys.readouterr().err
    assert f"--gpu {cfg}: a file, not a GPU, and the run config is already {cfg}" in err
    assert main(["plan", "--gpu", "h200", str(tmp_path / "typo.yaml")]) == 2
    assert "not a GPU, and no such config file" in capsys.readouterr().err


def test_every_preset_plans(capsys):
    """`moefit plan --model NAME` for every shipped preset: a memory total, and the preset's own family."""
    from moefit.plan.model_facts import PRESETS, PRESETS_DIR

    for name in PRESETS:
        rc = main(["plan", "--model", name, "--gpu", "h200", "--json"])
        d = json.loads(capsys.readouterr().out)
        assert rc in (0, 1), name  # fits / does not fit
        assert d["memory"]["total_gib"] > 0 and d["model"]["total_params"] > 1e9, name
        raw = json.loads((PRESETS_DIR / f"{name}.json").read_text())
        assert d["model"]["family"] in (raw.get("model_type"), raw.get("text_config", {}).get("model_type")), name

"""`import moefit` (and of its library modules) changes no process-wide state: environment, logger levels,
matplotlib's backend. The CLI may, and sets OMP_WAIT_POLICY."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from moefit import cli

PROBE = r"""
import importlib, json, logging, os, sys, tempfile
from pathlib import Path
import matplotlib

def state():
    loggers = {name: getattr(lg, "level", None) for name, lg in logging.root.manager.loggerDict.items()}
    return {"env": dict(os.environ), "root": logging.root.level, "loggers": loggers,
            "backend": matplotlib.rcParams._get("backend")}  # as set, not resolved

before, modules_before = state(), {m.split(".")[0] for m in sys.modules}
if sys.argv[1] == "moefit":  # moefit's library modules, and a plot drawn
    import moefit
    import moefit.data, moefit.evaluate, moefit.export, moefit.generate, moefit.lora, moefit.models, moefit.plan
    import moefit.quant.nf4, moefit.train, moefit.train.metrics
    from moefit.train.metrics import MetricsLog, plot_loss
    d = Path(tempfile.mkdtemp())
    log = MetricsLog(d / "metrics.jsonl")
    log.write({"kind": "train", "step": 1, "loss": 2.0})
    log.write({"kind": "train", "step": 2, "loss": 1.5})
    log.write({"kind": "eval", "step": 2, "eval_loss": 1.7})
    plot_loss(d / "loss.png", log, "probe")
    png = (d / "loss.png").stat().st_size
else:  # the same third-party packages alone: what they change themselves is not moefit's doing
    for name in json.loads(sys.argv[1]):
        importlib.import_module(name)
    png = 0
after = state()
print(json.dumps({
    "env": sorted(k for k in set(before["env"]) | set(after["env"]) if before["env"].get(k) != after["env"].get(k)),
    "root": [before["root"], after["root"]],
    "loggers": sorted(n for n, lvl in before["loggers"].items() if after["loggers"].get(n) != lvl),
    "set_levels": sorted(n for n, lvl in after["loggers"].items() if n.startswith(("moefit", "bitsandbytes")) and lvl),
    "backend": [str(before["backend"]), str(after["backend"])], "pyplot": "matplotlib.pyplot" in sys.modules,
    "imported": sorted({m.split(".")[0] for m in sys.modules} - modules_before - {"moefit"}), "png": png}))
"""


def _probe(arg: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE, arg], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_changes_no_global_state():
    ours = _probe("moefit")
    deps = _probe(json.dumps([m for m in ours["imported"] if not m.startswith("_")]))
    assert "OMP_WAIT_POLICY" not in ours["env"] and ours["env"] == deps["env"], (ours["env"], deps["env"])
    assert ours["root"][0] == ours["root"][1] and ours["loggers"] == [] and ours["set_levels"] == [], ours
    assert ours["backend"][0] == ours["backend"][1] and not ours["pyplot"], ours
    assert ours["png"] > 1000  # the plot is still drawn (an Agg canvas of its own figure)


def test_cli_sets_the_openmp_wait_policy(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["plan", "--model", "llama4-scout", "--gpu", "h200"]) in (0, 1)
    assert os.environ["OMP_WAIT_POLICY"] == cli.OMP_SETTINGS["OMP_WAIT_POLICY"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own setting wins
    cli.main(["plan", "--model", "llama4-scout", "--gpu", "h200"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()

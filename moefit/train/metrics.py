"""What a run leaves behind besides the adapter: metrics.jsonl, report.json and loss.png."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object per logged step (`"kind": "train"`) and per eval.

    On resume the records after the checkpoint's step are dropped first, so a step that is re-run after a
    kill appears once, and the file reads like the one an uninterrupted run writes.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                if rec.get("step", 0) <= resume_step:
                    kept.append(rec)
            self.records = kept
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, path)
        elif path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "train"]

    def eval_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "eval"]


def versions() -> dict[str, str | None]:
    """What a result depends on besides the config: library versions and the GPU (None on CPU)."""
    import bitsandbytes
    import torch
    import transformers

    from .. import __version__

    return {
        "moefit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "triton": _triton_version(),  # the opt-in kernels (moefit.kernels); None where it is not installed
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _triton_version() -> str | None:
    """The installed Triton's version, read from its package metadata (no import of Triton for a report)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None


def write_report(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def plot_loss(path: Path, metrics: MetricsLog, title: str) -> None:
    """Training loss per optimizer step and held-out loss at each eval, one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: the process's matplotlib backend is not ours to set

    train = [(r["step"], r["loss"]) for r in metrics.train_records() if math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in metrics.eval_records() if math.isfinite(r["eval_loss"])]
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="held-out loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per label token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)

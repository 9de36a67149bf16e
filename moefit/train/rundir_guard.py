"""A run never destroys an earlier result.

- A new run refuses a non-empty folder unless `--overwrite` (then only the files moefit writes are removed).
- Resuming a finished run changes nothing and says so; extending it (a larger `train.max_steps`) first moves its
  final adapter to `RUN/final-step-N/`.
- Resuming verifies the checkpoint (verify.py) and falls back to the newest one that verifies.

Only rank 0 calls these when several processes train together (they read and write the run folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config
from ..errors import ConfigError, MoefitError
from . import checkpoint as ckpt
from . import verify

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# Everything a run writes into its folder (and nothing else: --overwrite leaves other files alone).
RUN_FILES = (*ADAPTER_FILES, "config.yaml", "train.log", "metrics.jsonl", "metrics.jsonl.tmp", "report.json",
             "report.json.tmp", "loss.png")
RUN_DIRS = ("checkpoints", "final-step-*")


def _listing(run_dir: Path, limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def claim(run_dir: Path, overwrite: bool) -> None:
    """Before a new run writes into `run_dir`: refuse a non-empty folder, or with `overwrite` clear moefit's files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MoefitError(f"--output-dir {run_dir} is a file, not a folder. Pass another --output-dir.")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for pattern in RUN_DIRS:
            for p in run_dir.glob(pattern):
                shutil.rmtree(p)
        return
    other = "replace it with --overwrite, or pass another --output-dir (the default is a new folder under runs/)."
    report = finished_report(run_dir)
    if report is not None:
        raise MoefitError(f"{run_dir} already holds a finished run ({report['steps']} steps). Extend it with "
                          f"--resume {run_dir} --max-steps N (N above {report['steps']}), {other}")
    newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if newest is not None:
        raise MoefitError(f"{run_dir} already holds a run (newest checkpoint {newest.name}). Continue it with "
                          f"--resume {run_dir}, {other}")
    raise MoefitError(f"{run_dir} is not empty ({_listing(run_dir)}) and holds no checkpoint to resume. Pass "
                      "--overwrite to replace the files of the earlier run, or another --output-dir (the default "
                      "is a new folder under runs/).")


def finished_report(run_dir: Path) -> dict[str, Any] | None:
    """The report of a full run that reached its last step and saved its adapter, else None."""
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (isinstance(report, dict) and report.get("mode") == "train" and (run_dir / ADAPTER_FILES[0]).is_file()
            and isinstance(report.get("steps"), int) and report["steps"] >= (report.get("total_steps") or 0)):
        return report
    return None


def extends(cfg: RunConfig, report: dict[str, Any], run_dir: Path) -> bool:
    """Whether resuming the finished run in `run_dir` with `cfg` trains more steps (a larger max_steps or epochs)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps > report["steps"]
    try:
        saved = load_config(run_dir / "config.yaml")
    except ConfigError:
        return True  # the run's length was set some other way: let the step count decide
    return saved.train.max_steps is not None or cfg.train.epochs > saved.train.epochs


def keep_final(run_dir: Path, report: dict[str, Any]) -> Path:
    """Move the finished run's adapter (with a copy of its config, report and loss curve) to RUN/final-step-N/."""
    dest = run_dir / f"final-step-{report['steps']}"
    dest.mkdir(exist_ok=True)
    for name in ("config.yaml", "report.json", "loss.png"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    for name in ADAPTER_FILES:
        if (run_dir / name).is_file():
            shutil.move(run_dir / name, dest / name)
    return dest


def finished_result(run_dir: Path, report: dict[str, Any]) -> Any:
    """The RunResult of a run that had already finished: read from its report, nothing recomputed."""
    from .loop import RunResult

    return RunResult(run_dir=run_dir, completed=True, step=report["steps"], total_steps=report["total_steps"],
                     start_eval_loss=report.get("start_eval_loss"), end_eval_loss=report.get("end_eval_loss"),
                     tokens=report.get("tokens", 0), wall_s=0.0, tokens_per_s=report.get("tokens_per_s", 0.0),
                     peak_mem_bytes=report.get("peak_mem_bytes", 0), adapter_dir=run_dir, report=report)


def resume_point(resume_from: Path, cfg: RunConfig) -> tuple[Path | None, list[str]]:
    """Where a resume starts, and what to tell the user. None: the run had finished and nothing is left to do.

    A finished run that `cfg` extends gets its final adapter moved aside first. The checkpoint is the newest at
    or before `resume_from` whose files verify."""
    run_dir = ckpt.run_dir_of(resume_from)
    report = finished_report(run_dir)
    if report is not None and not extends(cfg, report, run_dir):
        return None, [f"{run_dir} already finished ({report['steps']} of {report['total_steps']} steps); "
                      f"nothing to do and nothing changed. To train longer: moefit train --resume {run_dir} "
                      f"--max-steps N with N above {report['steps']}."]
    steps = dict((p, s) for s, p in ckpt.list_checkpoints(resume_from.parent))
    candidates = [p for p, s in steps.items() if s <= steps.get(resume_from, -1)] or [resume_from]
    picked, notes = verify.pick_verified(candidates)
    if report is not None:
        dest = keep_final(run_dir, report)
        notes.insert(0, f"extending a finished run: its final adapter (step {report['steps']}) is kept in {dest}.")
    return picked, notes

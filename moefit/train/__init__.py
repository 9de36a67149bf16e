"""Training: `train(config_or_path, **overrides) -> RunResult`, the engine behind `moefit train`.

    moefit.train()                                   # the embedded tiny run (recipes/tiny.yaml), CPU, minutes
    moefit.train("recipes/llama4-scout-qlora.yaml", lr=1e-4, **{"data.train": "my.jsonl"})
    moefit.train("run.yaml", smoke=True, steps=20)   # the smoke run; result.smoke.passed
    moefit.train(resume="runs/scout-20250101-120000")  # continue from its newest complete checkpoint
    moefit.train("run.yaml", gpus=2)                 # data parallel: 2 worker processes (NCCL; gloo on CPU)

Under torchrun (`torchrun --nproc-per-node N -m moefit train run.yaml`, or a script that calls `train()` in every
process) each process joins the run by itself: nothing to pass.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

from ..config import RunConfig, apply_overrides, load_config, save_config
from ..errors import ConfigError, MoefitError, WorkersFailed
from ..models.families import check_trainable
from . import checkpoint
from .loop import RunResult, run
from .smoke import SmokeResult

__all__ = ["train", "resolve_config", "default_recipe_path", "RunResult", "SmokeResult"]


def default_recipe_path() -> Path:
    """The embedded default run (a copy ships as recipes/tiny.yaml): tiny Llama 4 MoE, shipped chat data, CPU."""
    return Path(__file__).resolve().parent / "tiny.yaml"


def _dotted(key: str) -> str:
    """`lr` -> `train.lr` (a key that lives in exactly one section), `train__lr` -> `train.lr`, dotted as is."""
    key = key.replace("__", ".")
    if "." in key:
        return key
    top = {f.name: f for f in dataclasses.fields(RunConfig)}
    if key in top:
        return key
    sections = [name for name, f in top.items() if dataclasses.is_dataclass(f.default_factory)  # type: ignore[arg-type]
                and key in {g.name for g in dataclasses.fields(f.default_factory)}]  # type: ignore[arg-type]
    if len(sections) == 1:
        return f"{sections[0]}.{key}"
    if not sections:
        raise ConfigError(f"unknown setting {key!r}: name it as section.key (e.g. train.lr).")
    raise ConfigError(f"setting {key!r} is ambiguous ({', '.join(f'{s}.{key}' for s in sections)}): "
                      "name the section.")


def resolve_config(config: RunConfig | str | Path | None, overrides: dict[str, Any] | None = None,
                   saved_run: Path | None = None) -> RunConfig:
    """A RunConfig from an object, a YAML path, the saved config of a run being resumed, or the tiny default."""
    dotted = {_dotted(k): v for k, v in (overrides or {}).items()}
    if isinstance(config, RunConfig):
        return apply_overrides(config.to_dict(), dotted, "the config object") if dotted else config
    if config is None:
        if saved_run is not None and (saved_run / "config.yaml").is_file():
            return load_config(saved_run / "config.yaml", dotted)
        return load_config(default_recipe_path(), dotted)
    return load_config(config, dotted)


def train(
    config: RunConfig | str | Path | None = None,
    *,
    output_dir: str | Path | None = None,
    resume: bool | str | Path | None = None,
    smoke: bool = False,
    steps: int | None = None,
    force: bool = False,
    stop_after: int | None = None,
    echo: bool = True,
    gpus: int | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> RunResult:
    """Fine-tune as the config says and return what happened (see RunResult).

    config: a RunConfig, a YAML path, or None (the embedded tiny run; when resuming, the run's saved config).
    output_dir: the run directory (default: config's output_dir, else runs/<model>-<timestamp>).
    resume: True (newest complete checkpoint in output_dir), or a run dir or checkpoint dir.
    smoke / steps: the smoke run (`steps` optimizer steps, default smoke.steps); see RunResult.smoke.
    force: start on CUDA even when the planner says the run does not fit.
    stop_after: stop after this many optimizer steps as a kill would (for tests of resume).
    gpus: start this many worker processes on this host (one per GPU; CPU processes with gloo when there is no
        GPU) through torch's elastic launcher and train data-parallel; the result is read from the run directory.
    overwrite: let a new run replace the files of an earlier run in output_dir (otherwise a non-empty folder is
    refused). Resuming a finished run changes nothing; with a larger max_steps its adapter moves to final-step-N/.
    SIGTERM / SIGINT stop after the current optimizer step with a checkpoint: preempt.Preempted is raised.
    overrides: settings, as `lr=1e-4`, `train__lr=1e-4` or `**{"train.lr": 1e-4}`.
    """
    if steps is not None and not smoke:
        raise MoefitError("steps= (--steps) sets the length of a smoke run; use max_steps= (--max-steps) "
                          "to shorten a full run.")
    if overwrite and resume:
        raise MoefitError("--overwrite and --resume contradict each other: --resume continues the run in the "
                          "folder, --overwrite replaces it. Pass one of them.")
    if gpus is not None and gpus > 1:
        if stop_after is not None:
            raise MoefitError("stop_after= is not available with gpus=: run the workers under torchrun yourself.")
        return _train_on_workers(config, gpus, output_dir, resume, smoke, steps, force, echo, overwrite, overrides)
    resume_from = None
    if resume:
        base = Path(output_dir) if output_dir is not None else None
        if resume is True and base is None and isinstance(config, RunConfig | str | Path):
            cfg0 = resolve_config(config, overrides)
            base = Path(cfg0.output_dir) if cfg0.output_dir else None
        if resume is True and base is None:
            raise MoefitError("--resume needs to know which run to continue: pass --output-dir RUN_DIR or "
                              f"--resume RUN_DIR{_newest_run_hint()}.")
        resume_from = checkpoint.resolve_resume(True if resume is True else Path(resume), base)
        cfg = resolve_config(config, overrides, saved_run=checkpoint.run_dir_of(resume_from))
        check_trainable(cfg.model)
        return run(cfg, resume_from=resume_from, smoke=smoke, smoke_steps=steps, force=force,
                   stop_after=stop_after, echo=echo)
    cfg = resolve_config(config, overrides)
    check_trainable(cfg.model)  # a family the engine cannot train fails here, before the data is read
    return run(cfg, run_dir=Path(output_dir) if output_dir is not None else None, smoke=smoke, smoke_steps=steps,
               force=force, stop_after=stop_after, echo=echo, overwrite=overwrite)


def _train_on_workers(config: RunConfig | str | Path | None, gpus: int, output_dir: str | Path | None,
                      resume: bool | str | Path | None, smoke: bool, steps: int | None, force: bool, echo: bool,
                      overwrite: bool, overrides: dict[str, Any]) -> RunResult:
    """`train(..., gpus=N)`: resolve the config and the run directory here (errors before any worker starts), then
    run `moefit train` in N processes on them."""
    from ..parallel.launch import launch_workers
    from .loop import _choose_run_dir, default_run_dir

    argv: list[str] = []
    if resume:
        base = Path(output_dir) if output_dir is not None else None
        resume_from = checkpoint.resolve_resume(True if resume is True else Path(resume), base)
        run_dir = checkpoint.run_dir_of(resume_from)
        cfg = resolve_config(config, overrides, saved_run=run_dir)
        argv += ["--resume", str(resume_from)]
    else:
        cfg = resolve_config(config, overrides)
        wanted = Path(output_dir) if output_dir is not None else (
            Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg, smoke))
        chosen, problem = _choose_run_dir(cfg, wanted, None, smoke, overwrite)
        if problem:
            raise MoefitError(problem)
        run_dir = chosen
        argv += ["--output-dir", str(run_dir)] + (["--overwrite"] if overwrite else [])
    check_trainable(cfg.model)  # before any worker starts
    if smoke:
        argv += ["--smoke"] + (["--steps", str(steps)] if steps is not None else [])
    argv += ["--force"] if force else []
    argv += [] if echo else ["--quiet"]
    with tempfile.TemporaryDirectory(prefix="moefit-launch-") as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        save_config(cfg, cfg_path)
        code = launch_workers(gpus, ["train", str(cfg_path), *argv])
    report_path = run_dir / "report.json"
    if code not in (0, 1) or not report_path.is_file():
        raise WorkersFailed(f"the {gpus}-process run in {run_dir} stopped (exit code {code}); the message above "
                            "says why.", exit_code=code)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    smoke_result = SmokeResult.from_dict(report["smoke"]) if report.get("smoke") else None
    return RunResult(run_dir=run_dir, completed=report["steps"] >= report["total_steps"], step=report["steps"],
                     total_steps=report["total_steps"], start_eval_loss=report.get("start_eval_loss"),
                     end_eval_loss=report.get("end_eval_loss"), tokens=report.get("tokens", 0),
                     wall_s=report.get("wall_s", 0.0), tokens_per_s=report.get("tokens_per_s", 0.0),
                     peak_mem_bytes=report.get("peak_mem_bytes", 0),
                     adapter_dir=run_dir if report.get("mode") == "train" else None, smoke=smoke_result,
                     report=report)


def _newest_run_hint() -> str:
    runs = Path("runs")
    if not runs.is_dir():
        return ""
    candidates = [p for p in runs.iterdir() if checkpoint.latest_checkpoint(p / "checkpoints") is not None]
    if not candidates:
        return ""
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    return f" (the newest run with a checkpoint here is {newest})"


from .._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, train)

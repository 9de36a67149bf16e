"""What a run directory (or a bare adapter directory) holds: the adapter, the base model it was trained on, and
the settings the base weights were stored with during training (NF4 or not, blocksize, compute dtype)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import QuantConfig, RunConfig
from ..errors import MoefitError

_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class RunInfo:
    adapter_dir: Path
    adapter_config: dict[str, Any]
    source: str  # model as the run named it: 'tiny', a directory or a hub id
    quant: QuantConfig
    compute_dtype: torch.dtype  # dtype the frozen weights were dequantized to while training
    config: RunConfig | None = None  # None for a bare adapter directory
    notes: list[str] = field(default_factory=list)

    @property
    def base_dir(self) -> Path:
        from ..loading import resolve_source

        return resolve_source(self.source)


def is_run_or_adapter_dir(path: str | Path) -> bool:
    from ..lora import ADAPTER_CONFIG

    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_run(run_dir: str | Path) -> RunInfo:
    """RUN_DIR (config.yaml + final adapter) or an adapter directory (adapter_config.json names the base)."""
    from ..config import load_config
    from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

    d = Path(run_dir).expanduser()
    if not d.is_dir():
        raise MoefitError(f"{d}: not a directory. Pass a run directory written by `moefit train` (it holds "
                          "config.yaml and adapter_model.safetensors) or an adapter directory.")
    if not (d / ADAPTER_CONFIG).is_file():
        hint = ""
        ckpts = sorted((d / "checkpoints").glob("step-*")) if (d / "checkpoints").is_dir() else []
        if ckpts:
            hint = (f" The run has checkpoints but no final adapter (did it finish?); pass a checkpoint folder such "
                    f"as {ckpts[-1]} if it holds an adapter, or resume the run with `moefit train --resume {d}`.")
        raise MoefitError(f"{d}: no {ADAPTER_CONFIG} here, so no trained adapter to use.{hint}")
    if not (d / ADAPTER_WEIGHTS).is_file():
        raise MoefitError(f"{d / ADAPTER_WEIGHTS}: missing; the adapter directory is incomplete.")
    acfg = read_adapter_config(d)
    if acfg.get("format") != "moefit-lora":
        raise MoefitError(f"{d / ADAPTER_CONFIG}: not a moefit adapter (format {acfg.get('format')!r}); "
                          "moefit exports adapters it trained.")
    notes: list[str] = []
    cfg = None
    for cand in (d / "config.yaml", d.parent.parent / "config.yaml" if d.parent.name == "checkpoints" else None):
        if cand is not None and cand.is_file():
            cfg = load_config(cand)
            break
    if cfg is not None:
        source, quant, compute = cfg.model, cfg.quantization, _PRECISION[cfg.train.precision]
    else:
        source = acfg.get("base_model")
        if not source:
            raise MoefitError(f"{d / ADAPTER_CONFIG}: names no base_model and there is no config.yaml beside it; "
                              "pass the base model with --base.")
        quant, compute = QuantConfig(), torch.bfloat16
        notes.append("no config.yaml: assuming the default NF4 settings (blocksize 64, double quant) and bf16 "
                     "compute for the base the adapter was trained on.")
    return RunInfo(adapter_dir=d, adapter_config=acfg, source=str(source), quant=quant, compute_dtype=compute,
                   config=cfg, notes=notes)

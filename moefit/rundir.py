"""Reading what `moefit train` leaves behind: a run directory (config.yaml + the final adapter), a checkpoint
folder, or a bare adapter directory (adapter_config.json names the base model).

`moefit export`, `moefit eval`, `moefit generate` and `moefit.lora.load_adapter` all read adapters through here,
so a missing, truncated, garbage or inconsistent file fails the same way everywhere: one MoefitError naming the
file and what to do, before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import QuantConfig, RunConfig
from .dtypes import FLOAT_DTYPES, resolve_dtype
from .errors import DamagedFileError, MoefitError
from .safetensors_io import SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPERT_PROJS = ("gate", "up", "down")

# adapter_config.json keys that loading an adapter needs, and the check each value must pass.
_NUMBER = (int, float)
_REQUIRED: dict[str, tuple[str, Any]] = {
    "r": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "alpha": ("a positive number", lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool) and v > 0),
    "dropout": ("a number in [0, 1)", lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool) and 0 <= v < 1),
    "targets": ("a list of names", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
    "expert_r": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "expert_alpha": ("a number >= 0", lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool) and v >= 0),
    "routed_experts": ("true or false", lambda v: isinstance(v, bool)),
    "dtype": (f"one of {', '.join(FLOAT_DTYPES)}", lambda v: v in FLOAT_DTYPES),
}


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
        from .loading import resolve_source

        return resolve_source(self.source)


def is_run_or_adapter_dir(path: str | Path) -> bool:
    """A folder `moefit train` wrote (or an adapter directory), even an incomplete one, as opposed to a model
    directory such as a merged export (config.json + weights, none of these files)."""
    return any((Path(path) / name).exists() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "config.yaml"))


def _run_dir_of(adapter_dir: Path) -> Path:
    return adapter_dir.parent.parent if adapter_dir.parent.name == "checkpoints" else adapter_dir


def _what_to_do(adapter_dir: Path) -> str:
    """Advice for a damaged adapter file: the newest other checkpoint that holds one, else copy it again."""
    ckpt_dir = _run_dir_of(adapter_dir) / "checkpoints"
    ckpts = sorted((c for c in ckpt_dir.glob("step-*") if (c / ADAPTER_WEIGHTS).is_file() and c != adapter_dir),
                   key=lambda c: int(c.name[5:]) if c.name[5:].isdigit() else -1) if ckpt_dir.is_dir() else []
    again = "Copy the run directory again from where it was trained (an interrupted copy or a full disk?)"
    if ckpts:
        return f"{again}, or use its newest checkpoint instead: pass {ckpts[-1]} in place of {adapter_dir}."
    return f"{again}, or train the run again."


def _damaged(path: Path, why: str) -> DamagedFileError:
    return DamagedFileError(path, f"{why}; the adapter cannot be used", _what_to_do(path.parent))


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of a moefit adapter, with every setting loading needs present and of the right type."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise MoefitError(f"{path}: not found; expected an adapter directory written by moefit.")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(path, f"not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _damaged(path, f"expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type"):
        raise MoefitError(f"{path.parent}: a PEFT adapter (from `moefit export --adapter`). Use the run directory "
                          "it came from, or a merged export (`moefit export RUN_DIR --merge`).")
    if cfg.get("format") != "moefit-lora":
        raise MoefitError(f"{path}: not a moefit adapter (format {cfg.get('format')!r}); moefit reads the adapters "
                          "it trained (run directories written by `moefit train`).")
    for key, (what, ok) in _REQUIRED.items():
        if key not in cfg:
            raise _damaged(path, f"the setting {key!r} is missing")
        if not ok(cfg[key]):
            raise _damaged(path, f"{key!r} must be {what}, got {cfg[key]!r}")
    return cfg


def _expected_ranks(cfg: dict[str, Any]) -> tuple[int, int]:
    return int(cfg["r"]), int(cfg["expert_r"]) if cfg["routed_experts"] else 0


def check_adapter_weights(adapter_dir: str | Path, cfg: dict[str, Any]) -> SafetensorsFile:
    """The adapter's weight file, its header checked against `cfg` (names, ranks, shapes; no tensor data read):
    a truncated, garbage or mismatched file fails here, naming the file."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise MoefitError(f"{path}: missing; the adapter directory is incomplete. {_what_to_do(path.parent)}")
    try:
        f = SafetensorsFile(path)
    except DamagedFileError as e:
        raise _damaged(path, e.why) from None
    if not f.keys():
        raise _damaged(path, "the file holds no tensors")
    r, r_e = _expected_ranks(cfg)
    pairs: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for key in f.keys():
        mod, _, leaf = key.rpartition(".")
        proj, _, ab = leaf.rpartition("lora_")
        if ab not in ("A", "B") or proj not in ("", *(p + "_" for p in EXPERT_PROJS)) or not mod:
            raise _damaged(path, f"unexpected tensor {key!r} (not a LoRA A/B matrix)")
        if not f.dtype(key).is_floating_point:
            raise _damaged(path, f"tensor {key!r} has dtype {f.dtype(key)}, expected a floating-point type")
        pairs.setdefault((mod, proj.rstrip("_")), {})[ab] = f.shape(key)
    for (mod, proj), shapes in sorted(pairs.items()):
        name = f"{mod}.{proj + '_' if proj else ''}lora_"
        if set(shapes) != {"A", "B"}:
            missing = "B" if "A" in shapes else "A"
            raise _damaged(path, f"{name}{'AB'.replace(missing, '')} has no matching {name}{missing}")
        a, b = shapes["A"], shapes["B"]
        if not proj:  # A [r, in], B [out, r]
            ok = len(a) == 2 and len(b) == 2 and a[0] == r and b[1] == r
            want = f"A [{r}, in] and B [out, {r}] (r = {r} in {ADAPTER_CONFIG})"
        else:  # A [E, in, r_e], B [E, r_e, out]
            ok = len(a) == 3 and len(b) == 3 and a[0] == b[0] and a[2] == r_e and b[1] == r_e and r_e > 0
            want = f"A [E, in, {r_e}] and B [E, {r_e}, out] (expert_r = {r_e} in {ADAPTER_CONFIG})"
        if not ok or 0 in a or 0 in b:
            raise _damaged(path, f"{name}A/B have shapes {list(a)} and {list(b)}, expected {want}")
    return f


def read_adapter_weights(adapter_dir: str | Path, cfg: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter, checked first (see check_adapter_weights)."""
    cfg = read_adapter_config(adapter_dir) if cfg is None else cfg
    f = check_adapter_weights(adapter_dir, cfg)
    return {key: f.read(key) for key in f.keys()}


def read_run(run_dir: str | Path) -> RunInfo:
    """RUN_DIR (config.yaml + final adapter), one of its checkpoint folders, or an adapter directory
    (adapter_config.json names the base). The adapter's files are checked here (see check_adapter_weights)."""
    from .config import load_config

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
    acfg = read_adapter_config(d)
    check_adapter_weights(d, acfg)
    notes: list[str] = []
    cfg = None
    config_yaml = _run_dir_of(d) / "config.yaml"
    if config_yaml.is_file():
        cfg = load_config(config_yaml)
    if cfg is not None:
        source, quant, compute = cfg.model, cfg.quantization, resolve_dtype(cfg.train.precision)
    else:
        source = acfg.get("base_model")
        if not source or not isinstance(source, str):
            raise MoefitError(f"{d / ADAPTER_CONFIG}: names no base_model and there is no config.yaml beside it; "
                              "pass the base model with --base.")
        quant, compute = QuantConfig(), torch.bfloat16
        notes.append("no config.yaml: assuming the default NF4 settings (blocksize 64, double quant) and bf16 "
                     "compute for the base the adapter was trained on.")
    return RunInfo(adapter_dir=d, adapter_config=acfg, source=str(source), quant=quant, compute_dtype=compute,
                   config=cfg, notes=notes)


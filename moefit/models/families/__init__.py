"""The model families moefit trains: one module per family, each defining `SPEC` (a `spec.FamilySpec`).

Adding a family is adding a module here (and its parity tests): the registry below finds it by itself. torch-free.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ...errors import MoefitError
from .spec import FamilySpec, FusedExperts, MoESpec, PerExpert

__all__ = ["FamilySpec", "FusedExperts", "MoESpec", "PerExpert", "SPECS", "check_trainable", "family_for",
           "model_type_of", "require_family", "supported_names"]


def _discover() -> dict[str, FamilySpec]:
    specs: dict[str, FamilySpec] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "spec" or info.name.startswith("_"):
            continue
        spec = importlib.import_module(f"{__name__}.{info.name}").SPEC
        for model_type in spec.model_types:
            specs[model_type] = spec
    return specs


SPECS: dict[str, FamilySpec] = _discover()  # every config.json model_type moefit trains -> its family


def model_type_of(config: Any) -> str | None:
    """model_type of a config object or a config.json dict (its text config's for multimodal wrappers)."""
    if isinstance(config, dict):
        text = config.get("text_config")
        return (text.get("model_type") if isinstance(text, dict) else None) or config.get("model_type")
    return getattr(config, "model_type", None)


def family_for(model_type: str | None) -> FamilySpec | None:
    return SPECS.get(model_type or "")


def supported_names() -> list[str]:
    """The family names moefit trains, for messages."""
    return sorted({spec.name for spec in SPECS.values()})


def require_family(config: Any, source: str = "config.json") -> FamilySpec:
    """The family spec of `config`, or a MoefitError naming the families moefit trains."""
    model_type = model_type_of(config)
    spec = family_for(model_type)
    if spec is None:
        raise MoefitError(f"{source}: model type {model_type!r} is not one moefit can train yet (it trains: "
                          f"{', '.join(supported_names())}). `moefit plan` may still plan it.")
    return spec


def check_trainable(model: str) -> FamilySpec | None:
    """Refuse, from config.json alone, a model `moefit train` cannot train: before any data or weight is read.
    `model` is what a run config's `model:` holds ('tiny', a directory, a hub id). None when its config.json cannot
    be found here (the loader then says why)."""
    import json

    from ...errors import ConfigError
    from ...plan.model_facts import resolve_config_path

    try:
        path = resolve_config_path(model)
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ConfigError, OSError, ValueError):
        return None
    return require_family(raw, str(path))

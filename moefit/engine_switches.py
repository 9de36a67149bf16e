"""The engine settings (config `engine:`) in effect in this process, read by the kernels that branch on them.

`load_model(..., engine=cfg.engine)` calls `use`; the kernels call `current()` on their hot path (a module global,
no lookup). One process, one setting: a model loaded later with other settings changes it for both.
The environment variables that once chose these (MOEFIT_EXPERT_MATMUL, ...) are no longer read: a run records
what it used, and an unrecorded switch is refused loudly rather than ignored silently.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .config import EngineConfig
from .errors import ConfigError

_current = EngineConfig()
_RETIRED = {"MOEFIT_EXPERT_MATMUL": "expert_matmul", "MOEFIT_NF4_GEMM_VARIANT": "nf4_gemm_variant",
            "MOEFIT_NF4_DECODER": "nf4_decoder", "MOEFIT_RECOMPUTE_SKIP": "recompute_skip"}


def current() -> EngineConfig:
    return _current


def use(engine: EngineConfig) -> EngineConfig:
    """Make `engine` the settings of this process; returns the previous ones."""
    global _current
    for var, key in _RETIRED.items():
        if var in os.environ:
            raise ConfigError(f"the environment variable {var} is no longer read: set engine.{key} in the run "
                              f"config (moefit train --set engine.{key}=VALUE, moefit bench --engine {key}=VALUE) "
                              f"so that the run records it, and unset {var}.")
    previous, _current = _current, engine
    return previous


def parse(items: list[str]) -> EngineConfig:
    """`["expert_matmul=fused", ...]` (moefit bench --engine) -> EngineConfig, validated like the run config."""
    from .config import config_from_dict

    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--engine {item!r}: expected KEY=VALUE, e.g. --engine expert_matmul=fused "
                              f"(keys: {', '.join(f.name for f in dataclasses.fields(EngineConfig))}).")
        values[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
    return config_from_dict({"engine": values}, "--engine").engine

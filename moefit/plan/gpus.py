"""The GPU catalogue (gpus.json) and the price table (prices.json), both shipped as data."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Gpu:
    name: str
    label: str
    memory_bytes: int
    bf16_tflops: float | None  # None: unknown (a GPU seen at run time that is not in the catalogue)
    bandwidth_gbs: float | None
    interconnect_gbs: float | None
    usd_per_hour: float | None
    price_source: str | None = None


@lru_cache(maxsize=1)
def _catalogue() -> tuple[dict, dict]:
    gpus = json.loads((HERE / "gpus.json").read_text(encoding="utf-8"))["gpus"]
    prices = json.loads((HERE / "prices.json").read_text(encoding="utf-8"))["prices"]
    return gpus, prices


def gpu_names() -> list[str]:
    return list(_catalogue()[0])


def is_gpu_name(name: str) -> bool:
    """A catalogue GPU's short name or alias."""
    return _canonical(name) is not None


def _canonical(name: str) -> str | None:
    gpus, _ = _catalogue()
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key in gpus:
        return key
    for canon, spec in gpus.items():
        if key in spec.get("aliases", []):
            return canon
    return None


def get_gpu(name: str, price_override: float | None = None) -> Gpu:
    """A catalogue GPU by short name or alias (h100-80gb, h100, h200, a100-40gb, l40s, rtx4090, ...)."""
    gpus, prices = _catalogue()
    canon = _canonical(name)
    if canon is None:
        close = difflib.get_close_matches(name.lower(), list(gpus), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown GPU {name!r}.{hint} Known: {', '.join(gpus)}.")
    spec, price = gpus[canon], prices.get(canon, {})
    usd = price_override if price_override is not None else price.get("usd_per_hour")
    src = "plan.price_per_gpu_hour" if price_override is not None else (
        f"{price.get('provider')}, {price.get('date')}" if price.get("usd_per_hour") is not None else None)
    return Gpu(canon, spec["label"], spec["memory_mib"] << 20, spec["bf16_tflops"], spec["bandwidth_gbs"],
               spec["interconnect_gbs"], usd, src)


def gpu_from_memory(memory_bytes: int, name: str | None = None, price_override: float | None = None) -> Gpu:
    """The GPU the trainer sees: its catalogue entry when `name` matches one, with the measured memory."""
    canon = _canonical(name) if name else None
    if canon:
        g = get_gpu(canon, price_override)
        return Gpu(g.name, g.label, memory_bytes, g.bf16_tflops, g.bandwidth_gbs, g.interconnect_gbs,
                   g.usd_per_hour, g.price_source)
    label = name or "this GPU"
    return Gpu(label, label, memory_bytes, None, None, None, price_override,
               "plan.price_per_gpu_hour" if price_override is not None else None)


def match_device_name(device_name: str) -> str | None:
    """Catalogue name for a CUDA device name ('NVIDIA H100 80GB HBM3' -> 'h100-80gb'), or None."""
    d = device_name.lower()
    table = [("h200", "h200"), ("h100 nvl", "h100-94gb"), ("h100", "h100-80gb"), ("a100", None),
             ("l40s", "l40s"), ("4090", "rtx4090")]
    for needle, canon in table:
        if needle in d:
            if needle == "a100":
                return "a100-40gb" if "40gb" in d else "a100-80gb"
            return canon
    return None

"""Load the planner's empirical constants (calibration.json beside this file)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

CALIBRATION_PATH = Path(__file__).resolve().parent / "calibration.json"


@lru_cache(maxsize=4)
def load_calibration(path: str | None = None) -> dict[str, Any]:
    """The calibration as a dict with sections `memory` and `time` (keys starting with '_' are comments)."""
    p = Path(path) if path else CALIBRATION_PATH
    data = json.loads(p.read_text(encoding="utf-8"))
    for section in ("memory", "time"):
        data[section] = {k: v for k, v in data[section].items() if not k.startswith("_")}
    return data

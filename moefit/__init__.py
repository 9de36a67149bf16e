"""moefit: QLoRA fine-tuning of very large Mixture-of-Experts LLMs on the fewest GPUs.

Python API (the engine the CLI drives)::

    model = moefit.load_model("meta-llama/Llama-4-Scout-17B-16E-Instruct", quantization="nf4")
    moefit.add_lora(model, r=32, alpha=64, targets=["q", "k", "v", "o", "gate", "up", "down"], expert_r=16)
    moefit.train("recipes/llama4-scout-qlora.yaml")
    moefit.export("runs/…", out="merged/", merge=True)
    moefit.plan(model="llama4-scout", gpus=["h100-80gb"])

Heavy modules (torch, transformers) are imported on first use so `moefit --help` stays fast. Importing moefit
changes no process-wide state (environment, logging, matplotlib); see moefit.cli for what the command line sets.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("moefit.models", "load_model"),
    "load": ("moefit.models", "load"),
    "add_lora": ("moefit.lora", "add_lora"),
    "train": ("moefit.train", "train"),
    "export": ("moefit.export", "export"),
    "plan": ("moefit.plan", "plan"),
    "load_config": ("moefit.config", "load_config"),
    "MoefitError": ("moefit.errors", "MoefitError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        if module == f"moefit.{name}":  # a subpackage whose module object is itself callable (see _callable)
            return importlib.import_module(module)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moefit' has no attribute {name!r}")

"""Files the package ships: the tiny Llama 4 MoE base model, its tokenizer, the chat data set.

Built by `scripts/build_tiny.py` (reproducible); see assets/README.md.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def tiny_model_dir() -> Path:
    """HF checkpoint (config.json + model.safetensors + tokenizer files) of the embedded tiny model."""
    return ASSETS / "tiny"


def chat_train_path() -> Path:
    return ASSETS / "data" / "chat_train.jsonl"


def chat_eval_path() -> Path:
    return ASSETS / "data" / "chat_eval.jsonl"

"""The floating-point dtypes moefit computes in, by the names a user writes (config `train.precision: bf16`,
`lora.dtype: float32`, `moefit export --dtype`, adapter_config.json). torch is imported on first use: the planner
reads these names without it. (The safetensors dtype codes, "BF16" and friends, are another fact: moefit.safetensors_io.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # torch's names, as adapter_config.json records them
# every accepted name -> torch's name (train.precision uses the short ones)
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "float32": "float32", "fp32": "float32"}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, DTYPE_NAMES[dtype])
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}") from None

"""Device choice: `auto` means the GPU when CUDA is available, else the CPU (train.device, `moefit eval`,
`moefit generate`). One copy, so that every command means the same by it."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when CUDA is available, else cpu; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

"""Device choice: `auto` means the GPU when CUDA is available, else the CPU (train.device, `moefit eval`,
`moefit generate`); which GPU a device name means; a host-to-GPU copy that does not wait; whether a tensor's work
is being captured into a CUDA graph. One copy, so that every command means the same by it."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when CUDA is available, else cpu; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cuda_index(device: str | torch.device) -> int:
    """The GPU index of "cuda" or "cuda:N" (the current GPU for a bare "cuda"; APIs such as
    set_per_process_memory_fraction want an index and refuse "cuda")."""
    index = (device if isinstance(device, torch.device) else torch.device(device)).index  # (no new object per call)
    return torch.cuda.current_device() if index is None else index


def copy_without_waiting(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from host memory to a GPU through pinned memory, so the copy is queued and the host does
    not wait for the work queued before it (from pageable memory the driver may sync the stream first: CUDA's
    "API synchronization behavior")."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def in_graph_capture(t: torch.Tensor) -> bool:
    """Whether work on `t` is being captured into a CUDA graph now (models.layer_graphs). A cache of device tensors
    must then neither hand out nor keep a tensor: the graph reads it at its address on every replay, after the
    cache has let it go and the allocator has given the memory to something else."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()

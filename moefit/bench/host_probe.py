"""How fast this machine's host issues small tensor ops: a number to put next to every step-time record.

At micro-batch 1 the step is paced by the host issuing ~700 kernels per MoE layer and pass, and the same
configuration ran 1.55x apart on two H200 machines (benchmarks/speed_targets.md). Recorded with each measurement
(moefit.bench.measure.measure_training), it lets a later fit put records of different hosts on one scale.
"""

from __future__ import annotations

import time

import torch


def host_op_seconds(device: str | torch.device = "cpu", ops: int = 2000, repeats: int = 5) -> float:
    """Seconds of host time per small op (an in-place add of two 256-element tensors on `device`): the best of
    `repeats` timings of `ops` ops. On a GPU the ops are only issued (no sync inside the timing), so this is the
    launch path (Python, the dispatcher, the CUDA launch), not the GPU's work."""
    dev = torch.device(device)
    a = torch.zeros(256, device=dev)
    b = torch.ones(256, device=dev)
    cuda = dev.type == "cuda"
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(ops):
            a.add_(b)
        best = min(best, (time.perf_counter() - t0) / ops)
        if cuda:
            torch.cuda.synchronize(dev)
    return best

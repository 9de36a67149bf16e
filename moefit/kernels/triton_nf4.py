"""NF4 -> bf16/fp16/fp32 decoding as one Triton kernel (CUDA only).

Each packed byte is read once, both codes go through bitsandbytes' 16-entry table (written as a tree of selects,
not a memory lookup) and are scaled by the block's absmax: the same arithmetic as bitsandbytes (fp32 code x fp32
absmax, then the cast), bit-identical output (tests/test_gpu.py; tests/test_nf4_grouped_mm.py in the interpreter).

Opt-in (`engine.nf4_decoder: triton`): on an H200 it decodes a Scout expert bank in 0.762 ms against
bitsandbytes' 0.750 ms (2.24 TB/s, 53 % of the copy rate; benchmarks/expert_matmul.md), and the full-depth seed
recipe step at seq 2048 took 1.433 s against 1.215 s with bitsandbytes
(benchmarks/raw/step_ab_skip_recompute*_h200.json). It shares its NF4 table with the fused grouped GEMM.
"""

from __future__ import annotations

import functools

import torch

from .. import engine_switches
from . import triton_importable


def available() -> bool:
    if engine_switches.current().nf4_decoder != "triton" or not torch.cuda.is_available():
        return False
    return triton_importable()


@functools.cache
def _kernel():
    from ._nf4_gemm_kernels import nf4_decode

    return nf4_decode


def decode(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: list[int],
           dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """packed: uint8, numel/2 bytes; absmax: fp32, one per `blocksize` values; returns `shape` in `dtype` (written
    into `out`, contiguous, when given)."""
    n_bytes = packed.numel()
    out = torch.empty(shape, dtype=dtype, device=packed.device) if out is None else out
    block = 1024
    grid = (triton_cdiv(n_bytes, block),)
    _kernel()[grid](packed.reshape(-1), absmax.reshape(-1).contiguous(), code, out, n_bytes,
                    BYTES_PER_BLOCK=blocksize // 2, BLOCK=block)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

"""NF4 -> bf16/fp16/fp32 decoding as one Triton kernel (CUDA only).

bitsandbytes' kernel decodes a Scout expert bank at 1.94 TB/s (NF4 read + bf16 write) on an H200, 46 % of the
card's copy rate, and decoding runs three times per micro-step over every frozen weight. This kernel reads each
packed byte once, looks both codes up in the 16-entry table, scales by the block's absmax and writes the pair: the
same arithmetic as bitsandbytes (fp32 code x fp32 absmax, then the cast), bit-identical output (tests/test_gpu.py).

Opt-in (`MOEFIT_NF4_DECODER=triton`): on full-depth Scout it changed the step by -1 % at seq 2048 and +2.5 % at
4096 (benchmarks/decoder_ab.sh, recorded in benchmarks/raw/bench_decoder_*_h200.json), because the step is
host-bound at these sizes; it is the starting point for decoding inside the grouped GEMM.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def available() -> bool:
    if os.environ.get("MOEFIT_NF4_DECODER", "bnb") != "triton" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_decode(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, BYTES_PER_BLOCK: tl.constexpr,
                   BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + offs // BYTES_PER_BLOCK, mask=mask, other=0.0)
        hi = tl.load(code_ptr + ((b >> 4) & 15)) * scale  # first value of the pair sits in the high nibble
        lo = tl.load(code_ptr + (b & 15)) * scale
        pair = tl.reshape(tl.join(hi, lo), [2 * BLOCK])
        out_offs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offs, pair.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)

    return nf4_decode


def decode(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: list[int],
           dtype: torch.dtype) -> torch.Tensor:
    """packed: uint8, numel/2 bytes; absmax: fp32, one per `blocksize` values; returns `shape` in `dtype`."""
    n_bytes = packed.numel()
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    block = 1024
    grid = (triton_cdiv(n_bytes, block),)
    _kernel()[grid](packed.reshape(-1), absmax.reshape(-1).contiguous(), code, out, n_bytes,
                    BYTES_PER_BLOCK=blocksize // 2, BLOCK=block)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

"""NF4 -> bf16/fp16/fp32 decoding as one Triton kernel (CUDA only).

Each packed byte is read once, both codes go through bitsandbytes' 16-entry table and are scaled by the block's
absmax: the same arithmetic as bitsandbytes (fp32 code x fp32 absmax, then the cast), bit-identical output
(tests/test_gpu.py; tests/test_nf4_grouped_mm.py in the interpreter). The table is read through a tree of selects
(`engine.nf4_decoder: triton`), a load from the table (`triton-load`) or a register gather (`triton-gather`).

The engine's default decoder (`triton-load`) since 2026-11-30: on an H200 the table load decodes a Scout expert
bank in 0.420 ms against bitsandbytes' 0.754 ms (96 % of the copy rate; the select tree, ~20 operations per value,
0.629 ms), double-quantized scales included, in one launch where bitsandbytes takes three; the seed recipe's step
ran 2,533 tokens/s against 2,147 with bitsandbytes in the same call (benchmarks/nf4_decode_variants.md,
benchmarks/speed_targets.md). At micro-batch 1 the host sets the pace, so host time per call counts as much as GPU
time: the launch shape is autotuned once per size and then launched directly (25-30 us of host per call).
"""

from __future__ import annotations

import functools
import threading

import torch

from .. import engine_switches
from . import triton_importable


def available() -> bool:
    if not engine_switches.current().nf4_decoder.startswith("triton") or not torch.cuda.is_available():
        return False
    return triton_importable()


@functools.cache
def _kernel(autotuned: bool = False):
    from ._nf4_gemm_kernels import nf4_decode, nf4_decode_autotuned

    return nf4_decode_autotuned if autotuned else nf4_decode


# The plain decoder's lookup of the NF4 table (_nf4_gemm_kernels.nf4_decode's LOOKUP, its `decode`'s DECODE); the
# variants and launch shapes are measured against each other and bitsandbytes by benchmarks/nf4_decode_variants.py.
LOOKUPS = {"select": 1, "load": 0, "gather": 2}
DEFAULT_LOOKUP = "select"


def lookup_of(nf4_decoder: str) -> str:
    """The lookup an `engine.nf4_decoder` value selects: triton (the select tree), triton-load, triton-gather."""
    _, _, lookup = nf4_decoder.partition("-")
    return lookup or DEFAULT_LOOKUP


def decode(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: list[int],
           dtype: torch.dtype, out: torch.Tensor | None = None, lookup: str = DEFAULT_LOOKUP,
           block: int | None = None, warps: int | None = None,
           double_quant: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """packed: uint8, numel/2 bytes; absmax: [E', nblocks], one scale per `blocksize` values, fp32, or uint8 codes
    when `double_quant` = (absmax2 [E', nblocks2] fp32, offset [E'] fp32, code2 [256] fp32) gives their second
    level (decoded inside the kernel: one launch instead of three); returns `shape` in `dtype` (written into `out`,
    contiguous, when given). `lookup`: how the NF4 table is read. `block` (packed bytes per program, a power of two
    that is a multiple of blocksize / 2) and `warps`: the launch shape; both None (the default): the fastest of
    _nf4_gemm_kernels.DECODE_BLOCKS x DECODE_WARPS, timed by Triton on the first call of each size."""
    if lookup not in LOOKUPS:
        raise ValueError(f"NF4 decoder lookup must be one of {sorted(LOOKUPS)}, got {lookup!r}")
    if (block is None) != (warps is None):
        raise ValueError("give both block and warps (a launch shape), or neither (autotuned)")
    n_bytes = packed.numel()
    out = torch.empty(shape, dtype=dtype, device=packed.device) if out is None else out
    if double_quant is None:
        absmax2 = offset = code2 = absmax  # not read (DOUBLE_QUANT 0)
        nblocks2 = 1
    else:
        absmax2, offset, code2 = double_quant
        nblocks2 = absmax2.shape[-1]
    args = (packed.reshape(-1), absmax.reshape(-1), code, out, n_bytes, absmax2, offset, code2, absmax.shape[-1],
            nblocks2)
    # fp fusion off: the scales' multiply and add round as two operations, as bitsandbytes computes them
    consts = {"BYTES_PER_BLOCK": blocksize // 2, "LOOKUP": LOOKUPS[lookup],
              "DOUBLE_QUANT": int(double_quant is not None), "enable_fp_fusion": False}
    if block is None:
        key = (n_bytes, lookup, dtype, double_quant is not None)
        tuned = _launch_shapes.get(key)
        if tuned is None:
            with _tuning:  # the export decodes in threads: one autotuning at a time, its best_config its own
                tuned = _launch_shapes.get(key)
                if tuned is None:  # first call of this size: Triton times the shapes, the winner is kept
                    autotuned = _kernel(autotuned=True)
                    autotuned[lambda meta: (triton_cdiv(n_bytes, meta["BLOCK"]),)](*args, **consts)
                    best = autotuned.best_config
                    _launch_shapes[key] = (best.kwargs["BLOCK"], best.num_warps)
                    return out
        block, warps = tuned
    _kernel()[(triton_cdiv(n_bytes, block),)](*args, BLOCK=block, num_warps=warps, **consts)
    return out


# (packed bytes, lookup, output dtype, double-quantized scales) -> the launch shape Triton's autotuner chose on the
# first call of that size. Later calls launch the plain kernel with it: the autotuner's own dispatch (argument dict,
# key, lookup) is host time on every call, and a seed step at micro-batch 1 is host-bound
# (benchmarks/nf4_decode_variants.md).
_launch_shapes: dict[tuple[int, str, torch.dtype, bool], tuple[int, int]] = {}
_tuning = threading.Lock()


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

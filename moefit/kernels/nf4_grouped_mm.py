"""Grouped matmul that reads the routed experts' weights straight from NF4 (one Triton kernel, CUDA).

Why: with `dequantize -> torch._grouped_mm`, every expert bank is written out in bf16 and read back by the GEMM on
each of the three passes of a checkpointed micro-step (forward, recompute, backward). At Scout's shapes and
~128 routed tokens per expert the GEMM is then memory-bound on the bf16 weight (2 bytes read per weight, after
0.5 read + 2 written by the decoder). This kernel decodes each weight tile in registers right before the MMA, so
a weight costs 0.5 bytes of traffic per pass and the bf16 bank is never materialised (1.3 GiB less at the peak).

Contract (same as `moe.grouped._apply`): rows of `x` are sorted by expert, `offs[e]` is the int32 end row of
expert e; W is stored per expert as [out, in] (NF4, blocks of `blocksize` along `in`, first value of a pair in
the high nibble, fp32 scales `absmax[e, block]`).
  transpose=True : y[n, :] = x[n, :] @ W[e]^T   ([N, in]  -> [N, out]; the forward)
  transpose=False: y[n, :] = x[n, :] @ W[e]     ([N, out] -> [N, in];  dx in the backward)
Each weight is decoded as bitsandbytes does (fp32 code x fp32 absmax, then the cast to x's dtype), so the result
equals `dequantize()` followed by a bf16 GEMM with fp32 accumulation, up to summation order.

The grid has one program per (row tile of one expert, output column tile); row tiles are laid out expert after
expert on the device (no host sync), and programs past the last tile exit at once.

Status: correct (CPU interpreter and H200 tests) but slower than dequantize + torch._grouped_mm on the H200
(best variant "select-join": 1.62-1.90 ms per Scout bank against 1.37 ms; benchmarks/expert_matmul.md): decoding
NF4 costs ~20 ALU operations per weight, and at ~128 rows per expert each decoded weight feeds only 256 FLOP of
MMA. Hence opt-in. `VARIANTS` name the NF4 decode (select tree / memory lookup) and the weight-tile load
(byte loaded once and nibbles interleaved / each element loading its byte).
"""

from __future__ import annotations

import functools
import typing

import torch

from .. import engine_switches
from ..config import EngineConfig, NF4GemmVariant
from . import triton_importable


def enabled() -> bool:
    """Opt-in (`engine.expert_matmul: fused`) while it is slower than dequantize + torch._grouped_mm on the H200
    (benchmarks/expert_matmul.md)."""
    if engine_switches.current().expert_matmul != "fused":
        return False
    return triton_importable()


def supported(x: torch.Tensor, out_features: int, in_features: int, blocksize: int, transpose: bool) -> bool:
    """Shapes the kernel handles without masks on the weight: tile-aligned widths, whole blocks per tile."""
    k = in_features if transpose else out_features
    n = out_features if transpose else in_features
    return (x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2 and blocksize == 64
            and k % 64 == 0 and n % 64 == 0 and x.shape[1] == k)


# NF4 decode (lut: memory lookup, select: select tree, shfl: register table + tl.gather) - weight-tile layout
# (join: nibbles interleaved, gather: each element loads its byte, split: even/odd columns kept as two tiles).
VARIANTS = typing.get_args(NF4GemmVariant)  # engine.nf4_gemm_variant
_DECODE = {"lut": 0, "select": 1, "shfl": 2}
DEFAULT_VARIANT = EngineConfig().nf4_gemm_variant


@functools.cache
def _kernel(layout: str = "join"):
    """The autotuned kernel for a weight-tile layout ("split" has its own kernel; "join"/"gather" share one)."""
    from ._nf4_gemm_kernels import nf4_grouped_mm, nf4_grouped_mm_split

    return nf4_grouped_mm_split if layout == "split" else nf4_grouped_mm


def nf4_grouped_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                       offs: torch.Tensor, slice_shape: tuple[int, int], blocksize: int, transpose: bool,
                       variant: str | None = None) -> torch.Tensor:
    """x [N, K] sorted by expert; packed uint8 [E, out*in/2]; absmax fp32 [E, out*in/blocksize]; offs int32 [E]
    end rows; slice_shape (out, in). Returns [N, out] (transpose) or [N, in]."""
    import triton

    out_features, in_features = slice_shape
    experts = packed.shape[0]
    k, n_out = (in_features, out_features) if transpose else (out_features, in_features)
    x = x.contiguous()
    out = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out

    def grid(meta):
        return (triton.cdiv(x.shape[0], meta["BM"]) + experts, triton.cdiv(n_out, meta["BN"]))

    decode, layout = (variant or engine_switches.current().nf4_gemm_variant).split("-")
    args = (x, packed, absmax.contiguous(), code, offs, out, n_out, k, in_features, x.stride(0), out.stride(0))
    if layout == "split":
        _kernel("split")[grid](*args, E=experts, TRANSPOSE=transpose, BLOCKSIZE=blocksize, DECODE=_DECODE[decode])
    else:
        _kernel()[grid](*args, E=experts, TRANSPOSE=transpose, BLOCKSIZE=blocksize, DECODE=_DECODE[decode],
                        JOIN=layout == "join")
    return out

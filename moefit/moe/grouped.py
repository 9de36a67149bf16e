"""Matmuls over tokens sorted by expert: x[offs[e-1]:offs[e]] @ W[e] for every expert e.

Two implementations of one contract: `torch._grouped_mm` (one kernel for all experts; CUDA, bf16, SM >= 80) and a
plain per-expert loop (CPU, other dtypes, old GPUs). `grouped_matmul` picks the first that applies; the loop is
also the slow, obviously-correct reference the tests compare against.

`frozen_expert_matmul` multiplies by a quantized weight without ever saving its dequantized copy for backward:
the backward pass dequantizes again (the DESIGN's "save inputs, recompute dequantized weights").
"""

from __future__ import annotations

import torch

from .. import engine_switches
from ..quant.nf4 import FrozenWeight, NF4Weight

_GROUPED_MM = getattr(torch, "_grouped_mm", None)

# Run the CUDA path (one decode per bank, torch._grouped_mm) on CPU bf16 tensors too; torch >= 2.9 has a CPU
# kernel for it. Only for measuring that path's host work on a machine without a GPU
# (benchmarks/host_overhead.py): on CPU the per-expert loop is faster and is the reference.
GROUPED_ON_CPU = False


def _grouped_device(x: torch.Tensor) -> bool:
    return x.is_cuda or (GROUPED_ON_CPU and x.device.type == "cpu")


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor, aligned: bool = True) -> bool:
    """Whether torch._grouped_mm runs x @ w; `aligned=False`: once the widths are padded to multiples of 8."""
    if _GROUPED_MM is None or not _grouped_device(x) or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 8:
        return False
    # 16-byte alignment of the contraction and output widths (kernel requirement).
    return not aligned or (x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0)


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


class ExpertGroups:
    """How routed rows are grouped: `counts[e]` rows for expert e, their int32 end offsets (for the grouped
    kernel, computed once per MoE layer), lazily the counts as Python ints (for the per-expert loop), and
    `row_expert`, each row's expert (for per-expert biases), when the caller has it."""

    def __init__(self, counts: torch.Tensor, counts_cpu: list[int] | None = None,
                 row_expert: torch.Tensor | None = None):
        self.counts = counts
        self.offs = offsets_from_counts(counts)
        self._cpu = counts_cpu
        self.row_expert = row_expert

    @property
    def sizes(self) -> list[int]:
        if self._cpu is None:
            self._cpu = self.counts.tolist()
        return self._cpu


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
    """x: [N, K] rows sorted by expert; w: [E, K, M]. Returns [N, M]. Differentiable in x and w.

    Widths that are not multiples of 8 (a LoRA rank of 4 on 128 experts) are padded with zeros for the grouped
    kernel rather than sent to the per-expert loop: on Qwen3-30B-A3B the loop made a step ten times slower."""
    if grouped_mm_supported(x, w, aligned=False):
        pad_k, pad_m = -x.shape[-1] % 8, -w.shape[-1] % 8
        if pad_k or pad_m:
            m = w.shape[-1]
            x = torch.nn.functional.pad(x, (0, pad_k)) if pad_k else x
            w = torch.nn.functional.pad(w, (0, pad_m, 0, pad_k))
            return _GroupedMM.apply(x, w, groups.offs)[:, :m]
        return _GroupedMM.apply(x, w, groups.offs)
    return loop_grouped_matmul(x, w, groups.sizes)


class _GroupedMM(torch.autograd.Function):
    """`torch._grouped_mm` with an explicit backward: the kernel rejects broadcast (zero-stride) gradients, and
    the weight gradient is itself one grouped GEMM (x_e^T @ dy_e for every expert e)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor):
        ctx.save_for_backward(x, w, offs)
        return _GROUPED_MM(x, w, offs=offs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = _GROUPED_MM(grad_out, w.transpose(-2, -1), offs=offs) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _GROUPED_MM(x.t(), grad_out, offs=offs)
            empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0  # experts that got no token: exactly zero
            grad_w.masked_fill_(empty[:, None, None], 0)  # (no host sync, unlike boolean indexing)
        return grad_x, grad_w, None


def loop_grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            outs.append(x[start:start + n] @ w[e])
        start += n
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[-1])
    return torch.cat(outs, 0)


class _FrozenExpertMatmul(torch.autograd.Function):
    """y = x @ W_e^T per expert, W stored quantized as [E, out, in]; backward re-dequantizes for dx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight | FrozenWeight, groups: ExpertGroups):
        ctx.weight = weight
        ctx.groups = groups
        return _apply(x, weight, groups, transpose=True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _apply(grad_out, ctx.weight, ctx.groups, transpose=False)
        return grad_x, None, None


def _padded_for_large_tiles(x: torch.Tensor, experts: int) -> torch.Tensor:
    """torch._grouped_mm picks 64-row tiles when rows / experts <= 128 and 128 x 256 tiles above; with ~128 routed
    rows per expert, the experts just over 128 rows then get a third, nearly empty tile. A few zero rows after the
    last offset (they belong to no expert; their output rows are dropped) select the large tiles: 0.62 -> 0.47 ms
    per Scout expert bank on an H200 (benchmarks/expert_matmul.md). Only when that costs at most 1/8 more rows."""
    pad = 129 * experts - x.shape[0]
    if pad <= 0 or pad * 8 > x.shape[0]:
        return x
    return torch.cat([x, x.new_zeros(pad, x.shape[1])])


def _fused_kernel():
    """moefit.kernels.nf4_grouped_mm when `engine.expert_matmul: fused` selects it and Triton can run, else None. The
    opt-in Triton kernels are imported here, on first use, never with this module."""
    if engine_switches.current().expert_matmul != "fused":
        return None
    from ..kernels import nf4_grouped_mm

    return nf4_grouped_mm if nf4_grouped_mm.enabled() else None


def _apply(x: torch.Tensor, weight: NF4Weight | FrozenWeight, groups: ExpertGroups, transpose: bool
           ) -> torch.Tensor:
    """transpose=True: x @ W^T ([N, in] -> [N, out]); False: x @ W ([N, out] -> [N, in])."""
    fused = _fused_kernel() if x.is_cuda and isinstance(weight, NF4Weight) else None
    if fused is not None and fused.supported(x, *weight.slice_shape, weight.blocksize, transpose):
        # Decode NF4 inside the GEMM: no bf16 copy of the bank, 0.5 bytes of weight traffic per pass.
        return fused.nf4_grouped_matmul(x, weight.packed, weight.absmax_fp32(), weight.code, groups.offs,
                                                 weight.slice_shape, weight.blocksize, transpose)
    if _grouped_device(x) and _GROUPED_MM is not None and x.dtype == torch.bfloat16:
        w = weight.dequantize(dtype=x.dtype)  # [E, out, in]: one layer's experts, transient
        w = w.transpose(1, 2) if transpose else w
        if grouped_mm_supported(x, w):
            out = _GROUPED_MM(_padded_for_large_tiles(x.contiguous(), w.shape[0]), w, offs=groups.offs)
            del w
            return out[: x.shape[0]]
        return loop_grouped_matmul(x, w, groups.sizes)
    # Per-expert loop: dequantize one expert at a time (lowest memory; CPU and fallback path).
    outs = []
    start = 0
    for e, n in enumerate(groups.sizes):
        if n:
            w = weight.dequantize(expert=e, dtype=x.dtype)
            outs.append(x[start:start + n] @ (w.t() if transpose else w))
        start += n
    if not outs:
        width = weight.slice_shape[0] if transpose else weight.slice_shape[1]
        return x.new_zeros(x.shape[0], width)
    return torch.cat(outs, 0)


class _KnownFrozenExpertMatmul(_FrozenExpertMatmul):
    """The same node as `_FrozenExpertMatmul` (same backward, nothing saved) for a result already known."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight | FrozenWeight, groups: ExpertGroups, result: torch.Tensor):
        ctx.weight = weight
        ctx.groups = groups
        return result

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return *_FrozenExpertMatmul.backward(ctx, grad_out), None


def frozen_expert_matmul(x: torch.Tensor, weight: NF4Weight | FrozenWeight, groups: ExpertGroups,
                         result: torch.Tensor | None = None) -> torch.Tensor:
    """x: [N, in] sorted by expert -> [N, out], with W frozen and stored as [E, out, in]. `result`: x @ W^T already
    computed (kept from a checkpointed layer's first pass); only the autograd node is built."""
    if result is not None:
        return _KnownFrozenExpertMatmul.apply(x, weight, groups, result)
    return _FrozenExpertMatmul.apply(x, weight, groups)


class _FrozenLinear(torch.autograd.Function):
    """y = x @ W^T for a frozen (quantized) W; saves nothing but the weight's handle."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight | FrozenWeight):
        ctx.weight = weight
        w = weight.dequantize(dtype=x.dtype)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.weight.dequantize(dtype=grad_out.dtype)
        return grad_out @ w, None


def frozen_linear(x: torch.Tensor, weight: NF4Weight | FrozenWeight) -> torch.Tensor:
    return _FrozenLinear.apply(x, weight)

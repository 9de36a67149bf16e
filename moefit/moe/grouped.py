"""Matmuls over tokens sorted by expert: x[offs[e-1]:offs[e]] @ W[e] for every expert e.

Two implementations of one contract: `torch._grouped_mm` (one kernel for all experts; CUDA, bf16, SM >= 80) and a
plain per-expert loop (CPU, other dtypes, old GPUs). `grouped_matmul` picks the first that applies; the loop is
also the slow, obviously-correct reference the tests compare against.

`frozen_expert_matmul` multiplies by a quantized weight without ever saving its dequantized copy for backward:
the backward pass dequantizes again (the DESIGN's "save inputs, recompute dequantized weights").
"""

from __future__ import annotations

import functools

import torch

from .. import engine_switches
from ..devices import cuda_index
from ..lora_scale import exact_scale
from ..quant.nf4 import FrozenWeight, NF4Weight

_GROUPED_MM = getattr(torch, "_grouped_mm", None)

# Run the CUDA path (one decode per bank, torch._grouped_mm) on CPU bf16 tensors too; torch >= 2.9 has a CPU
# kernel for it. Only for measuring that path's host work on a machine without a GPU
# (benchmarks/host_overhead.py sets it): on CPU the per-expert loop is faster and is the reference.
GROUPED_ON_CPU = False


def _grouped_device(x: torch.Tensor) -> bool:
    return x.is_cuda or (GROUPED_ON_CPU and x.device.type == "cpu")


@functools.cache
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor, aligned: bool = True) -> bool:
    """Whether torch._grouped_mm runs x @ w; `aligned=False`: once the widths are padded to multiples of 8."""
    if _GROUPED_MM is None or not _grouped_device(x) or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    # The capability is cached per device: get_device_capability costs microseconds of Python per call, and this
    # runs for every grouped matmul of every pass.
    if x.is_cuda and _sm_major(cuda_index(x.device)) < 8:
        return False
    # 16-byte alignment of the contraction and output widths (kernel requirement).
    return not aligned or (x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0)


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


_EXPERT_IDS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _expert_ids(num_experts: int, device: torch.device) -> torch.Tensor:
    """arange(num_experts) on `device`, made once (the boundaries searchsorted turns into offsets)."""
    key = (device, num_experts)
    ids = _EXPERT_IDS.get(key)
    if ids is None:
        ids = _EXPERT_IDS[key] = torch.arange(num_experts, device=device)
    return ids


class ExpertGroups:
    """How routed rows are grouped: `counts[e]` rows for expert e, their int32 end offsets `offs` (for the grouped
    kernel), lazily the counts as Python ints (for the per-expert loop) and which experts got no row (`empty`, for
    the weight gradients), and `row_expert`, each row's expert (for per-expert biases), when the caller has it.
    Everything is computed once per MoE layer and pass and shared by all of the layer's expert matmuls."""

    def __init__(self, counts: torch.Tensor | None = None, counts_cpu: list[int] | None = None,
                 row_expert: torch.Tensor | None = None, *, offs: torch.Tensor | None = None):
        if counts is None and offs is None:
            raise ValueError("ExpertGroups needs counts or offs")
        self._counts = counts
        self.offs = offsets_from_counts(counts) if offs is None else offs
        self._cpu = counts_cpu
        self._empty: torch.Tensor | None = None
        self.row_expert = row_expert

    @classmethod
    def from_sorted(cls, row_expert: torch.Tensor, num_experts: int) -> ExpertGroups:
        """From each row's expert, sorted: the end offsets in one kernel (searchsorted), no counting pass."""
        offs = torch.searchsorted(row_expert, _expert_ids(num_experts, row_expert.device), right=True,
                                  out_int32=True)
        return cls(offs=offs, row_expert=row_expert)

    @property
    def counts(self) -> torch.Tensor:
        """Rows per expert (int64)."""
        if self._counts is None:
            self._counts = torch.diff(self.offs, prepend=self.offs.new_zeros(1)).long()
        return self._counts

    @property
    def sizes(self) -> list[int]:
        if self._cpu is None:
            self._cpu = self.counts.tolist()
        return self._cpu

    @property
    def empty(self) -> torch.Tensor:
        """bool [E, 1, 1]: the experts that got no row, whose weight gradients must be exactly zero (the grouped
        kernel leaves their slice unwritten)."""
        if self._empty is None:
            self._empty = (self.counts == 0)[:, None, None]
        return self._empty


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
            return _GroupedMM.apply(x, w, groups)[:, :m]
        return _GroupedMM.apply(x, w, groups)
    return loop_grouped_matmul(x, w, groups.sizes)


class _GroupedMM(torch.autograd.Function):
    """`torch._grouped_mm` with an explicit backward: the kernel rejects broadcast (zero-stride) gradients, and
    the weight gradient is itself one grouped GEMM (x_e^T @ dy_e for every expert e). The groups stay on ctx (not
    saved tensors: nothing for checkpointing to pack and unpack)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, groups: ExpertGroups):
        ctx.save_for_backward(x, w)
        ctx.groups = groups
        return _GROUPED_MM(x, w, offs=groups.offs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        offs = ctx.groups.offs
        grad_out = grad_out.contiguous()
        grad_x = _GROUPED_MM(grad_out, w.transpose(-2, -1), offs=offs) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _GROUPED_MM(x.t(), grad_out, offs=offs).masked_fill_(ctx.groups.empty, 0)
        return grad_x, grad_w, None


def grouped_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, groups: ExpertGroups
                 ) -> torch.Tensor:
    """The routed experts' LoRA delta on rows sorted by expert: (x @ A_e) * scale @ B_e for every expert e; a
    [E, in, r], b [E, r, out], cast to x's dtype. On the grouped kernel one autograd node does it all
    (`_GroupedLoRA`); elsewhere two grouped matmuls (the per-expert loop: CPU, fp32, old GPUs)."""
    if grouped_mm_supported(x, x) and b.shape[-1] % 8 == 0:  # (x stands in for the copies of A and B in its dtype)
        return _GroupedLoRA.apply(x, a, b, scale, groups)
    h = grouped_matmul(x, a.to(x.dtype), groups) * scale  # scale the rank-r activation
    return grouped_matmul(h, b.to(x.dtype), groups)


def _cast_padded(w: torch.Tensor, dtype: torch.dtype, dim: int, width: int, scale: float | None = None
                 ) -> torch.Tensor:
    """`w` (times `scale`, in the same kernel) in `dtype`, zero-padded along `dim` (1 or 2 of [E, ., .]) to
    `width`."""
    pad = width - w.shape[dim]
    if not pad:
        return cast_copy(w, dtype, scale)
    out = w.new_zeros((*w.shape[:dim], width, *w.shape[dim + 1:]), dtype=dtype)
    part = out[:, :w.shape[1]] if dim == 1 else out[..., :w.shape[2]]
    if scale is None:
        part.copy_(w)
    else:
        torch.mul(w, scale, out=part)
    return out


def cast_copy(w: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """`w` in `dtype`, times `scale` when given: one kernel either way (the multiply writes the cast)."""
    if scale is None:
        return w.to(dtype)
    return torch.mul(w, scale, out=torch.empty(w.shape, dtype=dtype, device=w.device))


class _GroupedLoRA(torch.autograd.Function):
    """y = ((x @ A_e) * scale) @ B_e per expert with two grouped GEMMs, and its backward with four, as one autograd
    node: what two `_GroupedMM`s with casts, pads, slices and a scaling did with a dozen nodes, the same
    arithmetic. A rank that is not a multiple of 8 is padded once, to the kernel's alignment, in the bf16 copies of
    A (columns) and B (rows): the padded columns of x @ A are exactly zero, so the rank-r activation keeps its
    padded width from one GEMM to the next instead of being sliced and padded again. A power-of-two scale (exact)
    is multiplied into B's copy as it is cast, and into B's gradient as it is cast back: no kernel of its own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, groups: ExpertGroups):
        r = a.shape[-1]
        rp = r + (-r % 8)
        fold = exact_scale(scale)
        a16 = _cast_padded(a, x.dtype, 2, rp)  # [E, in, rp]
        b16 = _cast_padded(b, x.dtype, 1, rp, scale if fold else None)  # [E, rp, out]
        h = _GROUPED_MM(x, a16, offs=groups.offs)  # [N, rp]
        if not fold:
            h.mul_(scale)
        ctx.save_for_backward(x, h, a16, b16)
        ctx.groups, ctx.scale, ctx.fold, ctx.r, ctx.dtypes = groups, scale, fold, r, (a.dtype, b.dtype)
        return _GROUPED_MM(h, b16, offs=groups.offs)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, h, a16, b16 = ctx.saved_tensors
        groups, r = ctx.groups, ctx.r
        offs = groups.offs
        grad_y = grad_y.contiguous()
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = _GROUPED_MM(h.t(), grad_y, offs=offs).masked_fill_(groups.empty, 0)[:, :r]
            grad_b = cast_copy(grad_b, ctx.dtypes[1], ctx.scale if ctx.fold else None)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_h = _GROUPED_MM(grad_y, b16.transpose(-2, -1), offs=offs)  # [N, rp]
            if not ctx.fold:
                grad_h.mul_(ctx.scale)
            if ctx.needs_input_grad[1]:
                grad_a = _GROUPED_MM(x.t(), grad_h, offs=offs).masked_fill_(groups.empty, 0)[..., :r] \
                    .to(ctx.dtypes[0])
            if ctx.needs_input_grad[0]:
                grad_x = _GROUPED_MM(grad_h, a16.transpose(-2, -1), offs=offs)
        return grad_x, grad_a, grad_b, None, None


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
    """y = x @ W^T for a frozen (quantized) W; saves nothing but the weight's handle. `skip`: zeros instead of y (a
    recomputation that throws y away, moe.recompute), the backward unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight | FrozenWeight, skip: bool = False):
        ctx.weight = weight
        if skip:
            return x.new_zeros(*x.shape[:-1], weight.shape[0])
        w = weight.dequantize(dtype=x.dtype)
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = ctx.weight.dequantize(dtype=grad_out.dtype)
        return grad_out @ w, None, None


def frozen_linear(x: torch.Tensor, weight: NF4Weight | FrozenWeight, skip: bool = False) -> torch.Tensor:
    return _FrozenLinear.apply(x, weight, skip)

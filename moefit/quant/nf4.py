"""NF4 storage for frozen weights, 2-D (linear) or 3-D (one slice per routed expert).

Quantization and dequantization go through bitsandbytes (`quantize_4bit` / `dequantize_4bit`), which runs on CUDA
and on CPU, so CPU tests exercise the real format. A 3-D weight [E, out, in] is quantized expert by expert: each
expert has its own blocks and double-quantization state, so one expert can be dequantized alone and a loader can
fill experts one at a time without ever holding the bf16 tensor of a whole layer.

Layout: weights are stored as [out, in] (nn.Linear's layout) per expert. The bf16 tensor exists only transiently,
inside `dequantize()`; callers drop it right after the matmul.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from collections.abc import Iterator

import torch
from torch import nn

from .. import engine_switches


def _triton_decoder(device: torch.device, nf4_decoder: str | None = None):
    """moefit.kernels.triton_nf4 when `nf4_decoder` (default: the engine's setting, `triton-load` unless set)
    selects it and it can run on `device` (CUDA), else None (bitsandbytes decodes). The Triton kernels are imported
    here, on first use, never with this module."""
    if device.type != "cuda":
        return None
    return _triton_decoder_for(nf4_decoder or engine_switches.current().nf4_decoder)


@functools.cache
def _triton_decoder_for(nf4_decoder: str):
    """Asked once per setting: every decode asks, and a decode at micro-batch 1 is paid in host time."""
    if not nf4_decoder.startswith("triton") or nf4_decoder in _TRITON_FAILED:
        return None
    from ..kernels import triton_nf4

    return triton_nf4 if triton_nf4.available() else None


def decoder_in_use(device: torch.device | str) -> str:
    """The NF4 decoder this process runs on `device`: engine.nf4_decoder's Triton decoder, or "bnb" (bitsandbytes:
    chosen, on the CPU, without Triton, or after the Triton decoder failed on its first use). Run reports record
    it beside the engine settings."""
    return engine_switches.current().nf4_decoder if _triton_decoder(torch.device(device)) is not None else "bnb"


# Triton decoders that failed on their first use in this process (a GPU or Triton version the kernel does not
# compile for): bitsandbytes decodes instead, said once. A decoder that has run once is not second-guessed: a
# later error (out of memory, a device fault) propagates.
_TRITON_FAILED: set[str] = set()
_TRITON_RAN: set[str] = set()


# Triton compiles a kernel's specialization on its first launch in a process, without a lock of its own: threads
# that launch it together (the merged export's workers) would each compile the same kernel, under one GIL. The
# lock is held for the launch only (queued, not run: the decode runs on the GPU after it is released; the GIL
# serializes launches already). The merged export no longer decodes through it (it asks for bitsandbytes: the same
# bits without the per-process autotuning, benchmarks/export_speed.md, sixteenth session).
_TRITON_LAUNCH = threading.Lock()


def _triton_decode_or_fall_back(name: str, decode):
    """`decode()` through the Triton decoder; on its first use, a failure other than running out of memory
    switches this process to bitsandbytes' decoder (returns None: the caller decodes with bitsandbytes)."""
    with _TRITON_LAUNCH:
        return _first_use_falls_back(name, decode)


def _first_use_falls_back(name: str, decode):
    if name in _TRITON_RAN:
        return decode()
    try:
        out = decode()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # the kernel did not compile or launch here
        _TRITON_FAILED.add(name)
        _triton_decoder_for.cache_clear()
        logging.getLogger(__name__).warning(
            "engine.nf4_decoder=%s could not run on this GPU (%s: %s); NF4 is decoded by bitsandbytes instead "
            "(set engine.nf4_decoder: bnb to skip the attempt).", name, type(e).__name__, str(e)[:200])
        return None
    _TRITON_RAN.add(name)
    return out


def _import_bitsandbytes():
    """bitsandbytes.functional, imported without its warning about optional hub CPU kernels (never needed here):
    the warning's logger is raised to ERROR for the import only and then left as it was."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as functional
    finally:
        log.setLevel(level)
    return functional


bnbF = _import_bitsandbytes()


def _nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    return bnbF.get_4bit_type("nf4", device=device)


# The most values one decode kernel call takes: bitsandbytes indexes them with 32-bit ints (a bank of 128 Maverick
# experts, 5.4e9 values, fails with "invalid argument"), so larger banks are decoded a run of experts at a time.
MAX_DECODE_NUMEL = 2**31 - 2**20
_ALL = slice(None)


def kernel_shape(shape: list[int] | tuple[int, ...], blocksize: int, device: torch.device) -> list[int]:
    """The shape bitsandbytes' dequantize kernel is given for a weight of `shape`; its output is viewed back.

    bitsandbytes 0.50's native CPU kernel (the AVX-512 build) decodes a row whose length is not a whole number of
    blocks with the wrong scales: a [64, 32] weight at blocksize 64 came back with up to 1.6 of error per value
    against its own pure-torch decoder. Rows of whole blocks, or one row holding everything, decode right, so on CPU
    the weight is decoded as such rows. CUDA's kernel takes the shape as it is."""
    if device.type == "cuda":
        return list(shape)
    numel = math.prod(shape)
    return [numel // blocksize, blocksize] if numel % blocksize == 0 else [numel]


@contextlib.contextmanager
def _bitsandbytes_quantize_stream(device: torch.device) -> Iterator[None]:
    """Where bitsandbytes' quantize kernels run, ordered with the caller's stream.

    bitsandbytes 0.50 launches its quantize kernels (`quantize_4bit`, `quantize_blockwise`) on the legacy default
    stream: they take no stream, unlike its dequantize kernels. Torch's side streams do not wait for that stream, nor
    it for them, so a quantization called on a side stream (the export's worker threads each run on one) read its
    input before it was written and wrote garbage (benchmarks/export_speed.md, 2026-11-30: 85 % of the values of an
    8-thread export differed from the 1-thread one). Off the default stream the quantization therefore runs on the
    default stream, after the caller's work, and the caller's stream waits for it."""
    if device.type != "cuda":
        yield
        return
    current, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
    if current == default:
        yield
        return
    default.wait_stream(current)
    try:
        with torch.cuda.stream(default):
            yield
    finally:
        current.wait_stream(default)


def decode_scales(absmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, code2: torch.Tensor
                  ) -> torch.Tensor:
    """Double-quantized block scales -> fp32 [E', nblocks]: code2[u8] * absmax2 + offset, the same arithmetic as
    bitsandbytes' dequantize_blockwise."""
    nblocks = absmax.shape[1]
    if nblocks % 256 == 0:  # second-level blocks never straddle experts: one kernel call
        flat = torch.ops.bitsandbytes.dequantize_blockwise.default(
            absmax.reshape(-1), absmax2.reshape(-1), code2, 256, torch.float32)
        return flat.view(absmax.shape).add_(offset.unsqueeze(1))
    scale2 = absmax2.repeat_interleave(256, dim=1)[:, :nblocks]
    return code2[absmax.long()] * scale2 + offset.unsqueeze(1)


class NF4Weight(nn.Module):
    """A frozen weight in NF4 (optionally double-quantized), shape [out, in] or [E, out, in].

    Buffers (all move with `.to()` and are part of `state_dict`):
      packed   uint8 [E, numel/2]        two 4-bit codes per byte
      absmax   uint8 [E, nblocks] (double quant) or fp32 [E, nblocks]
      absmax2  fp32  [E, nblocks2]       second-level scales (double quant only)
      offset   fp32  [E]                 mean removed before the second level (double quant only)
    E = 1 for a 2-D weight.
    """

    def __init__(self, shape: tuple[int, ...], *, blocksize: int = 64, double_quant: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 scales_fp32: bool = False):
        super().__init__()
        if len(shape) not in (2, 3):
            raise ValueError(f"NF4Weight holds 2-D or 3-D weights, got shape {shape}")
        self.shape = tuple(int(s) for s in shape)
        self.experts = self.shape[0] if len(shape) == 3 else 1
        self.slice_shape = self.shape[-2:]
        self.slice_numel = self.slice_shape[0] * self.slice_shape[1]
        if self.slice_numel % 2:
            raise ValueError(f"NF4 needs an even number of values per slice, got shape {shape}")
        self.blocksize = blocksize
        # scales_fp32: quantized with double quantization (the same values), but its block scales are decoded
        # once, here, and kept in fp32: a decode is then one kernel instead of three (+3.5 bytes per 64 values).
        self.scales_fp32 = scales_fp32 and double_quant
        self.double_quant = double_quant and not self.scales_fp32
        self.dtype = dtype
        nblocks = math.ceil(self.slice_numel / blocksize)
        nblocks2 = math.ceil(nblocks / 256)
        e = self.experts
        self.register_buffer("packed", torch.zeros(e, self.slice_numel // 2, dtype=torch.uint8, device=device))
        if self.double_quant:
            self.register_buffer("absmax", torch.zeros(e, nblocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.zeros(e, nblocks2, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.zeros(e, dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(e, nblocks, dtype=torch.float32, device=device))
        self.register_buffer("code", _nf4_code(device or "cpu"), persistent=False)
        self.register_buffer("code2", bnbF.create_dynamic_map(signed=True).to(device or "cpu"), persistent=False)

    # ------------------------------------------------------------------ filling
    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, expert: int | None = None) -> NF4Weight:
        """Quantize `weight` ([out, in] for one slice, or the full shape) into this storage, on its device."""
        if expert is None and len(self.shape) == 3:
            if tuple(weight.shape) != self.shape:
                raise ValueError(f"expected weight of shape {self.shape}, got {tuple(weight.shape)}")
            for e in range(self.experts):
                self.quantize_(weight[e], expert=e)
            return self
        e = 0 if expert is None else expert
        if tuple(weight.shape) != self.slice_shape:
            raise ValueError(f"expected a slice of shape {self.slice_shape}, got {tuple(weight.shape)}")
        with _bitsandbytes_quantize_stream(self.packed.device):
            w = weight.to(device=self.packed.device, dtype=self.dtype).contiguous()
            packed, state = bnbF.quantize_4bit(w, blocksize=self.blocksize,
                                               compress_statistics=self.double_quant or self.scales_fp32,
                                               quant_type="nf4")
            self.packed[e].copy_(packed.view(-1))
            if self.scales_fp32:
                offset = torch.as_tensor(state.offset, dtype=torch.float32, device=self.packed.device).reshape(1)
                self.absmax[e].copy_(decode_scales(state.absmax.view(1, -1), state.state2.absmax.view(1, -1),
                                                   offset, self.code2).view(-1))
                return self
            self.absmax[e].copy_(state.absmax.view(-1))
            if self.double_quant:
                self.absmax2[e].copy_(state.state2.absmax.view(-1))
                self.offset[e] = state.offset
        return self

    # ------------------------------------------------------------------ reading
    def _state(self, e: int) -> bnbF.QuantState:
        """Expert `e`'s bitsandbytes state; its shape is the one the kernel decodes (`kernel_shape`)."""
        shape = torch.Size(kernel_shape(self.slice_shape, self.blocksize, self.packed.device))
        if self.double_quant:
            state2 = bnbF.QuantState(absmax=self.absmax2[e], code=self.code2, blocksize=256, dtype=torch.float32)
            return bnbF.QuantState(absmax=self.absmax[e], shape=shape, code=self.code,
                                   blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                                   offset=self.offset[e], state2=state2)
        return bnbF.QuantState(absmax=self.absmax[e], shape=shape, code=self.code,
                               blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype)

    def dequantize(self, expert: int | None = None, dtype: torch.dtype | None = None,
                   decoder: str | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: the storage's compute dtype): [out, in], or [E, out, in] when 3-D
        and `expert` is None. The result is a fresh tensor; nothing is cached. `decoder`: an engine.nf4_decoder
        value for this call (default: the engine's); every decoder gives the same bits (tests/test_gpu.py)."""
        dtype = dtype or self.dtype
        if expert is None and self.experts > 1 and self.experts * self.slice_numel > MAX_DECODE_NUMEL \
                and self.slice_numel % self.blocksize == 0:
            # bitsandbytes' kernels index with 32-bit ints: a Maverick bank (128 x 8192 x 5120) is decoded in runs
            # of experts that each stay below that, into one output.
            # Each run is decoded straight into its slice of the output: no second copy of a run (at Maverick's
            # 64 experts per GPU a run is 4 GiB of bf16).
            out = torch.empty(self.shape, dtype=dtype, device=self.packed.device)
            step = max(1, MAX_DECODE_NUMEL // self.slice_numel)
            for start in range(0, self.experts, step):
                stop = min(start + step, self.experts)
                self._decode(slice(start, stop), [stop - start, *self.slice_shape], dtype, out=out[start:stop],
                             decoder=decoder)
            return out
        rows = slice(None) if expert is None else slice(expert, expert + 1)
        if self.slice_numel % self.blocksize == 0:
            return self._decode(rows, list(self.shape if expert is None else self.slice_shape), dtype,
                                decoder=decoder)
        return self._dequantize_by_state(expert, dtype)

    def _decode(self, rows: slice, shape: list[int], dtype: torch.dtype,
                out: torch.Tensor | None = None, decoder: str | None = None) -> torch.Tensor:
        """Experts `rows` in one kernel call (blocks never straddle two experts when a slice is whole blocks);
        into `out` (contiguous, `shape`) when given."""
        whole = rows == _ALL
        packed = self.packed if whole else self.packed[rows]
        name = decoder or engine_switches.current().nf4_decoder
        triton_nf4 = _triton_decoder(self.packed.device, name)
        direct = out is not None and dtype == self.dtype and self.packed.is_cuda  # (.out: CUDA backend only)
        if triton_nf4 is not None:  # double-quantized scales are decoded inside its kernel: one launch
            if self.double_quant:
                absmax = self.absmax if whole else self.absmax[rows]
                second = (self.absmax2, self.offset) if whole else (self.absmax2[rows], self.offset[rows])
                double_quant = (*second, self.code2)
            else:
                absmax, double_quant = self.absmax_fp32(rows), None
            got = _triton_decode_or_fall_back(
                name, lambda: triton_nf4.decode(packed, absmax, self.code, self.blocksize, shape, self.dtype,
                                                out=out if direct else None, lookup=triton_nf4.lookup_of(name),
                                                double_quant=double_quant))
            if got is None:
                return self._decode(rows, shape, dtype, out)
        elif direct:
            torch.ops.bitsandbytes.dequantize_4bit.out(packed.reshape(-1, 1), self.absmax_fp32(rows).reshape(-1),
                                                       self.blocksize, "nf4", shape, self.dtype, out=out)
            return out
        else:
            got = torch.ops.bitsandbytes.dequantize_4bit.default(
                packed.reshape(-1, 1), self.absmax_fp32(rows).reshape(-1), self.blocksize, "nf4",
                kernel_shape(shape, self.blocksize, packed.device), self.dtype).view(shape)
        got = got if got.dtype == dtype else got.to(dtype)
        if out is not None and got is not out:
            out.copy_(got)
            return out
        return got

    def absmax_fp32(self, rows: slice = slice(None)) -> torch.Tensor:
        """First-level scales in fp32, [E', nblocks]: undo the double quantization (code2[u8] * absmax2 + offset),
        the same arithmetic as bitsandbytes' dequantize_blockwise."""
        whole = rows == _ALL  # the whole weight, as every pass decodes it: the buffers as they are, no slicing
        if not self.double_quant:
            return self.absmax if whole else self.absmax[rows]
        if whole:
            absmax, absmax2, offset = self.absmax, self.absmax2, self.offset
        else:
            absmax, absmax2, offset = self.absmax[rows], self.absmax2[rows], self.offset[rows]
        return decode_scales(absmax, absmax2, offset, self.code2)

    def _dequantize_by_state(self, expert: int | None, dtype: torch.dtype) -> torch.Tensor:
        if expert is not None or len(self.shape) == 2:
            e = expert or 0
            out = bnbF.dequantize_4bit(self.packed[e].view(-1, 1), self._state(e)).view(self.slice_shape)
            return out if out.dtype == dtype else out.to(dtype)
        out = torch.empty(self.shape, dtype=self.dtype, device=self.packed.device)
        for e in range(self.experts):
            out[e].copy_(bnbF.dequantize_4bit(self.packed[e].view(-1, 1), self._state(e)).view(self.slice_shape))
        return out if out.dtype == dtype else out.to(dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n not in ("code", "code2"))

    @torch.no_grad()
    def select_experts(self, start: int, stop: int) -> NF4Weight:
        """A new storage holding experts [start, stop) of this 3-D one (expert parallelism keeps a slice)."""
        out = NF4Weight((stop - start, *self.slice_shape), blocksize=self.blocksize,
                        double_quant=self.double_quant or self.scales_fp32, dtype=self.dtype,
                        device=self.packed.device, scales_fp32=self.scales_fp32)
        for name in ("packed", "absmax", "absmax2", "offset"):
            if hasattr(out, name):
                getattr(out, name).copy_(getattr(self, name)[start:stop])
        return out

    def extra_repr(self) -> str:
        dq = "double-quant, " if self.double_quant else "fp32 scales from double-quant, " if self.scales_fp32 else ""
        return f"shape={self.shape}, nf4, {dq}blocksize={self.blocksize}, compute={self.dtype}"


class FrozenWeight(nn.Module):
    """The unquantized counterpart of NF4Weight (quantization="none"): same interface, a plain frozen tensor."""

    def __init__(self, shape: tuple[int, ...], *, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.experts = self.shape[0] if len(shape) == 3 else 1
        self.slice_shape = self.shape[-2:]
        self.dtype = dtype
        self.register_buffer("weight", torch.zeros(self.shape, dtype=dtype, device=device))

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor, expert: int | None = None) -> FrozenWeight:
        if expert is None:
            self.weight.copy_(weight.to(self.weight.dtype))
        else:
            self.weight[expert].copy_(weight.to(self.weight.dtype))
        return self

    def dequantize(self, expert: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.weight if expert is None or len(self.shape) == 2 else self.weight[expert]
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @torch.no_grad()
    def select_experts(self, start: int, stop: int) -> FrozenWeight:
        """A new storage holding experts [start, stop) of this 3-D one."""
        out = FrozenWeight((stop - start, *self.slice_shape), dtype=self.dtype, device=self.weight.device)
        out.weight.copy_(self.weight[start:stop])
        return out

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, frozen"


def make_weight(shape: tuple[int, ...], *, quantization: str, dtype: torch.dtype, blocksize: int = 64,
                double_quant: bool = True, device: torch.device | str | None = None,
                scales_fp32: bool = False) -> NF4Weight | FrozenWeight:
    if quantization == "nf4":
        return NF4Weight(shape, blocksize=blocksize, double_quant=double_quant, dtype=dtype, device=device,
                         scales_fp32=scales_fp32)
    if quantization == "none":
        return FrozenWeight(shape, dtype=dtype, device=device)
    raise ValueError(f"unknown quantization {quantization!r}; use 'nf4' or 'none'")

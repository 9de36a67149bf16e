"""Merged export: base weights + LoRA delta -> an HF checkpoint with the base's class, config and tensor names.

It never builds the model. Every shard's header is planned up front, so each output tensor is cut into pieces
that can be made alone and written at their place (safetensors_stream.write_shards): a weight, one expert's slice
of a fused expert tensor, a run of rows of a tensor written as stored. Worker threads each read a piece from the
base checkpoint, move it to the merge's device (the GPU when there is one), decode it there if it is stored
quantized (NF4 round trip, FP8, MXFP4), add the LoRA delta of its module in fp32, convert it to the output dtype
and write it back from host memory. Host memory holds about one piece (plus its fp32 working copies when the
merge runs on the CPU) per worker, whatever the size of the model; the bytes do not depend on the number of
workers.

Base values: by default the weights the run trained against (the base checkpoint quantized to NF4 with the run's
settings and dequantized again: bit-for-bit what moefit's forward used). With `base=` the delta is added to the
original bf16 weights instead, which is the better result (no NF4 rounding) when you have them.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from ..errors import MoefitError
from ..loading import normalize_name
from ..models.expert_layout import ExpertTensor, fused_names, match_expert_tensor, split_fused
from ..models.families import FamilySpec, FusedExperts, PerExpert
from ..rundir import RunInfo
from .host_staging import HostStaging
from .safetensors_stream import (
    NAMES,
    CheckpointReader,
    Piece,
    PlannedTensor,
    default_workers,
    plan_shards,
    write_shards,
)
from .staging import check_out_dir, staged_dir
from .thread_streams import on_thread_streams

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "moefit_export.json"}


@dataclass
class ExportReport:
    out_dir: Path
    kind: str  # "merged" or "adapter"
    base_dir: Path | None = None
    base_values: str = ""  # "nf4-dequantized" or "original"
    dtype: str = ""
    shards: int = 0
    tensors_written: int = 0
    total_bytes: int = 0
    largest_tensor_bytes: int = 0
    merged_modules: int = 0  # linears and expert banks that received a LoRA delta
    copied_through: int = 0  # tensors outside the text model (vision tower, projector), bytes unchanged
    files_copied: list[str] = field(default_factory=list)
    files_skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the merged export's wall time, planning and side files included
    workers: int = 0
    device: str = ""  # where the merge arithmetic ran
    # Seconds of the tensor writing: its wall time ("tensors_wall"), and summed over the workers the time spent
    # reading (to the device), merging (arithmetic, back to the host) and writing into the shard files.
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.total_bytes / 1e9 / self.seconds if self.seconds else 0.0

    def summary_lines(self) -> list[str]:
        if self.kind == "adapter":
            lines = [f"adapter written to {self.out_dir} ({self.tensors_written} tensors, "
                     f"{self.total_bytes / 2**20:.1f} MiB)"]
        else:
            lines = [f"merged checkpoint written to {self.out_dir}: {self.tensors_written} tensors, "
                     f"{self.total_bytes / 2**30:.2f} GiB {self.dtype} in {self.shards} shard(s)",
                     f"base values: {self.base_values} from {self.base_dir}; LoRA merged into "
                     f"{self.merged_modules} modules"]
            if self.copied_through:
                lines.append(f"{self.copied_through} non-text tensors (vision tower, projector) copied unchanged")
            lines.append(f"wrote {self.total_bytes / 1e9:.2f} GB in {self.seconds:.1f} s: {self.gb_per_s:.3g} GB/s "
                         f"({self.workers} worker{'s' if self.workers != 1 else ''}, merge on {self.device})")
        if self.files_copied:
            lines.append(f"copied {len(self.files_copied)} files: {', '.join(self.files_copied)}")
        if self.files_skipped:
            lines.append(f"not copied ({len(self.files_skipped)}): {', '.join(self.files_skipped)}")
        return lines + [f"note: {n}" for n in self.notes]


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class LoraSource:
    """The run's adapter tensors, read one module at a time, with the scales they were trained with."""

    def __init__(self, info: RunInfo):
        from ..rundir import ADAPTER_WEIGHTS

        cfg = info.adapter_config
        self.reader = CheckpointReader(files=[info.adapter_dir / ADAPTER_WEIGHTS])
        self.scale = float(cfg["alpha"]) / float(cfg["r"])
        self.expert_scale = float(cfg["expert_alpha"]) / float(cfg["expert_r"]) if cfg.get("expert_r") else 0.0
        self.linears: set[str] = set()
        self.experts: dict[str, set[str]] = {}
        for key in self.reader.keys():
            mod, _, leaf = key.rpartition(".")
            if leaf in ("lora_A", "lora_B"):
                self.linears.add(mod)
            elif leaf.endswith(("_lora_A", "_lora_B")):
                self.experts.setdefault(mod, set()).add(leaf.split("_lora_")[0])
            else:
                raise MoefitError(f"{info.adapter_dir}: unexpected tensor {key!r} in the adapter.")

    def linear_delta(self, mod: str, device: torch.device | None = None) -> torch.Tensor | None:
        if mod not in self.linears:
            return None
        a = self.reader.read(f"{mod}.lora_A", device=device).float()
        b = self.reader.read(f"{mod}.lora_B", device=device).float()
        return (b @ a) * self.scale  # [out, in]

    def expert_delta(self, mod: str, proj: str, e: int, device: torch.device | None = None) -> torch.Tensor | None:
        if proj not in self.experts.get(mod, ()):
            return None
        a = self.reader.read(f"{mod}.{proj}_lora_A", e, device).float()  # [in, r]
        b = self.reader.read(f"{mod}.{proj}_lora_B", e, device).float()  # [r, out]
        return (a @ b).t() * self.expert_scale  # [out, in]

    def modules(self) -> set[str]:
        return self.linears | set(self.experts)


class _Merger:
    """The merge arithmetic, in fp32 on `device` (the weights it gets are already there)."""

    def __init__(self, info: RunInfo, lora: LoraSource, roundtrip: bool, device: torch.device):
        self.info, self.lora, self.roundtrip, self.device = info, lora, roundtrip, device

    def base_value(self, w: torch.Tensor) -> torch.Tensor:
        """fp32 [out, in]: the base weight as the run saw it (NF4 round trip) or as given."""
        if not self.roundtrip:
            return w.float()
        from ..quant.nf4 import NF4Weight

        q = self.info.quant
        nf4 = NF4Weight(tuple(w.shape), blocksize=q.blocksize, double_quant=q.double_quant,
                        dtype=self.info.compute_dtype, device=self.device)
        nf4.quantize_(w)
        # Decoded by bitsandbytes, whatever engine.nf4_decoder the run trained with: the same bits as the Triton
        # decoders (tests/test_gpu.py), without their per-process autotuning and the launch lock the 8 worker
        # threads share (1.76 against 1.45 GB/s, benchmarks/export_speed.md, sixteenth session).
        return nf4.dequantize(dtype=torch.float32, decoder=EXPORT_NF4_DECODER)

    def linear(self, w: torch.Tensor, mod: str) -> torch.Tensor:
        out = self.base_value(w)
        delta = self.lora.linear_delta(mod, self.device)
        return out if delta is None else out + delta

    def expert(self, w: torch.Tensor, mod: str, proj: str, e: int) -> torch.Tensor:
        out = self.base_value(w)
        delta = self.lora.expert_delta(mod, proj, e, self.device)
        return out if delta is None else out + delta


def _text_structure(base_dir: Path, info: RunInfo
                    ) -> tuple[set[str], dict[str, int], FamilySpec, tuple[int, int]]:
    """Names of the quantized linears and of the routed-expert banks (with their intermediate size) of the
    text model, as moefit builds it (on the meta device: nothing is allocated), the family spec and the FP8
    weight block of the checkpoint's quantization_config."""
    from transformers import AutoConfig

    from ..models.build import build_skeleton, text_config_of
    from ..models.families import require_family
    from ..models.layers import MoefitLinear
    from ..moe.experts import MoefitExperts
    from ..quant.fp8 import fp8_block_size

    config = text_config_of(AutoConfig.from_pretrained(base_dir))
    skel = build_skeleton(config, quant=info.quant, dtype=info.compute_dtype, device="meta")
    linears = {n for n, m in skel.named_modules() if isinstance(m, MoefitLinear)}
    experts = {n: m.intermediate_size for n, m in skel.named_modules() if isinstance(m, MoefitExperts)}
    return linears, experts, require_family(config, str(base_dir / "config.json")), fp8_block_size(config)


def merged_export(info: RunInfo, out: Path, *, base: Path | None = None, dtype: torch.dtype = torch.bfloat16,
                  max_shard_bytes: int = 5 * 10**9, device: str | torch.device = "auto", overwrite: bool = False,
                  workers: int | None = None, progress: bool | Callable[[int, int], None] = False,
                  pinned: bool = True) -> ExportReport:
    """Write the merged checkpoint of `info`'s run into `out` (see the module docstring). `device`: where the merge
    arithmetic and any decoding (NF4 round trip, FP8, MXFP4) run; auto = the GPU when there is one. `workers`:
    threads making and writing pieces concurrently (default: default_workers()); host memory holds about one
    piece per worker. `progress`: True prints bytes written and MB/s to stderr, or a callable(done, total).
    `pinned` (on a GPU): each worker reads and copies through a page-locked host buffer of its own, reused
    (host_staging.py); False: a fresh pageable tensor each way, as before (the same bytes)."""
    start = time.perf_counter()
    out = Path(out)
    check_out_dir(out, overwrite)  # before the work; staged_dir checks again before writing
    base_dir = Path(base).expanduser() if base is not None else info.base_dir
    if not (base_dir / "config.json").is_file():
        raise MoefitError(f"{base_dir}: no config.json; --base must be the original model directory "
                          "(config.json + *.safetensors).")
    dev = export_device(device)
    n_workers = default_workers() if workers is None else workers
    if n_workers < 1:
        raise MoefitError(f"workers={workers}: expected a positive number of worker threads.")
    linears, experts, spec, fp8_block = _text_structure(base_dir, info)
    reader = CheckpointReader(base_dir, fp8_block=fp8_block)
    lora = LoraSource(info)
    roundtrip = base is None and info.quant.weights == "nf4"
    make = _Pieces(reader, _Merger(info, lora, roundtrip, dev), dtype)
    out_dtype = NAMES[dtype]

    jobs: list[tuple[PlannedTensor, list[Piece]]] = []
    covered: set[str] = set()
    report = ExportReport(out_dir=out, kind="merged", base_dir=base_dir, dtype=str(dtype).removeprefix("torch."),
                          base_values="NF4-dequantized (what the run trained against)" if roundtrip
                          else "original weights", workers=n_workers, device=str(dev))
    dequantized = False  # MXFP4 experts or FP8 weights written decoded, in the output dtype
    for key in sorted(reader.keys(), key=natural_key):
        t = reader.tensors[key]
        if reader.is_scale(key):  # an FP8 weight's scales: the weight is written decoded
            dequantized = True
            continue
        name = normalize_name(key, spec)
        et = match_expert_tensor(name, spec) if name is not None else None
        if et and et.module in experts and getattr(et.layout, "mxfp4", False) and et.kind != "bias":
            covered.add(et.module)
            dequantized = True
            if et.kind == "weight":  # the scales go with it
                jobs.append(_mxfp4_job(make, key, et, spec.moe.in_memory, experts[et.module]))
            continue
        floating = torch.empty((), dtype=_dt(t.dtype)).is_floating_point()
        keep = (name is None or not floating) and not reader.is_fp8(key)
        planned = PlannedTensor(key, t.dtype if keep else out_dtype, t.shape)
        if name is None:
            report.copied_through += 1
            jobs.append((planned, make.copy(key, planned, cast=not keep)))
            continue
        if keep:
            jobs.append((planned, make.copy(key, planned, cast=False)))
            continue
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and mod in linears:
            _check_linear(lora, mod, t.shape)
            covered.add(mod)
            jobs.append((planned, make.linear(key, mod, planned)))
        elif et and et.module in experts and et.kind == "weight":
            covered.add(et.module)
            read = functools.partial(make.read, key)
            jobs.append((planned, make.experts(planned, read, t.shape[0], et, et.layout, experts[et.module])))
        else:
            jobs.append((planned, make.copy(key, planned, cast=True)))
    missing = sorted(lora.modules() - covered)
    if missing:
        raise MoefitError(f"{base_dir}: {len(missing)} modules the adapter trained have no weight in this checkpoint "
                          f"(e.g. {', '.join(missing[:3])}). Is it the model the run was trained on?")
    report.merged_modules = len(lora.modules())

    pieces = {p.name: ps for p, ps in jobs}
    if len(pieces) != len(jobs):  # two checkpoint tensors would be written under one name: never drop one
        names = [p.name for p, _ in jobs]
        dup = sorted({n for n in names if names.count(n) > 1})
        raise MoefitError(f"{base_dir}: tensors {', '.join(dup[:3])} would be written twice; nothing was written.")
    shards = plan_shards([p for p, _ in jobs], max_shard_bytes)
    files = [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards, 1)]
    weight_map: dict[str, str] = {}
    show = ProgressPrinter() if progress is True else (progress or None)
    if pinned and dev.type == "cuda" and make.largest_on_device:
        make.staging = HostStaging(min(make.largest_on_device, MAX_STAGING_BYTES), dev)
        pieces = {name: [Piece(p.nbytes, make.staging.wrap(p.make)) for p in ps] for name, ps in pieces.items()}
    try:
        with staged_dir(out, overwrite) as tmp:
            stats = write_shards([(tmp / fname, shard) for fname, shard in files], on_thread_streams(pieces, dev),
                                 n_workers, show)
            for fname, shard in files:
                for p in shard:
                    weight_map[p.name] = fname
                    report.total_bytes += p.nbytes
                    report.largest_tensor_bytes = max(report.largest_tensor_bytes, p.nbytes)
            report.shards, report.tensors_written = len(shards), len(weight_map)
            index = {"metadata": {"total_size": report.total_bytes}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            _write_config(base_dir, tmp, dtype, drop_quantization=dequantized)
            if dequantized:
                report.notes.append("the base's quantized weights (MXFP4 routed experts, FP8 blocks) are written "
                                    "decoded (MXFP4 experts in transformers' in-memory layout) and config.json's "
                                    "quantization_config is dropped: a plain checkpoint in the output dtype.")
            copy_side_files(base_dir, tmp, report, fallback=info.base_dir if base is not None else None)
            report.notes += info.notes
            provenance = {"moefit_export": "merged", "run": str(info.adapter_dir), "base": str(base_dir),
                          "base_values": report.base_values, "dtype": report.dtype, "lora_scale": lora.scale,
                          "expert_lora_scale": lora.expert_scale, "merged_modules": report.merged_modules,
                          "copied_through": report.copied_through}
            (tmp / "moefit_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    finally:
        if isinstance(show, ProgressPrinter):
            show.close()
        if make.staging is not None:
            make.staging.close()
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the pieces' blocks, cached by the allocator, go back to the GPU
    report.seconds = time.perf_counter() - start
    report.phase_seconds = {"tensors_wall": stats.seconds, "read": make.read_s, "merge": stats.make_s - make.read_s,
                            "write": stats.write_s}
    return report


def export_device(device: str | torch.device) -> torch.device:
    """`auto` -> the current GPU when CUDA is available, else the CPU; `cuda` -> the current GPU (worker threads
    do not inherit the current device, so it is named)."""
    from ..devices import pick_device

    dev = pick_device(str(device))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MoefitError(f"--device {device}: no CUDA device here; use --device cpu (or auto).")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class ProgressPrinter:
    """Progress of a merged export on stderr: bytes written and MB/s, redrawn in place on a terminal, a line every
    `every_s` seconds otherwise (a log)."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 10.0):
        from ..train.progress import Console

        self.console = Console(None, stream or sys.stderr)
        self.every_s = 0.5 if self.console.tty else every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        from ..train.progress import fmt_duration

        now = time.perf_counter()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = f", eta {fmt_duration((total - done) / rate)}" if 0 < done < total else ""
        pct = 100 * done / total if total else 100
        self.console.status(f"export: {done / 1e9:.2f} of {total / 1e9:.2f} GB ({pct:.0f}%), "
                            f"{rate / 1e6:,.0f} MB/s{eta}", permanent=True)

    def close(self) -> None:
        self.console.close()


EXPORT_NF4_DECODER = "bnb"  # engine.nf4_decoder of the export's NF4 round trip (see _Merger.base_value)
COPY_CHUNK_BYTES = 256 * 2**20  # a tensor written as stored is made in runs of rows of about this size
# Each GPU worker's page-locked buffer holds the largest piece made on the device, up to this (a Scout or Maverick
# expert slice, 168 MB, fits; a larger piece, e.g. a 2 GB lm_head, is copied through pageable memory instead).
MAX_STAGING_BYTES = 256 * 2**20


class _Pieces:
    """How each output tensor is made, as pieces (safetensors_stream.Piece) that worker threads make alone: a
    linear weight or one expert's weight whole, a fused expert tensor one expert at a time, a tensor written as
    stored in runs of rows. Reads go to the merge's device; the results come back to the host in the output dtype.
    `read_s`: seconds spent reading (and moving to the device), summed over the threads."""

    def __init__(self, reader: CheckpointReader, merger: _Merger, dtype: torch.dtype):
        self.reader, self.merger, self.dtype, self.device = reader, merger, dtype, merger.device
        self.read_s = 0.0
        self.largest_on_device = 0  # bytes of the largest piece made on the merge's device
        self.staging: HostStaging | None = None  # set before the pieces are made, on a GPU
        self._lock = threading.Lock()

    def read(self, key: str, index: int | None = None, rows: tuple[int, int] | None = None,
             device: torch.device | None = None) -> torch.Tensor:
        """Tensor `key` (or its `index`-th slice, or `rows`), on `device` (default: the merge's device)."""
        t0 = time.perf_counter()
        if rows is not None:
            t = self.reader.read_rows(key, *rows)
        else:
            t = self.reader.read(key, index, device or self.device, self.staging)
        with self._lock:
            self.read_s += time.perf_counter() - t0
        return t

    def copy(self, key: str, planned: PlannedTensor, cast: bool) -> list[Piece]:
        """A tensor written as stored (`cast`: in the output dtype; an FP8 weight decoded on the device)."""
        if self.reader.is_fp8(key):
            return [self._on_device(planned.nbytes, functools.partial(self._decoded, key))]
        shape = planned.shape
        rows = shape[0] if shape else 0
        step = max(1, COPY_CHUNK_BYTES // max(1, planned.nbytes // rows)) if rows else 0
        if rows <= step:
            return [Piece(planned.nbytes, functools.partial(self._stored, key, None, cast))]
        return [Piece(planned.nbytes // rows * (min(lo + step, rows) - lo),
                      functools.partial(self._stored, key, (lo, min(lo + step, rows)), cast))
                for lo in range(0, rows, step)]

    def _stored(self, key: str, rows: tuple[int, int] | None, cast: bool) -> torch.Tensor:
        t = self.read(key, rows=rows, device=torch.device("cpu"))
        return t.to(self.dtype) if cast else t

    def _decoded(self, key: str) -> torch.Tensor:
        return self._host(self.read(key).to(self.dtype))

    def linear(self, key: str, mod: str, planned: PlannedTensor) -> list[Piece]:
        return [self._on_device(planned.nbytes, functools.partial(self._linear, key, mod))]

    def _linear(self, key: str, mod: str) -> torch.Tensor:
        return self._host(self.merger.linear(self.read(key), mod).to(self.dtype))

    def experts(self, planned: PlannedTensor, read_slice: Callable[[int | None], torch.Tensor], num: int,
                et: ExpertTensor, out_layout: FusedExperts | PerExpert, inter: int) -> list[Piece]:
        """A routed-expert weight with its LoRA delta merged: one expert's weight (per-expert layout), or a fused
        tensor one expert slice at a time (`read_slice(e)`: the slice, [out, in] or as stored, on the device),
        written in `out_layout`."""
        if et.expert is not None:
            return [self._on_device(planned.nbytes, functools.partial(self._expert, read_slice, et))]
        return [self._on_device(planned.nbytes // num, functools.partial(self._fused_slice, read_slice, e, et,
                                                                         out_layout, inter))
                for e in range(num)]

    def _on_device(self, nbytes: int, make: Callable[[], torch.Tensor]) -> Piece:
        """A piece made on the merge's device (read there, merged, brought back)."""
        self.largest_on_device = max(self.largest_on_device, nbytes)
        return Piece(nbytes, make)

    def _expert(self, read_slice: Callable[[int | None], torch.Tensor], et: ExpertTensor) -> torch.Tensor:
        return self._host(self.merger.expert(read_slice(None), et.module, et.part, et.expert).to(self.dtype))

    def _fused_slice(self, read_slice: Callable[[int | None], torch.Tensor], e: int, et: ExpertTensor,
                     out_layout: FusedExperts, inter: int) -> torch.Tensor:
        """Each projection's merged fp32 weight goes straight into its place in the output slice (converted to
        the output dtype on the way: the same rounding as joining in fp32 and converting after)."""
        parts = split_fused(et.layout, et.part, read_slice(e), inter)
        rows, cols = sum(w.shape[0] for w in parts.values()), next(iter(parts.values())).shape[1]
        out = torch.empty((cols, rows) if out_layout.transposed else (rows, cols), dtype=self.dtype,
                          device=self.device)
        places = split_fused(out_layout, et.part, out, inter)
        for proj, w in parts.items():
            places[proj].copy_(self.merger.expert(w, et.module, proj, e))
        return self._host(out)

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        """`t` contiguous in host memory (made contiguous where it is, so a transposed GPU result is not reordered
        by the CPU): through the thread's staging buffer when there is one."""
        if self.staging is not None:
            return self.staging.outbound(t)
        return t.contiguous().cpu()


def _dt(name: str) -> torch.dtype:
    from ..safetensors_io import DTYPES

    return DTYPES[name]


def _check_linear(lora: LoraSource, mod: str, shape: tuple[int, ...]) -> None:
    if mod not in lora.linears:
        return
    a = lora.reader.tensors[f"{mod}.lora_A"].shape
    b = lora.reader.tensors[f"{mod}.lora_B"].shape
    if (b[0], a[1]) != tuple(shape):
        raise MoefitError(f"adapter for {mod} is for a [{b[0]}, {a[1]}] weight, the base has {list(shape)}: the "
                          "base checkpoint is not the model the run was trained on.")


def _mxfp4_job(make: _Pieces, key: str, et: ExpertTensor, out_layout: FusedExperts, inter: int
               ) -> tuple[PlannedTensor, list[Piece]]:
    """An MXFP4 fused weight (`<name>_blocks` + `<name>_scales`) -> the tensor transformers holds in memory
    (`out_layout`), in the output dtype, decoded and merged one expert at a time on the merge's device."""
    from ..quant.mxfp4 import dequantize_mxfp4

    reader = make.reader
    blocks = reader.tensors[key].shape  # [E, out, in/32, 16]
    scales = key.removesuffix("_blocks") + "_scales"
    if scales not in reader:
        raise MoefitError(f"{key}: MXFP4 blocks without their scales ({scales}) in the checkpoint.")
    name = key.removesuffix(fused_names(et.layout)[et.part] + "_blocks") + fused_names(out_layout)[et.part]
    out_f, in_f = blocks[1], blocks[2] * 32
    shape = (blocks[0], in_f, out_f) if out_layout.transposed else (blocks[0], out_f, in_f)

    def read(e: int) -> torch.Tensor:
        return dequantize_mxfp4(make.read(key, e), make.read(scales, e))

    planned = PlannedTensor(name, NAMES[make.dtype], shape)
    return planned, make.experts(planned, read, blocks[0], et, out_layout, inter)


def _write_config(base_dir: Path, out: Path, dtype: torch.dtype, drop_quantization: bool = False) -> None:
    cfg = json.loads((base_dir / "config.json").read_text())
    if drop_quantization:
        cfg.pop("quantization_config", None)
    name = str(dtype).removeprefix("torch.")
    for node in (cfg, cfg.get("text_config")):
        if isinstance(node, dict):
            for k in ("dtype", "torch_dtype"):
                if k in node:
                    node[k] = name
    if "dtype" not in cfg and "torch_dtype" not in cfg:
        cfg["dtype"] = name
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "chat_template")


def copy_side_files(base_dir: Path, out: Path, report: ExportReport, fallback: Path | None = None,
                    tokenizer_only: bool = False) -> None:
    """Tokenizer, chat template, generation config, processor config, license: every top-level non-weight file
    of the base directory (only the tokenizer's with `tokenizer_only`). Without tokenizer files there, they come
    from `fallback` (the run's base)."""
    for src_dir in (base_dir, fallback):
        if src_dir is None:
            continue
        for f in sorted(src_dir.iterdir()):
            if f.name in SKIP_FILES or f.name.endswith(WEIGHT_SUFFIXES) or f.name.startswith("."):
                continue
            if not f.is_file():
                if src_dir == base_dir and not tokenizer_only:
                    report.files_skipped.append(f.name + "/")
                continue
            if (out / f.name).exists():
                continue
            if (tokenizer_only or src_dir != base_dir) and not f.name.startswith(TOKENIZER_PREFIXES):
                continue
            shutil.copy2(f, out / f.name)
            report.files_copied.append(f.name)
        if any(out.glob("tokenizer*")):
            break
    if not any(out.glob("tokenizer*")):
        report.notes.append("no tokenizer files found next to the base weights; copy them into the export "
                            "before loading it with a tokenizer.")

"""Merged export: base weights + LoRA delta -> an HF checkpoint with the base's class, config and tensor names.

It never builds the model. Tensors are streamed from the base checkpoint one at a time (routed experts one expert
at a time), the LoRA delta of that module is added in fp32, and the result is written straight into a shard whose
header was planned up front. Host memory holds about one tensor (one expert slice for fused experts) plus its fp32
working copies, whatever the size of the model.

Base values: by default the weights the run trained against (the base checkpoint quantized to NF4 with the run's
settings and dequantized again: bit-for-bit what moefit's forward used). With `base=` the delta is added to the
original bf16 weights instead, which is the better result (no NF4 rounding) when you have them.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MoefitError
from ..loading import normalize_name
from ..models.expert_layout import ExpertTensor, fused_names, join_fused, match_expert_tensor, split_fused
from ..models.families import FamilySpec, FusedExperts, PerExpert
from ..rundir import RunInfo
from .safetensors_stream import NAMES, CheckpointReader, PlannedTensor, plan_shards, write_shard
from .staging import check_out_dir, staged_dir

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
        self.used: set[str] = set()

    def linear_delta(self, mod: str) -> torch.Tensor | None:
        if mod not in self.linears:
            return None
        self.used.add(mod)
        a = self.reader.read(f"{mod}.lora_A").float()
        b = self.reader.read(f"{mod}.lora_B").float()
        return (b @ a) * self.scale  # [out, in]

    def expert_delta(self, mod: str, proj: str, e: int) -> torch.Tensor | None:
        if proj not in self.experts.get(mod, ()):
            return None
        self.used.add(mod)
        a = self.reader.read(f"{mod}.{proj}_lora_A", e).float()  # [in, r]
        b = self.reader.read(f"{mod}.{proj}_lora_B", e).float()  # [r, out]
        return (a @ b).t() * self.expert_scale  # [out, in]

    def modules(self) -> set[str]:
        return self.linears | set(self.experts)


class _Merger:
    def __init__(self, info: RunInfo, lora: LoraSource, roundtrip: bool, device: str):
        self.info, self.lora, self.roundtrip, self.device = info, lora, roundtrip, device

    def base_value(self, w: torch.Tensor) -> torch.Tensor:
        """fp32 [out, in]: the base weight as the run saw it (NF4 round trip) or as given."""
        if not self.roundtrip:
            return w.float()
        from ..quant.nf4 import NF4Weight

        q = self.info.quant
        nf4 = NF4Weight(tuple(w.shape), blocksize=q.blocksize, double_quant=q.double_quant,
                        dtype=self.info.compute_dtype, device=self.device)
        nf4.quantize_(w.to(self.device))
        return nf4.dequantize(dtype=torch.float32).cpu()

    def linear(self, w: torch.Tensor, mod: str) -> torch.Tensor:
        out = self.base_value(w)
        delta = self.lora.linear_delta(mod)
        return out if delta is None else out + delta

    def expert(self, w: torch.Tensor, mod: str, proj: str, e: int) -> torch.Tensor:
        out = self.base_value(w)
        delta = self.lora.expert_delta(mod, proj, e)
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
                  max_shard_bytes: int = 5 * 10**9, device: str = "cpu", overwrite: bool = False) -> ExportReport:
    out = Path(out)
    check_out_dir(out, overwrite)  # before the work; staged_dir checks again before writing
    base_dir = Path(base).expanduser() if base is not None else info.base_dir
    if not (base_dir / "config.json").is_file():
        raise MoefitError(f"{base_dir}: no config.json; --base must be the original model directory "
                          "(config.json + *.safetensors).")
    linears, experts, spec, fp8_block = _text_structure(base_dir, info)
    reader = CheckpointReader(base_dir, fp8_block=fp8_block)
    lora = LoraSource(info)
    roundtrip = base is None and info.quant.weights == "nf4"
    merger = _Merger(info, lora, roundtrip, device)
    out_dtype = NAMES[dtype]

    jobs: list[tuple[PlannedTensor, Iterator[torch.Tensor]]] = []
    covered: set[str] = set()
    report = ExportReport(out_dir=out, kind="merged", base_dir=base_dir, dtype=str(dtype).removeprefix("torch."),
                          base_values="NF4-dequantized (what the run trained against)" if roundtrip
                          else "original weights")
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
                jobs.append(_mxfp4_job(reader, key, et, spec.moe.in_memory, experts[et.module], merger, dtype))
            continue
        floating = torch.empty((), dtype=_dt(t.dtype)).is_floating_point()
        keep = (name is None or not floating) and not reader.is_fp8(key)
        planned = PlannedTensor(key, t.dtype if keep else out_dtype, t.shape)
        if name is None:
            report.copied_through += 1
            jobs.append((planned, _copy(reader, key) if keep else _cast(reader, key, dtype)))
            continue
        if keep:
            jobs.append((planned, _copy(reader, key)))
            continue
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and mod in linears:
            _check_linear(lora, mod, t.shape)
            covered.add(mod)
            jobs.append((planned, _linear(reader, key, mod, merger, dtype)))
        elif et and et.module in experts and et.kind == "weight":
            covered.add(et.module)
            jobs.append((planned, _experts(functools.partial(reader.read, key), t.shape[0], et, et.layout,
                                           experts[et.module], merger, dtype)))
        else:
            jobs.append((planned, _cast(reader, key, dtype)))
    missing = sorted(lora.modules() - covered)
    if missing:
        raise MoefitError(f"{base_dir}: {len(missing)} modules the adapter trained have no weight in this checkpoint "
                          f"(e.g. {', '.join(missing[:3])}). Is it the model the run was trained on?")
    report.merged_modules = len(lora.modules())

    shards = plan_shards([p for p, _ in jobs], max_shard_bytes)
    gens = dict((p.name, g) for p, g in jobs)
    weight_map: dict[str, str] = {}
    with staged_dir(out, overwrite) as tmp:
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_shard(tmp / fname, shard, gens)
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
    return report


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


def _copy(reader: CheckpointReader, key: str) -> Iterator[torch.Tensor]:
    yield reader.read(key)


def _cast(reader: CheckpointReader, key: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    yield reader.read(key).to(dtype)


def _linear(reader, key, mod, merger: _Merger, dtype) -> Iterator[torch.Tensor]:
    yield merger.linear(reader.read(key), mod).to(dtype)


def _experts(read_slice, num: int, et: ExpertTensor, out_layout: FusedExperts | PerExpert, inter: int,
             merger: _Merger, dtype) -> Iterator[torch.Tensor]:
    """A routed-expert weight with its LoRA delta merged: one expert's weight (per-expert layout), or a fused
    tensor streamed one expert slice at a time (`read_slice(e)` gives the slice [out, in] or as stored), written
    in `out_layout`."""
    if et.expert is not None:
        yield merger.expert(read_slice(None), et.module, et.part, et.expert).to(dtype)
        return
    for e in range(num):
        parts = split_fused(et.layout, et.part, read_slice(e), inter)
        merged = {proj: merger.expert(w, et.module, proj, e) for proj, w in parts.items()}
        yield join_fused(out_layout, et.part, merged).to(dtype)


def _mxfp4_job(reader: CheckpointReader, key: str, et: ExpertTensor, out_layout: FusedExperts, inter: int,
               merger: _Merger, dtype) -> tuple[PlannedTensor, Iterator[torch.Tensor]]:
    """An MXFP4 fused weight (`<name>_blocks` + `<name>_scales`) -> the bf16 tensor transformers holds in memory
    (`out_layout`), decoded and merged one expert at a time."""
    from ..quant.mxfp4 import dequantize_mxfp4

    blocks = reader.tensors[key].shape  # [E, out, in/32, 16]
    scales = key.removesuffix("_blocks") + "_scales"
    if scales not in reader:
        raise MoefitError(f"{key}: MXFP4 blocks without their scales ({scales}) in the checkpoint.")
    name = key.removesuffix(fused_names(et.layout)[et.part] + "_blocks") + fused_names(out_layout)[et.part]
    out_f, in_f = blocks[1], blocks[2] * 32
    shape = (blocks[0], in_f, out_f) if out_layout.transposed else (blocks[0], out_f, in_f)

    def read(e: int) -> torch.Tensor:
        return dequantize_mxfp4(reader.read(key, e), reader.read(scales, e))

    return (PlannedTensor(name, NAMES[dtype], shape),
            _experts(read, blocks[0], et, out_layout, inter, merger, dtype))


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

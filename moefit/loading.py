"""Streaming loader: safetensors shards -> moefit modules, tensor by tensor, quantized on the target device.

Neither host RAM nor the GPU ever holds the bf16 model: each tensor is read (fused expert tensors one expert at a
time, through safetensors slices), moved to the device, quantized into its NF4 storage and dropped.

Layouts understood: those the model's family spec lists (models.families): causal-LM keys (`model.layers.N...`,
`lm_head.weight`) and multimodal wrappers' (`language_model.model.layers.N...`; the vision tower and projector are
skipped and counted); routed experts in each on-disk layout of the family (models.expert_layout), e.g. Llama 4's
fused `experts.gate_up_proj [E, H, 2I]`, Qwen3-MoE's `experts.E.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.E.w1.weight`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import MoefitError
from .models.expert_layout import ExpertTensor, match_expert_tensor, split_fused, split_outputs
from .models.families import FamilySpec, require_family
from .models.layers import MoefitLinear
from .moe.experts import EXPERT_PROJECTIONS, MoefitExperts
from .quant.fp8 import fp8_block_size
from .quant.mxfp4 import dequantize_mxfp4
from .safetensors_io import CheckpointTensors, SafetensorsFile

SKIP_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")


def resolve_source(source: str) -> Path:
    """'tiny' -> the embedded model; an existing directory -> itself; otherwise a hub id, downloaded (config,
    safetensors and tokenizer files only) into the HF cache (see moefit.hub: fails fast offline)."""
    from .config import TINY_MODEL

    if source == TINY_MODEL:
        from .assets import tiny_model_dir

        return tiny_model_dir()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoefitError(f"{path}: no config.json here. Point `model:` at a Hugging Face model directory "
                              "(config.json + *.safetensors) or a hub id.")
        return path
    from .hub import is_hub_id, snapshot

    if not is_hub_id(source):
        raise MoefitError(f"model {source!r}: not a directory and not a hub id (owner/name). Use 'tiny', a local "
                          "model directory, or a Hugging Face hub id such as meta-llama/Llama-4-Scout-17B-16E-Instruct.")
    return snapshot(source)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise MoefitError(f"{model_dir}: no *.safetensors files. moefit loads safetensors checkpoints only; "
                          "convert .bin weights with transformers' save_pretrained(safe_serialization=True).")
    return files


def normalize_name(key: str, spec: FamilySpec) -> str | None:
    """Checkpoint key -> name inside the text-only causal LM, or None for tensors text training skips."""
    if key.startswith(SKIP_PREFIXES):
        return None
    if key.startswith("language_model."):
        key = key[len("language_model."):]
    elif key.startswith("model.language_model."):
        key = "model." + key[len("model.language_model."):]
    for on_disk, in_model in spec.key_renames:
        key = key.replace(on_disk, in_model)
    return key


@dataclass
class LoadReport:
    tensors_loaded: int = 0
    tensors_skipped: int = 0  # vision tower / projector, MTP layers: not part of the text model moefit builds
    skipped_examples: list[str] = field(default_factory=list)
    largest_tensor_bytes: int = 0


class _Filler:
    """Knows where each checkpoint tensor goes and which targets are still empty."""

    def __init__(self, model: nn.Module, spec: FamilySpec):
        self.model = model
        self.spec = spec
        # Checkpoint tensors the model class itself declares it does not build (GLM-4.5's, DeepSeek-V3's MTP layer)
        patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
        self.ignore = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
        self.expected: set[str] = set()
        for name, module in model.named_modules():
            if isinstance(module, MoefitLinear):
                self.expected.add(f"{name}.weight")
                if module.bias is not None:
                    self.expected.add(f"{name}.bias")
            elif isinstance(module, MoefitExperts):
                owned = range(module.expert_offset, module.expert_offset + module.num_experts)
                for proj in EXPERT_PROJECTIONS:
                    self.expected.update(f"{name}.{e}.{proj}" for e in owned)
                    if module.has_bias:
                        self.expected.update(f"{name}.{e}.{proj}_bias" for e in owned)
        skip_owners = tuple(n + "." for n, m in model.named_modules() if isinstance(m, (MoefitLinear, MoefitExperts)))
        for name, _ in model.named_parameters():
            if not name.startswith(skip_owners):
                self.expected.add(name)
        for name, module in model.named_modules():
            if isinstance(module, (MoefitLinear, MoefitExperts)) or name.startswith(skip_owners):
                continue
            for bname, _ in module.named_buffers(recurse=False):
                if bname not in module._non_persistent_buffers_set:
                    self.expected.add(f"{name}.{bname}" if name else bname)
        self.filled: set[str] = set()

    def _module(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def fill(self, name: str, read, device: torch.device, read_scales=None) -> bool:
        """`read(index=None)` returns the tensor (or one leading-dim slice of it); `read_scales(index)` the same
        slice of an MXFP4 weight's scales tensor. False: a tensor the model class does not build, skipped."""
        et = match_expert_tensor(name, self.spec)
        experts = self._module(et.module) if et else None
        if isinstance(experts, MoefitExperts):
            self._fill_experts(experts, et, read, device, read_scales)
            return True
        path, _, leaf = name.rpartition(".")
        module = self._module(path)
        if isinstance(module, MoefitLinear):
            if leaf == "weight":
                module.load_weight(read().to(device))
            elif leaf == "bias" and module.bias is not None:
                module.bias.copy_(read())
            else:
                raise MoefitError(f"checkpoint tensor {name!r} does not fit the model (unexpected {leaf!r}).")
            self._done(name)
            return True
        if (module is None or not hasattr(module, leaf)) and self.ignore is not None and self.ignore.search(name):
            return False
        if module is None or not hasattr(module, leaf):
            raise MoefitError(f"checkpoint tensor {name!r} has no place in the model built from config.json; "
                              "the checkpoint and its config do not match.")
        target = getattr(module, leaf)
        t = read()
        if tuple(t.shape) != tuple(target.shape):
            raise MoefitError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, config.json implies "
                              f"{tuple(target.shape)}.")
        with torch.no_grad():
            target.copy_(t)
        self._done(name)
        return True

    def _fill_experts(self, experts: MoefitExperts, et: ExpertTensor, read, device: torch.device,
                      read_scales) -> None:
        """One expert at a time: a per-expert weight, or each expert's slice of a fused weight or bias."""
        if et.kind == "scales":
            return  # read together with its MXFP4 blocks
        if et.kind == "bias" and not experts.has_bias:
            raise MoefitError(f"checkpoint tensor {et.module}: an expert bias the model built from config.json has "
                              "no place for.")
        inter = experts.intermediate_size
        # Only the experts this module holds are read (expert parallelism: a rank reads its own slice).
        owned = range(experts.expert_offset, experts.expert_offset + experts.num_experts)
        for e in ([et.expert] if et.expert is not None else owned):
            if e not in owned:
                continue
            local = e - experts.expert_offset
            t = (read() if et.expert is not None else read(e)).to(device)
            if et.kind == "bias":
                for proj, b in split_outputs(et.layout, et.part, t, inter).items():
                    getattr(experts, f"{proj}_bias")[local].copy_(b)
                    self._done(f"{et.module}.{e}.{proj}_bias")
                continue
            if getattr(et.layout, "mxfp4", False):
                t = dequantize_mxfp4(t, read_scales(e).to(device))
            parts = {et.part: t} if et.expert is not None else split_fused(et.layout, et.part, t, inter)
            for proj, w in parts.items():
                getattr(experts, proj).quantize_(w, expert=local)
                self._done(f"{et.module}.{e}.{proj}")
            del t

    def _done(self, *names: str) -> None:
        self.filled.update(names)

    def missing(self) -> list[str]:
        return sorted(self.expected - self.filled)


def iter_checkpoint(model_dir: Path, spec: FamilySpec) -> Iterator[tuple[str, str | None, SafetensorsFile]]:
    """(checkpoint key, normalized name or None, its file), shard by shard."""
    for path in safetensors_files(model_dir):
        f = SafetensorsFile(path)
        for key in f.keys():
            yield key, normalize_name(key, spec), f


@torch.no_grad()
def stream_weights(model: nn.Module, model_dir: Path, device: torch.device | str) -> LoadReport:
    device = torch.device(device)
    spec = require_family(model.config, str(model_dir / "config.json"))
    filler = _Filler(model, spec)
    report = LoadReport()
    entries = list(iter_checkpoint(model_dir, spec))  # headers only
    tensors = CheckpointTensors({key: f for key, _, f in entries}, fp8_block_size(model.config))
    for key, name, f in entries:
        if tensors.is_scale(key):
            continue  # an FP8 weight's scales: read with it
        scales = key.removesuffix("_blocks") + "_scales"  # an MXFP4 weight's other half, in whichever shard
        if name is None or not filler.fill(name, functools.partial(tensors.read, key), device,
                                           functools.partial(tensors.read, scales) if scales in tensors.files
                                           else None):
            report.tensors_skipped += 1
            if len(report.skipped_examples) < 3:
                report.skipped_examples.append(key)
            continue
        report.largest_tensor_bytes = max(report.largest_tensor_bytes, f.nbytes(key))
        report.tensors_loaded += 1
    missing = [m for m in filler.missing() if not _tied_lm_head(m, model)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MoefitError(f"{model_dir}: the checkpoint lacks {len(missing)} tensors the config needs, e.g. "
                          f"{', '.join(missing[:5])}{more}. Is the download complete?")
    return report


def _tied_lm_head(name: str, model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return name == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))

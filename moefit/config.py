"""The run config: one typed schema, loaded from YAML, validated in one place.

Every section is a dataclass; `load_config` walks the YAML against the type hints and reports the
first problem with the dotted key that holds it (``train.lr: expected a number, got 'fast'``).
The defaults reproduce the seed's corrected recipe for Llama 4 Scout (see recipes/).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

TINY_MODEL = "tiny"  # the embedded default model shipped in moefit/assets/tiny

LORA_TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class QuantConfig:
    """How the frozen base weights are stored. NF4 covers attention, shared and routed experts, dense MLPs."""

    weights: Literal["nf4", "none"] = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    # Modules kept in compute_dtype rather than NF4 (the recipe keeps these; they are small or sensitive).
    keep_unquantized: list[str] = field(default_factory=lambda: ["embed_tokens", "lm_head", "norm", "router"])
    # Keep the (frozen, untied) input embedding table in host memory: lookups on the CPU, only the rows go to the
    # GPU. Saves vocab x hidden x 2 bytes of GPU memory (1.93 GiB on Llama 4 Scout).
    embeddings_on_host: bool = False
    # The NF4 block scales of the linears (attention, shared experts, dense MLPs; not the routed experts) decoded
    # from the double quantization once at load and kept in fp32: every pass then decodes those weights in one
    # kernel instead of three (fewer launches where the host sets the pace), the same values, +3.5 bytes per 64
    # weights of them (Llama 3.1 8B: +0.3 GiB, Llama 4 Scout: +0.4 GiB). Without double_quant the scales are fp32 already.
    # Off by default: on an H200 it took Scout 1 x 8 from 2,013 to 2,094 tok/s (198,544 kernels instead of 213,904),
    # but Llama 3.1 8B's host-bound step moved by -7 % to +29 % in three calls, within its run-to-run spread
    # (benchmarks/speed_targets.md). When on and the 0.3-0.4 GiB decide the fit, `moefit plan` offers false.
    fp32_linear_scales: bool = False


@dataclass
class LoraConfig:
    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    # Where gate/up/down apply: the shared expert, every routed expert, dense MLPs.
    routed_experts: bool = True
    expert_r: int | None = None  # a separate (smaller) rank for routed experts; None = r
    expert_alpha: float | None = None  # None keeps alpha/r scaling equal to the attention LoRA's
    dtype: Literal["float32", "bfloat16"] = "float32"  # LoRA parameter precision (trained in this dtype)
    init_seed: int = 0


@dataclass
class DataConfig:
    train: str | None = None  # JSONL/JSON file or folder; None = the embedded chat data set
    eval: str | None = None  # separate held-out file; None = split eval_fraction off train
    eval_fraction: float = 0.1
    format: Literal["auto", "text", "instruction", "chat", "sharegpt", "prompt_completion"] = "auto"
    loss_on: Literal["assistant", "all", "last_turn"] = "assistant"
    packing: bool = True
    skip_invalid: bool = False
    shuffle: bool = True
    system_prompt: str | None = None


@dataclass
class TrainConfig:
    max_length: int = 2048
    batch_size: int = 1
    grad_accum: int = 8
    lr: float = 2e-5
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    optimizer: Literal["adamw_8bit", "adamw", "paged_adamw_8bit"] = "adamw_8bit"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    gradient_checkpointing: bool = True
    # With checkpointing: keep the routed experts' frozen gate/up outputs from each layer's first pass for its
    # recomputation: two fewer expert-bank decodes + grouped GEMMs per MoE layer and micro-step (~11 % of a Scout
    # step on an H200) for tokens x top_k x expert_intermediate x 4 bytes per MoE layer until backward (~2.9 GiB
    # on Scout at seq 2048, ~5.9 GiB at 4096). Off by default: memory first. `moefit plan` counts it.
    keep_routed_gate_up: bool = False
    # With checkpointing: each decoder layer's saved input kept in pinned host memory from its first pass until its
    # backward instead of on the GPU (models/offload.py): the GPU holds two or three of them instead of one per layer
    # (Scout at 8 x 2048 tokens per micro-step: 7.5 GiB less), the host that much more; the copies run on a stream of
    # their own under the layers' compute. The layers' first passes then run eagerly (no engine.layer_graphs).
    offload_checkpoints: bool = False
    # On a GPU, `auto` runs the same optimizer step (same sequences, same gradient: the loss is averaged over all
    # of its label tokens) in the fastest layout `moefit plan` finds that fits with margin: micro-batch x
    # grad_accum, the input embedding in host memory, kept gate/up outputs; the run says what it chose and
    # config.yaml records it. `as_written`: exactly the settings given.
    layout: Literal["auto", "as_written"] = "auto"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 42
    eval_every: int = 50
    eval_batches: int | None = None  # None = the whole eval split
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # CPU threads; None = torch's default


@dataclass
class SmokeConfig:
    steps: int = 20
    min_loss_drop: float = 0.0  # the smoke run fails unless the loss falls by more than this (relative)
    max_memory_gib: float | None = None  # fail when peak memory exceeds this; None = the plan's figure


@dataclass
class PlanConfig:
    gpu: str | None = None  # catalogue name (h100-80gb, h200, …); None = the GPU this machine has
    num_gpus: int = 1
    price_per_gpu_hour: float | None = None  # overrides the shipped price table
    dataset_tokens: int | None = None  # for run time / cost when the data is not at hand


@dataclass
class ParallelConfig:
    # Expert parallelism: every MoE layer's routed experts split over this many GPUs (it must divide the number
    # of experts); the rest of the model is replicated. GPUs = data-parallel replicas x expert.
    expert: int = 1


NF4GemmVariant = Literal["select-join", "select-gather", "lut-join", "lut-gather", "select-split", "shfl-split",
                         "shfl-join"]


@dataclass
class EngineConfig:
    """Kernel and host choices (docs/engine.md). The defaults are the fastest measured; the others exist for A/B
    runs.
    Applied by `load_model(..., engine=...)` for the whole process, and recorded in config.yaml and report.json."""

    expert_matmul: Literal["dequant", "fused"] = "dequant"  # fused: Triton grouped GEMM straight from NF4 (CUDA)
    nf4_gemm_variant: NF4GemmVariant = "select-join"  # the fused kernel's NF4 decode - weight-tile layout
    # triton*: moefit's NF4 decoder, bit-identical to bitsandbytes, its NF4 table read through a tree of selects
    # (triton), a load from the 16-entry table (triton-load) or a register gather (triton-gather). triton-load
    # decodes at 96 % of the copy rate (bitsandbytes 54 %) in one launch per weight (bitsandbytes: three); where
    # Triton cannot run (CPU, no Triton) bitsandbytes decodes. benchmarks/nf4_decode_variants.md, speed_targets.md
    nf4_decoder: Literal["bnb", "triton", "triton-load", "triton-gather"] = "triton-load"
    recompute_skip: bool = True  # skip the frozen projections the recomputation does not need (moe/recompute.py)
    # fused: one F.rms_norm per norm (models/rms_norm.py), bit-identical to transformers' (tests/test_rms_norm.py);
    # on an H200 Llama 3.1 8B ran 1.6x stock with transformers' norms, 2.0x fused (benchmarks/speed_targets.md)
    rms_norm: Literal["transformers", "fused"] = "fused"
    # The Python objects alive when the training loop starts (~480,000 with Scout built) out of the cyclic
    # garbage collector's reach for the loop (gc.freeze; moefit/host_gc.py): its full collections walked them
    # all, host pauses of up to 0.27 s every few micro-steps on the CPU measured (benchmarks/gc_pauses.md)
    gc_freeze: bool = True
    # The bf16 copies of the attention / shared-expert / dense LoRA weights kept from one optimizer step to the
    # next instead of cast in every pass (moefit/lora_copies.py): 2 launches less per adapted projection and pass,
    # one bf16 copy of those weights held (Scout r=32: 224 MB). With layer_graphs it serves the recomputation: on
    # an H200 the seed step (Scout 1 x 8) ran 2,446 -> 2,539 tok/s, every micro-step at the GPU's pace
    lora_cast_cache: bool = True
    # Each checkpointed decoder layer's first pass captured once per input shape as a CUDA graph and replayed (one
    # launch instead of ~170 per layer; moefit/models/layer_graphs.py); its recomputation and backward stay eager.
    # Holds one layer's first-pass temporaries in the graphs' own memory pool (planned). On an H200 the seed step
    # (Scout 1 x 8) ran 1,748 -> 2,446 tok/s, Qwen3-30B 1 x 2 2,701 -> 3,222 (benchmarks/speed_targets.md)
    layer_graphs: bool = True
    # With layer_graphs: each layer's recomputation and backward captured as a CUDA graph too (after its first
    # eager backward) and replayed: one launch instead of ~310 per Scout layer and micro-step, the LoRA gradients
    # accumulated after each replay (moefit/models/layer_graphs.py). Its memory sits in the graphs' pool (planned).
    # Kept under data parallelism (the ranks' gradients are summed after the last backward). On an H200
    # the seed step (Scout 1 x 8, real weights) ran 2,333 -> 2,561 tok/s, GPU busy 89 -> 99 %
    # (benchmarks/speed_targets.md)
    backward_graphs: bool = True


@dataclass
class RunConfig:
    model: str = TINY_MODEL
    output_dir: str | None = None
    quantization: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    smoke: SmokeConfig = field(default_factory=SmokeConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


_YAML11_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}.")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}.")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            return float(value)  # PyYAML reads `2e-5` (no dot) as a string; users mean the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}.")
        return value
    raise ConfigError(f"{key}: unsupported setting type {tp}.")  # pragma: no cover - schema bug


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
            raise ConfigError(f"unknown key '{prefix}{key}'.{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _check_values(cfg: RunConfig) -> None:
    """Values that have the right type but cannot work."""

    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {what}")

    t, lo, q, d = cfg.train, cfg.lora, cfg.quantization, cfg.data
    need(lo.r >= 1, "lora.r", f"must be at least 1, got {lo.r}.")
    need(lo.expert_r is None or lo.expert_r >= 0, "lora.expert_r", "must be 0 (no LoRA on routed experts) or more.")
    need(lo.alpha > 0, "lora.alpha", f"must be positive, got {lo.alpha}.")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}.")
    need(t.gradient_checkpointing or not t.offload_checkpoints, "train.offload_checkpoints",
         "offloads gradient checkpointing's saved layer inputs: set train.gradient_checkpointing: true too "
         "(or train.offload_checkpoints: false).")
    for i, name in enumerate(lo.targets):
        full = LORA_TARGET_ALIASES.get(name, name)
        need(full in LORA_TARGETS, f"lora.targets[{i}]",
             f"unknown target {name!r}; use any of q, k, v, o, gate, up, down (or their *_proj names).")
    need(q.blocksize in (64, 128, 256, 512, 1024, 2048, 4096), "quantization.blocksize",
         f"must be a power of two from 64 to 4096, got {q.blocksize}.")
    need(t.max_length >= 16, "train.max_length", f"must be at least 16 tokens, got {t.max_length}.")
    need(t.batch_size >= 1, "train.batch_size", f"must be at least 1, got {t.batch_size}.")
    need(t.grad_accum >= 1, "train.grad_accum", f"must be at least 1, got {t.grad_accum}.")
    need(t.lr > 0, "train.lr", f"must be positive, got {t.lr}.")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more.")
    need(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1].")
    need(t.weight_decay >= 0, "train.weight_decay", "must be 0 or more.")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "must be two numbers in [0, 1).")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be 0 (no clipping) or more.")
    need(t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}.")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be at least 1.")
    need(t.eval_every >= 1, "train.eval_every", "must be at least 1.")
    need(t.save_every >= 1, "train.save_every", "must be at least 1.")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1.")
    need(t.log_every >= 1, "train.log_every", "must be at least 1.")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         f"must be auto, cpu, cuda or cuda:N, got {t.device!r}.")
    need(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}.")
    need(cfg.smoke.steps >= 2, "smoke.steps", "must be at least 2 (the loss needs a start and an end).")
    need(cfg.plan.num_gpus >= 1, "plan.num_gpus", "must be at least 1.")
    need(cfg.parallel.expert >= 1, "parallel.expert", "must be at least 1 (1 = every GPU holds every expert).")


def _validated(values: dict[str, Any]) -> RunConfig:
    cfg = _build(RunConfig, values)
    _check_values(cfg)
    return cfg


def config_from_dict(values: dict[str, Any] | None, source: str = "config") -> RunConfig:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, got {type(values).__name__}.")
    try:
        return _validated(values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any] | None, source: str) -> RunConfig:
    """The settings of `source` with dotted overrides (`--set KEY=VALUE`) applied, validated. An error names
    what caused it: `source` when its own settings have the same problem, else the override without which the
    problem goes away (an override may also fix a setting of `source`)."""
    merged = _with_overrides(values, overrides or {})
    try:
        return config_from_dict(merged, source)
    except ConfigError:
        if not overrides:
            raise
    problem = _problem(merged)
    if _problem(values) != problem:
        for dotted, value in overrides.items():
            if _problem(_with_overrides(values, {k: v for k, v in overrides.items() if k != dotted})) != problem:
                shown = value if isinstance(value, str) else json.dumps(value)
                raise ConfigError(f"--set {dotted}={shown}: {problem.removeprefix(dotted + ': ')}")
    raise ConfigError(f"{source}: {problem}")


def _with_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(values)
    for dotted, value in overrides.items():
        _set_dotted(out, dotted, value)
    return out


def _problem(values: dict[str, Any]) -> str | None:
    """The first thing wrong with these settings, or None."""
    try:
        _validated(values)
    except ConfigError as e:
        return str(e)
    return None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config (None = all defaults, i.e. the embedded tiny run) and apply dotted overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found. Pass the path of a YAML run config (see recipes/).")
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', e)}.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read it as a text file ({e}). Pass a YAML run config.") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of settings, got {type(values).__name__}.")
        values = _resolve_relative_paths(values, p.parent)
    return apply_overrides(values, overrides, source)


def _resolve_relative_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data paths in a config file are relative to the file, as users expect."""
    data = values.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            v = data.get(key)
            if isinstance(v, str) and not Path(v).is_absolute() and not Path(v).exists():
                candidate = base / v
                if candidate.exists():
                    data[key] = str(candidate)
    return values


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    node = values
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section.")
    node[parts[-1]] = value


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def normalize_targets(targets: list[str]) -> list[str]:
    return [LORA_TARGET_ALIASES.get(t, t) for t in targets]

"""The `moefit bench` procedure: build synthetic model once, measure each sequence length, compare with the plan."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from .. import engine_switches
from ..config import EngineConfig, LoraConfig, QuantConfig, RunConfig, TrainConfig
from ..devices import cuda_index
from ..errors import MoefitError
from ..quant.nf4 import decoder_in_use
from .measure import cuda_time, measure_training
from .synthetic import SYNTHETIC_WEIGHTS, build_synthetic_model


def matmul_tflops(device: str = "cuda", n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 GEMM rate, the ceiling used for the FLOP fraction."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / cuda_time(lambda: a @ b, reps=reps, warmup=3) / 1e12


def bench(*, model: str = "llama4-scout", layers: int | None = None, seq_lens: list[int] = (2048,), batch: int = 1,
          rank: int = 32, expert_rank: int | None = None, targets: list[str] | None = None,
          optimizer: str = "adamw_8bit", steps: int = 3, warmup: int = 1, device: str = "cuda",
          embeddings_on_host: bool = False, grad_accum: int = 1, keep_routed_gate_up: bool = False,
          offload_checkpoints: bool = False,
          engine: EngineConfig | None = None, expert_parallel: int = 1,
          lora_dtype: str = "float32", layout: str = "as_written",
          memory_limit_bytes: int | None = None, fp32_linear_scales: bool | None = None) -> dict[str, Any]:
    """Build once, measure each sequence length. Under torchrun (`moefit bench --gpus N`) every rank does the same
    with the LoRA gradients summed over the ranks; the result (on every rank) holds each rank's peak memory and the
    total tokens/s of the ranks, against the plan for N GPUs.

    `layout="auto"`: the micro-batch layout is chosen as the trainer's `train.layout: auto` chooses it (the
    planner's faster layout of the same sequences per optimizer step that fits this GPU), recorded with the layout
    as written. `fp32_linear_scales`: None = quantization.fp32_linear_scales's default. `memory_limit_bytes`: cap
    the caching allocator (torch's per-process memory fraction) and plan for a GPU of that size, e.g. 80 GB on an
    H200 to stand in for an H100."""
    from ..parallel import dist as pdist
    from ..train.metrics import versions

    if fp32_linear_scales is None:  # the trainer's default
        fp32_linear_scales = QuantConfig().fp32_linear_scales
    for name, value, least in (("--batch", batch, 1), ("--grad-accum", grad_accum, 1), ("--steps", steps, 1),
                               ("--warmup", warmup, 0), ("--seq-len", min(seq_lens, default=0), 2)):
        if value < least:  # before building a model that can take minutes
            raise MoefitError(f"moefit bench {name} must be at least {least}, got {value}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoefitError("moefit bench needs a CUDA GPU (none is visible). Use `moefit plan` to predict memory "
                          "and time without one.")
    with pdist.process_group("cuda" if device.startswith("cuda") else "cpu") as ctx:
        if ctx.enabled and device == "cuda":
            device = f"cuda:{ctx.local_rank}"
        lora = LoraConfig(r=rank, alpha=2.0 * rank, expert_r=expert_rank,
                          routed_experts=expert_rank != 0, dtype=lora_dtype,
                          targets=targets or ["q", "k", "v", "o", "gate", "up", "down"])
        engine_switches.use(engine or EngineConfig())  # before the layout: its plan counts what the engine holds
        chosen = None
        if layout == "auto" or memory_limit_bytes:
            if device.startswith("cuda") and memory_limit_bytes:
                index = cuda_index(device)
                total = torch.cuda.get_device_properties(index).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit_bytes / total), index)
            if layout == "auto":
                if len(seq_lens) != 1:
                    raise MoefitError("moefit bench --layout auto measures one sequence length (--seq-len N).")
                chosen = choose_layout(model, lora, QuantConfig(embeddings_on_host=embeddings_on_host,
                                                                fp32_linear_scales=fp32_linear_scales),
                                       TrainConfig(max_length=seq_lens[0], batch_size=batch, grad_accum=grad_accum,
                                                   optimizer=optimizer, keep_routed_gate_up=keep_routed_gate_up,
                                                   offload_checkpoints=offload_checkpoints),
                                       device, memory_limit_bytes, ctx.world_size, expert_parallel, layers=layers)
                batch = chosen["settings"].get("train.batch_size", batch)
                grad_accum = chosen["settings"].get("train.grad_accum", grad_accum)
                embeddings_on_host = chosen["settings"].get("quantization.embeddings_on_host", embeddings_on_host)
                keep_routed_gate_up = chosen["settings"].get("train.keep_routed_gate_up", keep_routed_gate_up)
                offload_checkpoints = chosen["settings"].get("train.offload_checkpoints", offload_checkpoints)
                engine_changes = {k.removeprefix("engine."): v for k, v in chosen["settings"].items()
                                  if k.startswith("engine.")}  # (engine.layer_graphs, where their memory does not fit)
                if engine_changes:
                    engine_switches.use(dataclasses.replace(engine_switches.current(), **engine_changes))
        t0 = time.perf_counter()
        quant = QuantConfig(embeddings_on_host=embeddings_on_host, fp32_linear_scales=fp32_linear_scales)
        ep = None
        if expert_parallel > 1:  # each rank builds only its slice of the routed experts
            from ..parallel.expert_parallel import ExpertParallel, attach_dispatch
            from ..plan.model_facts import load_model_facts

            if ctx.world_size % expert_parallel:
                raise MoefitError(f"--expert-parallel {expert_parallel} needs a multiple of that many GPUs (--gpus), "
                                  f"got {ctx.world_size}.")
            ep = ExpertParallel.create(ctx.rank, ctx.world_size, expert_parallel, load_model_facts(model).num_experts)
        m = build_synthetic_model(model, num_layers=layers, quant=quant, lora=lora, device=device,
                                  expert_shard=ep.shard if ep else None)
        if ep:
            attach_dispatch(m, ep.shard, ep.group)
        build_s = time.perf_counter() - t0
        ceiling = matmul_tflops(device) if device.startswith("cuda") else None
        active = active_params_per_token(m.config)
        runs = []
        for seq in seq_lens:
            for p in m.parameters():
                p.grad = None
            r = measure_training(m, seq_len=seq, batch=batch, steps=steps, warmup=warmup, optimizer=optimizer,
                                 grad_accum=grad_accum, keep_routed_gate_up=keep_routed_gate_up,
                                 offload_checkpoints=offload_checkpoints)
            if ctx.enabled:
                gathered = pdist.gather_objects(r, ctx)
                r = _combine_ranks(gathered, ctx.world_size) if gathered else r
            r["flops_per_token"] = 6 * active
            # against world_size x one GPU's ceiling
            r["ceiling_fraction"] = (r["tokens_per_s"] * 6 * active / (ctx.world_size * ceiling * 1e12)) \
                if ceiling else 0.0
            train = TrainConfig(max_length=seq, batch_size=batch, grad_accum=grad_accum, optimizer=optimizer,
                                keep_routed_gate_up=keep_routed_gate_up, offload_checkpoints=offload_checkpoints)
            r["planned_peak_bytes"], r["plan_note"] = _planned_peak(model, layers, lora, quant, train, ctx.world_size,
                                                                    expert_parallel)
            runs.append(r)
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
        num_layers = m.config.num_hidden_layers
        del m, ep  # the model's expert dispatch holds the expert group: released before the group is destroyed
        return {"model": model, "layers": num_layers, "build_s": build_s, "device_name": name,
                "world_size": ctx.world_size, "expert_parallel": expert_parallel,
                "embeddings_on_host": embeddings_on_host, "keep_routed_gate_up": keep_routed_gate_up,
                "offload_checkpoints": offload_checkpoints,
                "fp32_linear_scales": fp32_linear_scales,
                "matmul_tflops": ceiling, "active_params_per_token": active, "lora": lora.__dict__,
                "layout": chosen, "memory_limit_bytes": memory_limit_bytes,
                "engine": engine_switches.current().__dict__, "nf4_decoder_used": decoder_in_use(device),
                "versions": versions(), "synthetic_weights": SYNTHETIC_WEIGHTS, "runs": runs}


def choose_layout(model: str, lora: LoraConfig, quant: QuantConfig, train: TrainConfig, device: str,
                  memory_limit_bytes: int | None, num_gpus: int = 1, expert_parallel: int = 1,
                  layers: int | None = None) -> dict[str, Any]:
    """What `train.layout: auto` runs for these settings on this GPU (or one of `memory_limit_bytes`): the planner's
    faster layout of the same optimizer step, as {"settings": dotted changes (empty: as written), "why": ...}.
    The plan describes the whole model: for a model cut to `layers` that does not fit whole, the layout stays as
    written (and says so) instead of refusing a run that fits."""
    import copy

    from ..train.loop import apply_layout, fit_check_lean_if_needed

    cfg = copy.deepcopy(RunConfig(model=model, lora=lora, quantization=quant, train=train,
                                  engine=engine_switches.current()))  # the settings this bench runs with
    cfg.parallel.expert = expert_parallel
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        label, memory = props.name, min(props.total_memory, memory_limit_bytes or props.total_memory)
    else:
        label, memory = "h200", memory_limit_bytes or 80 * 10**9  # no GPU here: plan the layout for an H200
    plan, refusal, lean = fit_check_lean_if_needed(cfg, label, memory, num_gpus)
    if refusal is not None and layers is None:
        raise MoefitError(refusal)
    if refusal is not None:
        from ..train.progress import fmt_bytes

        return {"settings": {}, "why": f"the layout as written: the whole model does not fit {fmt_bytes(memory)} "
                                      f"(no faster layout to plan); this bench runs it cut to {layers} layers",
                "as_written": _as_written(train, quant), "gpu_memory_bytes": memory}
    settings = dict(plan.faster_settings or {}) if plan.faster else {}
    for setting, value in lean.items():  # fits only with less on the GPU (the graphs' memory, the checkpoints)
        settings.setdefault(setting, value)
    apply_layout(cfg, settings)  # (checks every key is a setting)
    return {"settings": settings, "why": plan.faster or "the layout as written is the fastest that fits",
            "as_written": _as_written(train, quant), "gpu_memory_bytes": memory}


def _as_written(train: TrainConfig, quant: QuantConfig) -> dict[str, Any]:
    return {"batch": train.batch_size, "grad_accum": train.grad_accum,
            "embeddings_on_host": quant.embeddings_on_host, "keep_routed_gate_up": train.keep_routed_gate_up,
            "offload_checkpoints": train.offload_checkpoints}


def _combine_ranks(per_rank: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """Rank 0's view of a data-parallel measurement: every rank's peak memory, the slowest rank's step time and
    the tokens/s of all ranks together."""
    out = dict(per_rank[0])
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "outside_allocator_bytes"):
        if key in out:
            out[f"{key}_per_rank"] = [r[key] for r in per_rank]
            out[key] = max(r[key] for r in per_rank)
    out["step_s_per_rank"] = [r["step_s"] for r in per_rank]
    out["step_s"] = max(out["step_s_per_rank"])
    out["tokens_per_s"] = world_size * out["batch"] * out["seq_len"] * out["grad_accum"] / out["step_s"]
    return out


def _planned_peak(model: str, layers: int | None, lora: LoraConfig, quant: QuantConfig, train: TrainConfig,
                  num_gpus: int = 1, expert_parallel: int = 1) -> tuple[int | None, str | None]:
    """(planned peak allocated bytes, None) or (None, why there is no plan figure)."""
    if layers is not None:
        return None, "no plan figure for a model cut to --layers (the plan describes the whole model)"
    import copy

    from ..plan import plan

    cfg = copy.deepcopy(RunConfig(model=model, lora=lora, quantization=quant, train=train,
                                  engine=engine_switches.current()))
    cfg.plan.num_gpus, cfg.parallel.expert = num_gpus, expert_parallel
    try:
        p = plan(cfg, gpus=["h200"], search=False)
    except MoefitError as e:  # e.g. a config the planner does not know: the measurement still stands
        return None, f"no plan figure: {e}"
    return p.memory.peak_allocated, None


def active_params_per_token(config) -> int:
    """Parameters one token touches (attention, shared expert, top_k routed experts, router, lm_head), for the
    6 x active-params FLOP ceiling: the planner's count (plan.model_facts) of this transformers config."""
    from ..plan.model_facts import facts_from_config

    return facts_from_config(config.to_dict()).active_params_per_token()

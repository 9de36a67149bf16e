"""The `moefit bench` procedure: build synthetic model once, measure each sequence length, compare with the plan."""

from __future__ import annotations

import time
from typing import Any

import torch

from .config import EngineConfig, LoraConfig, QuantConfig, RunConfig, TrainConfig
from .errors import MoefitError


def matmul_tflops(device: str = "cuda", n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 GEMM rate, the ceiling used for the FLOP fraction."""
    from .bench import cuda_time

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / cuda_time(lambda: a @ b, reps=reps, warmup=3) / 1e12


def bench(*, model: str = "llama4-scout", layers: int | None = None, seq_lens: list[int] = (2048,), batch: int = 1,
          rank: int = 32, expert_rank: int | None = None, targets: list[str] | None = None,
          optimizer: str = "adamw_8bit", steps: int = 3, warmup: int = 1, device: str = "cuda",
          embeddings_on_host: bool = False, grad_accum: int = 1, keep_routed_gate_up: bool = False,
          engine: EngineConfig | None = None) -> dict[str, Any]:
    from . import engine_switches
    from .bench import active_params_per_token, build_synthetic_model, measure_training
    from .train.metrics import versions

    for name, value, least in (("--batch", batch, 1), ("--grad-accum", grad_accum, 1), ("--steps", steps, 1),
                               ("--warmup", warmup, 0), ("--seq-len", min(seq_lens, default=0), 2)):
        if value < least:  # before building a model that can take minutes
            raise MoefitError(f"moefit bench {name} must be at least {least}, got {value}.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoefitError("moefit bench needs a CUDA GPU (none is visible). Use `moefit plan` to predict memory "
                          "and time without one.")
    lora = LoraConfig(r=rank, alpha=2.0 * rank, expert_r=expert_rank,
                      routed_experts=expert_rank != 0,
                      targets=targets or ["q", "k", "v", "o", "gate", "up", "down"])
    engine_switches.use(engine or EngineConfig())
    t0 = time.perf_counter()
    quant = QuantConfig(embeddings_on_host=embeddings_on_host)
    m = build_synthetic_model(model, num_layers=layers, quant=quant, lora=lora, device=device)
    build_s = time.perf_counter() - t0
    ceiling = matmul_tflops(device) if device.startswith("cuda") else None
    active = active_params_per_token(m.config)
    runs = []
    for seq in seq_lens:
        for p in m.parameters():
            p.grad = None
        r = measure_training(m, seq_len=seq, batch=batch, steps=steps, warmup=warmup, optimizer=optimizer,
                             grad_accum=grad_accum, keep_routed_gate_up=keep_routed_gate_up)
        r["flops_per_token"] = 6 * active
        r["ceiling_fraction"] = (r["tokens_per_s"] * 6 * active / (ceiling * 1e12)) if ceiling else 0.0
        train = TrainConfig(max_length=seq, batch_size=batch, grad_accum=grad_accum, optimizer=optimizer,
                            keep_routed_gate_up=keep_routed_gate_up)
        r["planned_peak_bytes"], r["plan_note"] = _planned_peak(model, layers, lora, quant, train)
        runs.append(r)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"model": model, "layers": m.config.num_hidden_layers, "build_s": build_s, "device_name": name,
            "embeddings_on_host": embeddings_on_host, "keep_routed_gate_up": keep_routed_gate_up,
            "matmul_tflops": ceiling, "active_params_per_token": active, "lora": lora.__dict__,
            "engine": engine_switches.current().__dict__, "versions": versions(), "runs": runs}


def _planned_peak(model: str, layers: int | None, lora: LoraConfig, quant: QuantConfig, train: TrainConfig
                  ) -> tuple[int | None, str | None]:
    """(planned peak allocated bytes, None) or (None, why there is no plan figure)."""
    if layers is not None:
        return None, "no plan figure for a model cut to --layers (the plan describes the whole model)"
    from .plan import plan

    cfg = RunConfig(model=model, lora=lora, quantization=quant, train=train)
    try:
        p = plan(cfg, gpus=["h200"], search=False)
    except MoefitError as e:  # e.g. a config the planner does not know: the measurement still stands
        return None, f"no plan figure: {e}"
    return p.memory.peak_allocated, None

"""Measure training memory and speed at real shapes without downloading anything.

`build_synthetic_model` makes the model from a preset's config.json (or any config) directly in NF4 on the target
device, tensor by tensor from random numbers: the same modules, layouts and code paths as a loaded checkpoint,
no disk, no bf16 copy of the model. `measure_training` runs QLoRA steps on random tokens and reports peak
allocated / reserved memory and tokens/s. `moefit bench` drives both.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoraConfig, QuantConfig
from .errors import MoefitError
from .models.causal_lm import MoefitCausalLM
from .models.layers import MoefitLinear
from .moe.experts import EXPERT_PROJECTIONS, MoefitExperts
from .plan.model_facts import PRESETS, PRESETS_DIR


def load_config_json(model: str):
    """A preset name, a directory with config.json, or a config.json path -> transformers text config."""
    from transformers import AutoConfig

    from .models.build import text_config_of

    path = PRESETS_DIR / f"{model}.json"
    if not path.is_file():
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
    if not path.is_file():
        raise MoefitError(f"model {model!r}: not a preset ({', '.join(PRESETS)}) and no config.json there.")
    values = json.loads(path.read_text())
    model_type = values.pop("model_type")
    return text_config_of(AutoConfig.for_model(model_type, **values))


def truncate_layers(config, num_layers: int) -> None:
    """Keep the first `num_layers` decoder layers of a config: per-layer lists are cut, layer-index lists
    (`moe_layers`) keep the indices that still exist."""
    config.num_hidden_layers = num_layers
    for key in ("no_rope_layers", "layer_types"):
        value = getattr(config, key, None)
        if isinstance(value, list):
            setattr(config, key, value[:num_layers])
    moe_layers = getattr(config, "moe_layers", None)
    if isinstance(moe_layers, list):
        config.moe_layers = [i for i in moe_layers if i < num_layers]


@torch.no_grad()
def fill_synthetic(model: nn.Module, *, std: float, seed: int = 0) -> None:
    """Random weights for every tensor, generated and quantized on the tensors' own devices."""
    root = getattr(model, "hf", model)
    device = root.get_output_embeddings().weight.device  # (the input embedding may be in host memory)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape, dtype):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)

    owned = set()
    for name, module in root.named_modules():
        if isinstance(module, MoefitLinear):
            module.load_weight(randn((module.out_features, module.in_features), torch.bfloat16))
            owned.add(name)
        elif isinstance(module, MoefitExperts):
            for proj in EXPERT_PROJECTIONS:
                store = getattr(module, proj)
                for e in range(module.num_experts):
                    store.quantize_(randn(store.slice_shape, torch.bfloat16), expert=e)
            owned.add(name)
    for name, p in root.named_parameters():
        if any(name.startswith(o + ".") for o in owned) or p.requires_grad:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(randn(p.shape, p.dtype))
    for module in root.modules():  # persistent buffers, e.g. GLM-4.5's router correction bias: zero, not garbage
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and bname not in module._non_persistent_buffers_set \
                    and not isinstance(module, (MoefitLinear, MoefitExperts)):
                b.zero_()
    table = root.get_input_embeddings().weight
    if not isinstance(table, nn.Parameter):  # a HostEmbedding's buffer
        table.copy_(randn(table.shape, table.dtype))


def build_synthetic_model(model: str, *, num_layers: int | None = None, quant: QuantConfig | None = None,
                          lora: LoraConfig | None = None, device: str | torch.device = "cuda",
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0, expert_shard=None) -> MoefitCausalLM:
    """`expert_shard` (moefit.parallel.expert_parallel.ExpertShard): build only that slice of the routed experts
    (attach the dispatch before running it)."""
    from .lora import add_lora
    from .models.build import build_skeleton

    quant = quant or QuantConfig()
    config = load_config_json(model)
    if num_layers is not None:
        truncate_layers(config, num_layers)
    hf = build_skeleton(config, quant=quant, dtype=dtype, device=device, expert_shard=expert_shard)
    fill_synthetic(hf, std=getattr(config, "initializer_range", 0.02), seed=seed)
    out = MoefitCausalLM(hf, source=model, source_dir=None, quantization=quant.weights, dtype=dtype)
    if lora is not None:
        add_lora(out, cfg=lora)
    return out


def _lora(model: nn.Module) -> dict[str, nn.Parameter]:
    from .lora import lora_parameters

    return lora_parameters(model)


def _make_optimizer(params: list[nn.Parameter], name: str, lr: float = 1e-5):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.01)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.01)
    raise MoefitError(f"unknown optimizer {name!r}")


def measure_training(model: MoefitCausalLM, *, seq_len: int, batch: int, steps: int = 3, warmup: int = 1,
                     optimizer: str = "adamw_8bit", gradient_checkpointing: bool = True, grad_accum: int = 1,
                     seed: int = 0, keep_routed_gate_up: bool = False, profile_kernels: bool = True
                     ) -> dict[str, Any]:
    """QLoRA steps on random tokens. Each step: `grad_accum` micro-batches of [batch, seq_len], one optimizer
    step, gradients freed. Returns peak allocated/reserved bytes (over warmup + timed steps), mean step time and
    tokens/s over the timed steps; on CUDA with `profile_kernels`, one more (profiled) step for the GPU-busy
    fraction and the time in NCCL kernels.

    In a data-parallel process group (torchrun) the model is wrapped as the trainer wraps it (DDP over the LoRA
    parameters, gradients summed after the last micro-batch); the numbers are this rank's."""
    from .parallel import current_context
    from .parallel.data_parallel import grad_sync, wrap_model

    device = model.device
    cuda = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MoefitError("measure_training needs a model with LoRA parameters (add_lora).")
    if gradient_checkpointing:
        model.enable_gradient_checkpointing(keep_routed_gate_up=keep_routed_gate_up)
    model.train()
    ctx = current_context()
    from .parallel.expert_parallel import expert_lora_names

    held = expert_lora_names(model)  # the experts' own LoRA (expert parallelism): complete on its rank
    wrapped = wrap_model(model, ctx, exclude={id(p) for n, p in _lora(model).items() if n in held})
    opt = _make_optimizer(params, optimizer)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.config.vocab_size
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses = []

    def one_step() -> None:
        # No host sync between micro-steps (the losses stay on the device until the end), as in the trainer: the
        # host can queue the next micro-step while the GPU runs this one.
        for i in range(grad_accum):
            ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
            with grad_sync(wrapped, sync=i == grad_accum - 1):
                out = wrapped(ids.to(model.input_device), labels=ids.to(device))
                (out.loss / grad_accum).backward()
            losses.append(out.loss.detach())
        opt.step()
        opt.zero_grad(set_to_none=not ctx.enabled)  # DDP's gradients are views of its buckets: keep them

    times = []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        one_step()
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    result = {"seq_len": seq_len, "batch": batch, "grad_accum": grad_accum, "steps": steps,
              "step_s": step_s, "tokens_per_s": batch * seq_len * grad_accum / step_s,
              "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        free, total = torch.cuda.mem_get_info(device)
        # What this process holds outside the caching allocator (CUDA context, cuBLAS, NCCL's buffers), as the
        # device sees it now (another process on the same GPU would be counted too).
        result["outside_allocator_bytes"] = total - free - torch.cuda.memory_reserved(device)
    if ctx.enabled:
        result["world_size"] = ctx.world_size
        result["lora_grad_bytes"] = sum(p.numel() * p.element_size() for p in params)
    if cuda and profile_kernels:
        # One more step under the profiler: the GPU's kernel time against the unprofiled step time says whether
        # the GPU or the host CPU (issuing kernels) sets the pace; NCCL kernels (the gradient all-reduce, on its
        # own stream, overlapping the backward) are counted apart.
        result["kernel_s"], result["nccl_kernel_s"] = kernel_seconds(one_step, split_nccl=True)
        result["gpu_busy_fraction"] = result["kernel_s"] / step_s
    return result  # the optimizer (and its state) goes with this frame


def kernel_seconds(fn, split_nccl: bool = False):
    """Sum of the CUDA kernel times of one call of `fn` (torch.profiler, CUDA activity only); with `split_nccl`,
    (other kernels, NCCL kernels)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    if not split_nccl:
        return profiled_kernel_seconds(averages)
    nccl = profiled_kernel_seconds([e for e in averages if "nccl" in e.key.lower()])
    return profiled_kernel_seconds(averages) - nccl, nccl


def profiled_kernel_seconds(averages) -> float:
    """Total CUDA kernel time in a profiler's `key_averages()` (or a list of its entries), in seconds."""
    return sum(getattr(e, "self_device_time_total", 0.0) for e in averages
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6


def cuda_time(fn, reps: int = 10, warmup: int = 2) -> float:
    """Mean seconds per call of `fn` on the current CUDA stream (CUDA events, after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def active_params_per_token(config) -> int:
    """Parameters one token touches (attention, shared expert, top_k routed experts, router, lm_head), for the
    6 x active-params FLOP ceiling: the planner's count (plan.model_facts) of this transformers config."""
    from .plan.model_facts import facts_from_config

    return facts_from_config(config.to_dict()).active_params_per_token()

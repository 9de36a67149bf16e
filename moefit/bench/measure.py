"""Measure QLoRA steps: peak allocated / reserved memory, tokens/s and the GPU's kernel time."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch
from torch import nn

from .. import engine_switches
from ..errors import MoefitError
from ..host_gc import frozen_heap
from ..models.causal_lm import MoefitCausalLM, placed_batch
from ..models.layer_graphs import LayerGraphs, graph_pool_bytes


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
                     seed: int = 0, keep_routed_gate_up: bool = False, offload_checkpoints: bool = False,
                     profile_kernels: bool = True
                     ) -> dict[str, Any]:
    """QLoRA steps on random tokens. Each step: `grad_accum` micro-batches of [batch, seq_len], one optimizer
    step, gradients freed. Returns peak allocated/reserved bytes (over warmup + timed steps), mean step time and
    tokens/s over the timed steps; on CUDA with `profile_kernels`, one more (profiled) step for the GPU-busy
    fraction and the time in NCCL kernels.

    In a data-parallel process group (torchrun) the model is wrapped as the trainer wraps it (its LoRA
    gradients summed over the ranks after the last micro-batch); the numbers are this rank's."""
    from ..lora import lora_parameters
    from ..parallel import current_context
    from ..parallel.data_parallel import grad_sync, wrap_model
    from ..parallel.expert_parallel import expert_lora_names
    from .host_probe import host_op_seconds

    device = model.device
    cuda = device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MoefitError("measure_training needs a model with LoRA parameters (add_lora).")
    if gradient_checkpointing:
        model.enable_gradient_checkpointing(keep_routed_gate_up=keep_routed_gate_up,
                                            offload_checkpoints=offload_checkpoints)
    if model.layer_graphs is not None and model.layer_graphs.graphs:
        # Each measurement as a run of its own (a run replays one shape): fresh graphs. Those of an earlier
        # measurement's shapes would hold their memory here and push this one's shapes past the graphs kept per
        # layer (models.layer_graphs.MAX_SHAPES_PER_LAYER), so that it ran its first passes eagerly.
        model.use_layer_graphs(LayerGraphs(stand_in=model.layer_graphs.stand_in,
                                           masks_as_packed=model.layer_graphs.masks_as_packed,
                                           backward=model.layer_graphs.backward))
    model.train()
    ctx = current_context()
    held = expert_lora_names(model)  # the experts' own LoRA (expert parallelism): complete on its rank
    wrapped = wrap_model(model, ctx, exclude={id(p) for n, p in lora_parameters(model).items() if n in held})
    opt = _make_optimizer(params, optimizer)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.config.vocab_size
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    # CUDA events at each micro-step's start, before and after the optimizer step (on the stream: no host sync):
    # the device timeline's split of the last timed step, so a slower micro-step 2..grad_accum shows as itself.
    marks: list[torch.cuda.Event] = []

    def mark() -> None:
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()

    def one_step() -> None:
        # No host sync between micro-steps (the losses stay on the device until the end), as in the trainer: the
        # host can queue the next micro-step while the GPU runs this one.
        marks.clear()
        for i in range(grad_accum):
            mark()
            ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
            with grad_sync(wrapped, sync=i == grad_accum - 1):
                # placed as the trainer places its batches (labels in host memory: no host sync)
                out = wrapped(**placed_batch({"input_ids": ids, "labels": ids}, model, device))
                (out.loss / grad_accum).backward()
            losses.append(out.loss.detach())
        mark()
        opt.step()
        opt.zero_grad(set_to_none=not ctx.enabled)  # data parallelism's gradients are views of flat buffers
        mark()

    times = []
    with frozen_heap(engine_switches.current().gc_freeze):  # as the trainer's loop runs (moefit/host_gc.py)
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
    if marks:  # the last timed step, synchronized above: seconds between the marks
        spans = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:], strict=False)]
        result["micro_step_s"], result["optimizer_s"] = spans[:-1], spans[-1]
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        free, total = torch.cuda.mem_get_info(device)
        # What this process holds outside the caching allocator (CUDA context, cuBLAS, NCCL's buffers), as the
        # device sees it now (another process on the same GPU would be counted too).
        result["outside_allocator_bytes"] = total - free - torch.cuda.memory_reserved(device)
        result.update(graph_pool_bytes(device))
    # The host's speed at issuing ops, measured right after the steps on the same device (moefit.bench.host_probe):
    # host-bound step times of different machines differ by it.
    result["host_op_s"] = host_op_seconds(device)
    if ctx.enabled:
        result["world_size"] = ctx.world_size
        result["lora_grad_bytes"] = sum(p.numel() * p.element_size() for p in params)
    if cuda and profile_kernels:
        # One more step under the profiler: the GPU's kernel time against the unprofiled step time says whether
        # the GPU or the host CPU (issuing kernels) sets the pace; NCCL kernels (the gradient all-reduce, on its
        # own stream, overlapping the backward) are counted apart.
        result["kernel_s"], result["nccl_kernel_s"], result["kernel_launches"] = kernel_profile(one_step)
        result["gpu_busy_fraction"] = result["kernel_s"] / step_s
    if model.host_checkpoints is not None:  # train.offload_checkpoints: the most host memory held at once
        result["offloaded_checkpoint_bytes"] = model.host_checkpoints.peak_saved_bytes
    if model.layer_graphs is not None:  # engine.layer_graphs: what replayed, what ran eagerly
        result["layer_graphs"] = model.layer_graphs.stats()
    return result  # the optimizer (and its state) goes with this frame


def kernel_profile(fn) -> tuple[float, float, int]:
    """One call of `fn` under torch.profiler (CUDA activity only): (seconds of CUDA kernels other than NCCL's,
    seconds of NCCL kernels, how many kernels ran).

    The profiler is asked to tear CUPTI down when it stops (TEARDOWN_CUPTI=1, unless the environment says
    otherwise): Kineto otherwise leaves CUPTI attached, and every later kernel launch of the process pays for it
    (pytorch/pytorch#144455: 10-20 % slower training after a profile), which would slow whatever this process
    measures next (benchmarks/plan_validation.py measures configurations one after another in one process)."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    nccl = profiled_kernel_seconds([e for e in averages if "nccl" in e.key.lower()])
    return profiled_kernel_seconds(averages) - nccl, nccl, profiled_kernel_count(averages)


def kernel_seconds(fn, split_nccl: bool = False):
    """Sum of the CUDA kernel times of one call of `fn` (`kernel_profile`); with `split_nccl`, (other kernels,
    NCCL kernels)."""
    other, nccl, _ = kernel_profile(fn)
    return (other, nccl) if split_nccl else other + nccl


def profiled_kernel_seconds(averages) -> float:
    """Total CUDA kernel time in a profiler's `key_averages()` (or a list of its entries), in seconds."""
    return sum(getattr(e, "self_device_time_total", 0.0) for e in averages
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6


def profiled_kernel_count(averages) -> int:
    """How many CUDA kernels ran, from a profiler's `key_averages()` (or a list of its entries)."""
    return int(sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA))


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

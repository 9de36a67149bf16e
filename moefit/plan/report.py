"""Render a Plan as a text table or as a dict (JSON). Both print the same rounded numbers (`gib`, `hours`)."""

from __future__ import annotations

from typing import Any

GIB = 2**30


def gib(n: int | float) -> float:
    return round(n / GIB, 2)


def _hours(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def _targets(shape) -> list[str]:
    order = ("q", "k", "v", "o", "gate", "up", "down")
    return [t for t in order if t in shape.targets]


def _settings(plan) -> dict[str, Any]:
    s, lo, q = plan.shape, plan.shape.lora, plan.shape.quant
    return {
        "seq_len": s.seq_len, "batch": s.batch, "grad_accum": s.grad_accum,
        "tokens_per_micro_step": s.tokens, "lora_rank": lo.r, "expert_rank": s.expert_rank,
        "targets": _targets(s), "lora_dtype": lo.dtype, "optimizer": s.optimizer,
        "weights": q.weights, "double_quant": q.double_quant, "blocksize": q.blocksize,
        "gradient_checkpointing": s.gradient_checkpointing, "num_gpus": plan.cfg.plan.num_gpus, "expert_parallel": s.expert_parallel,
    }


# The same configuration, host-bound, ran this much slower on one H200 machine than on another (Llama 3.1 8B at
# micro-batch 1: 0.32 and 0.50 s per micro-step, benchmarks/speed_targets.md): the spread a host-bound plan carries.
HOST_SPREAD = 1.55


def host_bound(st) -> bool:
    """The host's share of a micro-step is large enough that the step depends on the machine's CPU: its time is at
    least 0.45 of the GPU's (measured: the GPU busy <= ~75 % from there on; Llama 3.1 8B at 1 x 2048 plans 0.48 and
    ran 40-52 % busy, Scout at 4 x 2048 plans 0.38 and ran 97 %)."""
    return st.gpu_s > 0 and st.overhead_s >= 0.45 * st.gpu_s


def plan_to_dict(plan) -> dict[str, Any]:
    m = plan.memory
    gpus = []
    for g in plan.gpus:
        st = g.step
        gpus.append({
            "gpu": g.gpu.name, "label": g.gpu.label, "num_gpus": g.num_gpus, "memory_gib": gib(g.gpu.memory_bytes),
            "fits": g.fits, "margin_bytes": g.margin_bytes, "margin_gib": gib(g.margin_bytes),
            "max_seq_len": g.max_seq_len, "max_batch": g.max_batch,
            "step_s": None if st is None else round(st.step_s, 3),
            "micro_step_s": None if st is None else round(st.micro_step_s, 3),
            "tokens_per_s": None if st is None else round(st.tokens_per_s),
            "run_hours": None if g.run_hours is None else round(g.run_hours, 2),
            "usd_per_gpu_hour": g.gpu.usd_per_hour, "price_source": g.gpu.price_source,
            "cost_usd": None if g.cost_usd is None else round(g.cost_usd, 2),
            "extrapolated": extrapolated(plan, g.num_gpus),
            "host_bound": None if st is None else host_bound(st),
            "time_breakdown_s": None if st is None else {
                "compute": round(st.compute_s, 4), "dequant_memory": round(st.memory_s, 4),
                "per_layer_overhead": round(st.overhead_s, 4), "optimizer": round(st.optimizer_s, 4),
                "allreduce": round(st.allreduce_s, 4), "alltoall": round(st.alltoall_s, 4),
                "flops_per_micro_step": st.flops_per_micro_step,
                "bytes_per_micro_step": st.bytes_per_micro_step},
        })
    return {
        "model": plan.model.summary(),
        "settings": _settings(plan),
        "memory": {
            "components": [{"key": c.key, "label": c.label, "kind": c.kind, "bytes": c.bytes, "gib": gib(c.bytes),
                            "detail": c.detail} for c in m.components],
            "peak_phase": m.peak_phase,
            "peak_allocated_bytes": m.peak_allocated, "peak_allocated_gib": gib(m.peak_allocated),
            "peak_reserved_bytes": m.peak_reserved, "peak_reserved_gib": gib(m.peak_reserved),
            "total_bytes": m.total, "total_gib": gib(m.total),
            "needed_bytes": m.needed, "needed_gib": gib(m.needed),
            "trainable_params": m.trainable_params,
        },
        "gpus": gpus,
        "fits": plan.fits,
        "suggestion": plan.suggestion,
        "faster": plan.faster,
        "faster_settings": plan.faster_settings,
        "hardware": [{"tier": h.tier, "gpu": h.gpu, "label": h.label, "num_gpus": h.num_gpus,
                      "margin_gib": gib(h.margin_bytes),
                      "run_hours": None if h.run_hours is None else round(h.run_hours, 2),
                      "cost_usd": None if h.cost_usd is None else round(h.cost_usd, 2), "why": h.why}
                     for h in plan.hardware],
        "run": {"steps": plan.steps, "steps_source": plan.steps_source},
        "calibration": plan.calibration_status,
    }


def extrapolated(plan, num_gpus: int) -> bool:
    """Whether a figure for `num_gpus` GPUs goes beyond the multi-GPU runs the constants were measured on (data
    parallel up to data_parallel_measured_gpus; expert parallel not yet)."""
    return num_gpus > plan.calibration.get("data_parallel_measured_gpus", 1) or plan.shape.expert_parallel > 1


def _lora_grad_bytes(m) -> int:
    return next((c.bytes for c in m.components if c.key == "lora_params"), 0)


def render_plan(plan) -> str:
    f, m, s = plan.model, plan.memory, plan.shape
    lines: list[str] = []
    arch = f"{f.family}, {f.num_layers} layers"
    if f.num_experts:
        arch += f" ({f.moe_layers} MoE), {f.num_experts} experts top-{f.top_k}"
    lines.append(f"moefit plan: {f.name} [{arch}; {f.total_params() / 1e9:.2f} B params, "
                 f"{f.active_params_per_token() / 1e9:.2f} B active per token]")
    q = s.quant
    wq = f"NF4{' double-quant' if q.double_quant else ''}" if q.weights == "nf4" else "bf16 (no quantization)"
    rank = f"r={s.lora.r}" + (f" (routed experts r={s.expert_rank})" if f.num_experts else "")
    lines.append(f"run: seq {s.seq_len} x batch {s.batch}, grad_accum {s.grad_accum}; LoRA {rank} on "
                 f"{','.join(_targets(s))}, {s.lora.dtype}; {s.optimizer}; weights {wq}")
    lines.append("")
    width = 46
    lines.append(f"{'peak memory, by component':{width}} {'GiB':>8}   notes")
    for c in m.components:
        lines.append(f"  {c.label:{width - 2}} {gib(c.bytes):8.2f}   {c.detail}")
    lines.append(f"  {'-' * (width - 2)} {'-' * 8}")
    lines.append(f"  {'peak allocated (torch max_memory_allocated)':{width - 2}} {gib(m.peak_allocated):8.2f}   "
                 f"at the {m.peak_phase}")
    lines.append(f"  {'peak reserved (torch max_memory_reserved)':{width - 2}} {gib(m.peak_reserved):8.2f}")
    lines.append(f"  {'TOTAL on the GPU (reserved + CUDA context)':{width - 2}} {gib(m.total):8.2f}")
    if m.releasable:
        lines.append(f"  {'needed (TOTAL less blocks freed on demand)':{width - 2}} {gib(m.needed):8.2f}   "
                     f"what a fit counts")
    lines.append("")
    head = (f"{'GPU':18} {'memory':>8} {'fits':>4} {'margin':>8} {'max seq':>8} {'max batch':>9} "
            f"{'step':>7} {'tok/s':>7} {'run':>8} {'$/GPU-h':>8} {'cost':>10}")
    lines.append(head)
    for g in plan.gpus:
        st = g.step
        lines.append(
            f"{(f'{g.num_gpus}x ' if g.num_gpus > 1 else '') + g.gpu.label:18} {gib(g.gpu.memory_bytes):8.2f} "
            f"{'yes' if g.fits else 'NO':>4} {gib(g.margin_bytes):+8.2f} {g.max_seq_len or '-':>8} "
            f"{g.max_batch or '-':>9} {'-' if st is None else f'{st.step_s:.2f}s':>7} "
            f"{'-' if st is None else f'{st.tokens_per_s:.0f}':>7} {_hours(g.run_hours):>8} "
            f"{_money(g.gpu.usd_per_hour):>8} {_money(g.cost_usd):>10}")
    lines.append("  (memory and margin in GiB; margin = GPU memory - needed (TOTAL less blocks freed on demand); "
                 "max seq at this batch, max batch at this seq; step = one optimizer step; run and cost only where "
                 "it fits)")
    n = s.num_gpus
    if n > 1:
        timed = [g.step for g in plan.gpus if g.step is not None]
        what = "the replicated part of the LoRA gradients" if s.expert_parallel > 1 else \
            f"the {gib(_lora_grad_bytes(m)):.2f} GiB of LoRA gradients"
        ar = f"; all-reduce of {what} once per step: " + \
            ", ".join(f"{st.allreduce_s * 1e3:.0f} ms" for st in timed) if timed else ""
        lines.append(f"data parallel: {n} GPUs, {s.batch * s.grad_accum * n} sequences per optimizer step (batch "
                     f"{s.batch} x grad_accum {s.grad_accum} x {n}); memory above is per GPU{ar}")
        if n > plan.calibration.get("data_parallel_measured_gpus", 1):
            lines.append(f"  {n} GPUs is extrapolated: data parallel was measured on up to "
                         f"{plan.calibration.get('data_parallel_measured_gpus', 1)} GPUs "
                         "(calibration.json data_parallel_measured_gpus).")
    if s.expert_parallel > 1:
        f_e = plan.model.num_experts
        a2a = ", ".join(f"{g.step.alltoall_s * 1e3:.0f} ms" for g in plan.gpus if g.step is not None)
        lines.append(f"expert parallel: each MoE layer's {f_e} routed experts split over {s.expert_parallel} GPUs "
                     f"({f_e // s.expert_parallel} each; memory above is per GPU), {n // s.expert_parallel} "
                     f"replica(s); all-to-all of the routed rows per optimizer step: {a2a or '-'}; measured on "
                     "2 H200s (benchmarks/expert_parallel.md).")
    lines.append("")
    lines.append(f"run length: {plan.steps if plan.steps else '?'} steps ({plan.steps_source})")
    if plan.hardware:
        lines.append("hardware:")
        for h in plan.hardware:
            lines.append(f"  {h.tier + ':':13} {h.num_gpus}x {h.label}, margin {gib(h.margin_bytes):.2f} GiB, "
                         f"run {_hours(h.run_hours)}, cost {_money(h.cost_usd)} ({h.why})")
    elif plan.hardware_checked:
        lines.append("hardware: no catalogue GPU fits this run on its own.")
    if plan.suggestion:
        lines.append(f"does not fit: {plan.suggestion}")
    bound = [g for g in plan.gpus if g.step is not None and host_bound(g.step)]
    if bound:
        st = bound[0].step
        lines.append(f"host share large on {', '.join(g.gpu.label for g in bound)}: the host issues kernels for "
                     f"{st.overhead_s:.2f} s of each micro-step's {st.gpu_s:.2f} s of GPU work ({bound[0].gpu.label}), "
                     f"so the step time depends on the machine's CPU (such steps measured up to {HOST_SPREAD:.2f}x "
                     "apart on two H200 machines). A larger micro-batch (train.layout: auto) moves the pace to the "
                     "GPU.")
    if plan.faster:
        lines.append(f"faster: {plan.faster}")
    lines.append(f"calibration: {plan.calibration_status}")
    return "\n".join(lines)

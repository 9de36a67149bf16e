"""`plan(...)`: memory, fit, time and cost of a run, from a RunConfig or keyword arguments. No torch here."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig, config_from_dict
from ..errors import ConfigError
from .calibration import load_calibration
from .gpus import Gpu, get_gpu, gpu_from_memory, gpu_names
from .hardware import HardwareChoice, choose_hardware
from .memory import MemoryEstimate, RunShape, estimate_memory, offloaded_host_bytes
from .model_facts import ModelFacts, load_model_facts
from .timing import StepTime, step_time

SEQ_GRANULE = 256  # the largest sequence length that fits is searched in steps of this many tokens
MAX_BATCH_SEARCH = 1024
FASTER_MIN_GAIN = 0.05  # a faster layout is reported when it saves at least this fraction of the step
FASTER_MIN_MARGIN = 0.05  # ... and leaves at least this fraction of the GPU's memory free (or the run's own margin)
FASTER_MAX_TOKENS = 16384  # tokens per micro-step: the largest the step-time model is validated on (plan_validation
# loo set: Scout 1 x 16384, Llama 3.1 8B 4 x 4096, Qwen3-30B 1 x 16384, within 10 % leave-one-out)


@dataclass
class GpuFit:
    gpu: Gpu
    num_gpus: int
    fits: bool
    total_bytes: int  # what the run needs on the GPU (MemoryEstimate.needed)
    margin_bytes: int  # GPU memory minus what the run needs (negative: does not fit)
    max_seq_len: int | None  # at the run's batch size; None = not even SEQ_GRANULE tokens fit
    max_batch: int | None  # at the run's sequence length; None = not even batch 1
    step: StepTime | None
    run_hours: float | None
    cost_usd: float | None


@dataclass
class Plan:
    model: ModelFacts
    cfg: RunConfig
    shape: RunShape
    memory: MemoryEstimate
    gpus: list[GpuFit]
    hardware: list[HardwareChoice]
    steps: int | None
    steps_source: str
    suggestion: str | None
    calibration_status: str
    requested_gpus: bool = True
    hardware_checked: bool = True
    faster: str | None = None  # the same optimizer step laid out faster on the (first) requested GPU
    faster_settings: dict[str, Any] | None = None  # that layout as the dotted config settings to change
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # the constants it was made with

    @property
    def fits(self) -> bool:
        """Fits on every GPU asked for (on any catalogue GPU when none was named)."""
        return all(g.fits for g in self.gpus) if self.requested_gpus else any(g.fits for g in self.gpus)

    def fit_for(self, gpu: str) -> GpuFit:
        for g in self.gpus:
            if g.gpu.name == gpu:
                return g
        raise KeyError(gpu)

    def to_dict(self) -> dict[str, Any]:
        from .report import plan_to_dict

        return plan_to_dict(self)

    def render(self) -> str:
        from .report import render_plan

        return render_plan(self)


# ---------------------------------------------------------------------------------------------- building

def _shape(cfg: RunConfig) -> RunShape:
    t = cfg.train
    return RunShape(seq_len=t.max_length, batch=t.batch_size, grad_accum=t.grad_accum, quant=cfg.quantization,
                    lora=cfg.lora, optimizer=t.optimizer, gradient_checkpointing=t.gradient_checkpointing,
                    keep_routed_gate_up=t.keep_routed_gate_up, offload_checkpoints=t.offload_checkpoints,
                    num_gpus=cfg.plan.num_gpus,
                    expert_parallel=cfg.parallel.expert, nf4_decoder=cfg.engine.nf4_decoder,
                    lora_cast_cache=cfg.engine.lora_cast_cache, layer_graphs=cfg.engine.layer_graphs,
                    backward_graphs=cfg.engine.backward_graphs)


def _with(shape: RunShape, **kw: Any) -> RunShape:
    lora_kw = {k: kw.pop(k) for k in list(kw) if k in ("expert_r", "routed_experts")}
    if lora_kw:
        kw["lora"] = dataclasses.replace(shape.lora, **lora_kw)
    return dataclasses.replace(shape, **kw)


def _run_steps(cfg: RunConfig, shape: RunShape) -> tuple[int | None, str]:
    if cfg.train.max_steps:
        return cfg.train.max_steps, "train.max_steps"
    tokens = cfg.plan.dataset_tokens
    if not tokens:
        return None, "unknown: set train.max_steps (--steps) or plan.dataset_tokens (--tokens)"
    per_step = shape.tokens * shape.grad_accum * cfg.plan.num_gpus
    steps = math.ceil(cfg.train.epochs * tokens / per_step)
    return steps, f"{cfg.train.epochs:g} epoch(s) x {tokens:,} tokens / {per_step:,} tokens per step (packed)"


class _Planner:
    """Holds what does not change between the candidate shapes and GPUs of one plan."""

    def __init__(self, cfg: RunConfig, calib: dict[str, Any]):
        self.cfg, self.calib = cfg, calib
        self.facts = load_model_facts(cfg.model)
        self.shape = _shape(cfg)
        self._cache: dict[str, MemoryEstimate] = {}

    def memory(self, shape: RunShape) -> MemoryEstimate:
        key = repr(shape)  # the configs inside hold lists: not hashable
        if key not in self._cache:
            self._cache[key] = estimate_memory(self.facts, shape, self.calib)
        return self._cache[key]

    def fits(self, shape: RunShape, gpu: Gpu) -> bool:
        return self.memory(shape).needed <= gpu.memory_bytes

    def max_seq(self, gpu: Gpu, shape: RunShape) -> int | None:
        hi_limit = self.facts.max_positions // SEQ_GRANULE
        if not self.fits(_with(shape, seq_len=SEQ_GRANULE), gpu):
            return None
        lo, hi = 1, 2
        while hi <= hi_limit and self.fits(_with(shape, seq_len=hi * SEQ_GRANULE), gpu):
            lo, hi = hi, hi * 2
        hi = min(hi, hi_limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(_with(shape, seq_len=mid * SEQ_GRANULE), gpu) else (lo, mid)
        return lo * SEQ_GRANULE

    def max_batch(self, gpu: Gpu, shape: RunShape) -> int | None:
        if not self.fits(_with(shape, batch=1), gpu):
            return None
        lo, hi = 1, 2
        while hi <= MAX_BATCH_SEARCH and self.fits(_with(shape, batch=hi), gpu):
            lo, hi = hi, hi * 2
        hi = min(hi, MAX_BATCH_SEARCH + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(_with(shape, batch=mid), gpu) else (lo, mid)
        return lo

    def gpu_fit(self, gpu: Gpu, num_gpus: int, steps: int | None, search: bool = True) -> GpuFit:
        """The run on `num_gpus` of `gpu` in data parallel (per-GPU memory; the run's time and cost)."""
        shape = _with(self.shape, num_gpus=num_gpus)
        mem = self.memory(shape)
        margin = gpu.memory_bytes - mem.needed
        st = step_time(self.facts, shape, gpu, self.calib, mem.by_key(), num_gpus)
        hours = steps * st.step_s / 3600 if (st and steps and margin >= 0) else None
        cost = hours * num_gpus * gpu.usd_per_hour if (hours is not None and gpu.usd_per_hour is not None) \
            else None
        return GpuFit(gpu, num_gpus, margin >= 0, mem.needed, margin,
                      self.max_seq(gpu, shape) if search else None,
                      self.max_batch(gpu, shape) if search else None, st, hours, cost)

    def faster_shape(self, fit: GpuFit) -> tuple[RunShape, StepTime, MemoryEstimate] | None:
        """The same optimizer step (sequences per step, hence the same gradient: the loss is averaged over all its
        label tokens) laid out faster on this GPU, when one fits: a bigger micro-batch with fewer accumulation
        steps (each NF4 weight is decoded once per micro-batch), the input embedding in host memory, the routed
        experts' gate/up outputs kept for the recomputation, the layers' saved inputs in host memory. None when
        nothing saves FASTER_MIN_GAIN of the step
        with FASTER_MIN_MARGIN of the GPU's memory free (or the margin the run has, if that is less), within
        FASTER_MAX_TOKENS per micro-step."""
        s, f = self.shape, self.facts
        if not fit.fits or fit.step is None:
            return None
        per_step = s.batch * s.grad_accum
        hosts = {s.quant.embeddings_on_host} | ({True} if not f.tied_embeddings else set())
        keeps = {s.keep_routed_gate_up} | ({True} if f.num_experts and s.gradient_checkpointing else set())
        # engine.layer_graphs pays at small micro-batches (the host sets their pace) and holds a pool that grows
        # with the micro-batch: a larger one may fit, and be faster, without it
        # (engine.layer_graphs, engine.backward_graphs); the backward's graphs share that pool and may outgrow it
        graphs = {(s.layer_graphs, s.backward_graphs)} | ({(s.layer_graphs, False)} if s.backward_graphs else set()) \
            | ({(False, False)} if s.layer_graphs else set())
        # train.offload_checkpoints: the saved layer inputs in host memory (the first passes then eager: no graphs)
        offloads = {s.offload_checkpoints} | ({True} if s.gradient_checkpointing else set())
        room = fit.gpu.memory_bytes - min(fit.margin_bytes, int(FASTER_MIN_MARGIN * fit.gpu.memory_bytes))
        best, best_s = None, fit.step.step_s * (1 - FASTER_MIN_GAIN)
        for b in (d for d in range(1, per_step + 1)
                  if per_step % d == 0 and (d * s.seq_len <= FASTER_MAX_TOKENS or d <= s.batch)):
            for host, keep, graph, off in itertools.product(sorted(hosts), sorted(keeps), sorted(graphs, reverse=True),
                                                            sorted(offloads)):
                if off and graph != (False, False) and (False, False) in graphs:
                    continue  # offloaded, the graphs do not run: one candidate, with them off
                cand = dataclasses.replace(s, batch=b, grad_accum=per_step // b, keep_routed_gate_up=keep,
                                           quant=dataclasses.replace(s.quant, embeddings_on_host=host),
                                           layer_graphs=graph[0], backward_graphs=graph[1], offload_checkpoints=off)
                mem = self.memory(cand)
                if cand == s or mem.needed > room:
                    continue
                st = step_time(f, cand, fit.gpu, self.calib, mem.by_key(), fit.num_gpus)
                if st and st.step_s < best_s:
                    best, best_s = (cand, st, mem), st.step_s
        return best

    def faster_layout(self, fit: GpuFit) -> tuple[str, dict[str, Any]] | None:
        """`faster_shape` as the settings to change: in words, and as dotted config settings."""
        found = self.faster_shape(fit)
        if found is None:
            return None
        (best, st, mem), s = found, self.shape
        settings: dict[str, Any] = {}
        if best.batch != s.batch:
            settings.update({"train.batch_size": best.batch, "train.grad_accum": best.grad_accum})
        if best.quant.embeddings_on_host != s.quant.embeddings_on_host:
            settings["quantization.embeddings_on_host"] = best.quant.embeddings_on_host
        if best.keep_routed_gate_up != s.keep_routed_gate_up:
            settings["train.keep_routed_gate_up"] = best.keep_routed_gate_up
        if best.offload_checkpoints != s.offload_checkpoints:
            settings["train.offload_checkpoints"] = best.offload_checkpoints
        if best.layer_graphs != s.layer_graphs:
            settings["engine.layer_graphs"] = best.layer_graphs
        elif best.backward_graphs != s.backward_graphs:
            settings["engine.backward_graphs"] = best.backward_graphs
        changes = [f"{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
        gib = 2**30
        per_gpu = " per GPU" if fit.num_gpus > 1 else ""
        return (f"the same {s.batch * s.grad_accum} sequences{per_gpu} per optimizer step run faster on "
                f"{fit.gpu.label} with "
                f"{', '.join(changes)}: {st.step_s:.2f} s per step instead of {fit.step.step_s:.2f} s, "
                f"{mem.needed / gib:.1f} GiB of {fit.gpu.memory_bytes / gib:.1f} (margin "
                f"{(fit.gpu.memory_bytes - mem.needed) / gib:.1f} GiB instead of {fit.margin_bytes / gib:.1f})."
                ), settings

    def expert_parallel_fit(self, gpu: Gpu, most: int = 64) -> tuple[int, MemoryEstimate] | None:
        """The fewest GPUs of this kind that hold the run with the routed experts split over them (expert
        parallelism; the count divides the number of experts), with the per-GPU memory; None if none up to `most`."""
        f, s = self.facts, self.shape
        if not f.num_experts:
            return None
        for n in range(max(2, s.expert_parallel + 1), min(f.num_experts, most) + 1):
            if f.num_experts % n:
                continue
            cand = _with(s, expert_parallel=n, num_gpus=max(n, s.num_gpus))
            if self.fits(cand, gpu):
                return n, self.memory(cand)
        return None

    def suggestion(self, fit: GpuFit) -> str | None:
        if fit.fits:
            return None
        s, ideas = self.shape, []
        if s.quant.fp32_linear_scales and s.quant.double_quant and s.quant.weights == "nf4":
            lean = dataclasses.replace(s, quant=dataclasses.replace(s.quant, fp32_linear_scales=False))
            if self.fits(lean, fit.gpu):
                saved = (fit.total_bytes - self.memory(lean).needed) / 2**30
                ideas.append(f"the linears' NF4 scales left double-quantized: quantization.fp32_linear_scales false "
                             f"fits ({saved:.2f} GiB less, a little slower)")
        graph_settings = (("backward_graphs", s.replays_backward, "recomputation and backward"),
                          ("layer_graphs", s.replays_first_pass, "first passes"))
        for setting, in_effect, passes in graph_settings:
            eager = dataclasses.replace(s, **{setting: False})
            if in_effect and self.fits(eager, fit.gpu):
                saved = (fit.total_bytes - self.memory(eager).needed) / 2**30
                ideas.append(f"the layers' {passes} issued by the host instead of replayed from CUDA graphs: "
                             f"engine.{setting} false fits ({saved:.2f} GiB less; slower where the host sets the "
                             f"pace, at small micro-batches)")
        offloaded = dataclasses.replace(s, offload_checkpoints=True)
        if s.gradient_checkpointing and not s.offload_checkpoints and self.fits(offloaded, fit.gpu):
            saved = (fit.total_bytes - self.memory(offloaded).needed) / 2**30
            ideas.append(f"the layers' saved inputs in host memory: train.offload_checkpoints true fits ({saved:.2f} "
                         f"GiB less on the GPU, {offloaded_host_bytes(self.facts, s) / 2**30:.1f} GiB of pinned host "
                         f"memory)")
        if fit.max_seq_len and fit.max_seq_len < s.seq_len:
            ideas.append(f"a shorter sequence: train.max_length {fit.max_seq_len} fits (--seq-len {fit.max_seq_len})")
        if s.batch > 1 and fit.max_batch:
            ideas.append(f"a smaller micro-batch: train.batch_size {fit.max_batch} fits "
                         f"(raise train.grad_accum to keep the tokens per step)")
        re = s.expert_rank
        if self.facts.num_experts and re:
            for cand in sorted({max(re // 2**i, 1) for i in range(1, 8)} | {0}, reverse=True):
                if cand < re and self.fits(_with(s, expert_r=cand, routed_experts=cand > 0), fit.gpu):
                    ideas.append(f"a smaller expert rank: lora.expert_r {cand} fits (--expert-rank {cand})"
                                 if cand else "no LoRA on routed experts: lora.expert_r 0 fits (--expert-rank 0)")
                    break
        ep = self.expert_parallel_fit(fit.gpu)
        if ep is not None:
            n, mem = ep
            ideas.append(f"expert parallelism: {n}x {fit.gpu.label} with parallel.expert {n} (--expert-parallel {n} "
                         f"--num-gpus {n}), {mem.total / 2**30:.1f} GiB per GPU")
        bigger = sorted((get_gpu(n, self.cfg.plan.price_per_gpu_hour) for n in gpu_names()),
                        key=lambda g: g.memory_bytes)
        for g in bigger:
            if g.memory_bytes > fit.gpu.memory_bytes and self.fits(s, g):
                ideas.append(f"a bigger GPU: {g.label} (--gpu {g.name})")
                break
        need = -fit.margin_bytes / 2**30
        head = f"needs {fit.total_bytes / 2**30:.1f} GiB, {need:.1f} GiB more than {fit.gpu.label} has."
        if not ideas:
            return head + " Nothing in reach fits: use more memory per GPU or a smaller model."
        return head + " Options: " + "; ".join(ideas) + "."


def _merge_kwargs(cfg: RunConfig | None, kw: dict[str, Any]) -> RunConfig:
    """Apply plan(...)'s keyword arguments onto a RunConfig (defaults when none is given)."""
    values = cfg.to_dict() if cfg is not None else {}
    mapping = {
        "model": ("model",), "seq_len": ("train", "max_length"), "batch": ("train", "batch_size"),
        "grad_accum": ("train", "grad_accum"), "rank": ("lora", "r"), "expert_rank": ("lora", "expert_r"),
        "targets": ("lora", "targets"), "steps": ("train", "max_steps"), "epochs": ("train", "epochs"),
        "tokens": ("plan", "dataset_tokens"), "optimizer": ("train", "optimizer"),
        "num_gpus": ("plan", "num_gpus"), "price_per_gpu_hour": ("plan", "price_per_gpu_hour"),
        "expert_parallel": ("parallel", "expert"),
        "routed_experts": ("lora", "routed_experts"), "lora_dtype": ("lora", "dtype"),
        "quantization": ("quantization", "weights"), "double_quant": ("quantization", "double_quant"),
    }
    for key, value in kw.items():
        if value is None:
            continue
        if key not in mapping:
            raise ConfigError(f"plan(): unknown argument {key!r}; known: {', '.join(sorted(mapping))}, gpus.")
        node = values
        *parents, leaf = mapping[key]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    if kw.get("expert_rank") == 0:
        values.setdefault("lora", {})["routed_experts"] = False
    return config_from_dict(values, "plan()")


def plan(cfg: RunConfig | str | None = None, *, gpus: list[str] | str | None = None,
         calibration: dict[str, Any] | None = None, search: bool = True, **kwargs: Any) -> Plan:
    """Plan a run. `cfg`: a RunConfig, or a YAML path; keyword arguments (model=, seq_len=, batch=, rank=,
    expert_rank=, targets=, grad_accum=, steps=, epochs=, tokens=, num_gpus=, optimizer=) override it.
    `gpus`: catalogue names; None = cfg.plan.gpu, else the whole catalogue."""
    if isinstance(cfg, str):
        from ..config import load_config

        cfg = load_config(cfg)
    cfg = _merge_kwargs(cfg, kwargs)
    if cfg.parallel.expert > cfg.plan.num_gpus:  # expert parallelism takes that many GPUs at least
        cfg.plan.num_gpus = cfg.parallel.expert
    if cfg.plan.num_gpus % cfg.parallel.expert:
        raise ConfigError(f"plan.num_gpus {cfg.plan.num_gpus} is not a multiple of parallel.expert "
                          f"{cfg.parallel.expert}: GPUs = data-parallel replicas x expert.")
    if isinstance(gpus, str):
        gpus = [gpus]
    requested = bool(gpus) or cfg.plan.gpu is not None
    names = list(gpus) if gpus else ([cfg.plan.gpu] if cfg.plan.gpu else gpu_names())
    price = cfg.plan.price_per_gpu_hour
    return _build_plan(cfg, [get_gpu(n, price) for n in names], calibration, requested, search)


def check_fits(cfg: RunConfig, gpu: str | None = None, gpu_memory_bytes: int | None = None,
               calibration: dict[str, Any] | None = None) -> Plan:
    """What the trainer calls before it starts: the plan for `cfg` on one GPU (catalogue name, and/or the
    memory the device reports). `plan.fits` says whether to start; `plan.suggestion` what to change."""
    if gpu_memory_bytes is not None:
        g = gpu_from_memory(gpu_memory_bytes, gpu, cfg.plan.price_per_gpu_hour)
    elif gpu is not None:
        g = get_gpu(gpu, cfg.plan.price_per_gpu_hour)
    elif cfg.plan.gpu is not None:
        g = get_gpu(cfg.plan.gpu, cfg.plan.price_per_gpu_hour)
    else:
        raise ConfigError("check_fits: name the GPU (gpu=...) or give its memory (gpu_memory_bytes=...).")
    return _build_plan(cfg, [g], calibration, True, search=True, hardware=False)


def _build_plan(cfg: RunConfig, gpus: list[Gpu], calibration: dict[str, Any] | None, requested: bool,
                search: bool, hardware: bool = True) -> Plan:
    calib = calibration or load_calibration()
    p = _Planner(cfg, calib)
    steps, steps_source = _run_steps(cfg, p.shape)
    n = cfg.plan.num_gpus
    fits = [p.gpu_fit(g, n, steps, search) for g in gpus]
    hw: list[HardwareChoice] = []
    if hardware:
        price = cfg.plan.price_per_gpu_hour
        def same_tokens(k: int) -> int | None:  # the same tokens on k GPUs in data parallel: fewer steps
            return math.ceil(steps * n / k) if steps else None

        group = max(p.shape.expert_parallel, 1)  # expert parallelism needs at least its group of GPUs
        singles = [p.gpu_fit(get_gpu(name, price), group, same_tokens(group), search=False) for name in gpu_names()]
        hw = choose_hardware(singles, lambda name, k: p.gpu_fit(get_gpu(name, price), k, same_tokens(k),
                                                                 search=False), group)
    first_bad = next((f for f in fits if not f.fits), None)
    if not requested:  # the whole catalogue: advise only when nothing fits, for the largest GPU
        first_bad = None if any(f.fits for f in fits) else max(fits, key=lambda f: f.gpu.memory_bytes)
    status = "fitted on " + str(calib["measured_on"]) if calib.get("measured_on") else \
        "first-principles constants, not yet fitted to GPU measurements"
    for section, when in calib.get("sections_measured_on", {}).items():
        status += f"; {section} constants refitted on {when}"
    faster, faster_settings = (p.faster_layout(fits[0]) if requested and fits and fits[0].fits else None) or \
        (None, None)
    return Plan(p.facts, cfg, p.shape, p.memory(p.shape), fits, hw, steps, steps_source,
                p.suggestion(first_bad) if first_bad else None, status, requested, hardware, faster,
                faster_settings, calib)

"""The training loop, written out in one place.

micro-batches -> loss weighted by label tokens -> backward -> (after grad_accum of them) clip -> optimizer step
-> scheduler step; evaluation at the start, every `train.eval_every` steps and at the end; checkpoints every
`train.save_every` steps; metrics, report and loss curve in the run directory.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import RunConfig, save_config
from ..data.dataset import padding_fraction
from ..devices import pick_device
from ..errors import ConfigError, DataError, MoefitError
from ..host_gc import frozen_heap
from ..labels import IGNORE_INDEX
from ..models import offload
from ..models.causal_lm import placed_batch
from ..models.layer_graphs import graph_pool_bytes
from ..parallel import dist as pdist
from ..parallel import expert_parallel
from ..parallel.data_parallel import grad_sync, take_step, wrap_model
from ..quant.nf4 import decoder_in_use
from . import checkpoint as ckpt
from . import failures, preempt, rundir_guard, verify
from .metrics import MetricsLog, plot_loss, versions, write_report
from .optim import build_optimizer, build_scheduler, steps_per_epoch, total_optimizer_steps
from .progress import Console, fmt_bytes, fmt_duration, peak_memory_bytes, progress_line
from .smoke import SmokeResult, judge_smoke


@dataclass
class RunResult:
    """What `train()` returns. `completed` is False when the run stopped early (`stop_after`)."""

    run_dir: Path
    completed: bool
    step: int
    total_steps: int
    start_eval_loss: float | None
    end_eval_loss: float | None
    train_losses: list[float] = field(default_factory=list)  # per optimizer step run in this process
    tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_mem_bytes: int = 0
    adapter_dir: Path | None = None
    smoke: SmokeResult | None = None
    report: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- setup

def resolve_device(name: str, ctx: pdist.DistContext = pdist.SINGLE) -> torch.device:
    """The device of train.device; with several ranks on CUDA, the GPU of this process's local rank."""
    if ctx.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", ctx.local_rank)
    if name == "auto":
        return pick_device(name)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoefitError(f"train.device is {name!r} but this machine has no CUDA device (torch "
                          f"{torch.__version__}). Use train.device: cpu or auto.")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is not None:
        if dev.index >= torch.cuda.device_count():
            raise MoefitError(f"train.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist.")
        torch.cuda.set_device(dev.index)
    return dev


def model_short_name(model: str) -> str:
    name = Path(model.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def default_run_dir(cfg: RunConfig, smoke: bool) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{model_short_name(cfg.model)}{'-smoke' if smoke else ''}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs. Data-parallel rank r uses seed + r, so LoRA dropout differs between ranks
    (the data order has its own seed and is the same on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _label_tokens(labels: torch.Tensor) -> int:
    """Label tokens under the HF shift convention (position t predicts token t+1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------------ eval

@torch.no_grad()
def evaluate(model: Any, examples: list[dict], batch_size: int, pad_id: int, device: torch.device,
             max_batches: int | None, ctx: pdist.DistContext = pdist.SINGLE, equal_passes: bool = False
             ) -> tuple[float, int]:
    """Token-weighted mean loss over the held-out examples; returns (loss, label tokens). With several ranks each
    evaluates its share of the batches and the sums are added up (`equal_passes` under expert parallelism)."""
    from ..evaluate import heldout_sums

    was_training = model.training
    model.eval()
    try:
        loss_sum, tokens = heldout_sums(model, examples, batch_size, pad_id, device, max_batches,
                                        ctx.rank, ctx.world_size, equal_passes)
    finally:
        model.train(was_training)
    loss_sum, tokens = pdist.all_reduce_sum([loss_sum, float(tokens)], ctx)
    return (loss_sum / tokens if tokens else float("nan")), int(tokens)


# ------------------------------------------------------------------------------------------------- run

# Unpacked rows are padded to train.max_length for the layer graphs only while that adds at most this share of
# padding; beyond it the graphs are turned off (rows of many lengths would otherwise capture a graph per shape,
# each holding its own outputs, and run the rest eagerly).
UNPACKED_PADDING_LIMIT = 0.10


def graphs_replay(cfg: RunConfig, device: torch.device) -> bool:
    """Whether the layers' first passes are replayed from CUDA graphs in this run (engine.layer_graphs on a GPU,
    checkpointing on, no expert parallelism, the checkpoints not offloaded: the graphs hold them on the GPU)."""
    return bool(cfg.engine.layer_graphs and cfg.train.gradient_checkpointing and device.type == "cuda"
                and cfg.parallel.expert == 1 and not cfg.train.offload_checkpoints)


def graph_pad_length(cfg: RunConfig, device: torch.device, sequences: list | None = None) -> int | None:
    """The length every micro-batch is padded to so that the CUDA graphs of the layers' first passes
    (engine.layer_graphs) see one shape: train.max_length where they replay and the rows are packed (nearly full
    anyway), or unpacked `sequences` that padding to it costs at most UNPACKED_PADDING_LIMIT; None: each batch as
    long as its longest row."""
    if not graphs_replay(cfg, device):
        return None
    if cfg.data.packing or (sequences and padding_fraction(sequences, cfg.train.max_length) <= UNPACKED_PADDING_LIMIT):
        return cfg.train.max_length
    return None


def apply_layout(cfg: RunConfig, settings: dict[str, Any]) -> None:
    """Set the planner's faster layout (dotted settings, e.g. `train.batch_size`) on `cfg`, in place."""
    for dotted, value in settings.items():
        section, _, key = dotted.partition(".")
        node = getattr(cfg, section)
        if not hasattr(node, key):
            raise KeyError(dotted)
        setattr(node, key, value)


def _expert_parallel(cfg: RunConfig, ctx: pdist.DistContext, say: Any) -> expert_parallel.ExpertParallel | None:
    """The expert-parallel layout of this run (parallel.expert > 1), its process groups created; None without."""
    size = cfg.parallel.expert
    if size <= 1:
        return None
    from ..plan.model_facts import load_model_facts

    if ctx.world_size < size:
        raise MoefitError(f"parallel.expert is {size} but this run has {ctx.world_size} process(es): start at least "
                          f"{size} (moefit train --gpus {size}, or torchrun --nproc-per-node {size}).")
    experts = load_model_facts(cfg.model).num_experts
    if not experts:
        raise MoefitError(f"parallel.expert is {size} but {cfg.model} has no routed experts: leave it at 1.")
    try:
        ep = expert_parallel.ExpertParallel.create(ctx.rank, ctx.world_size, size, experts)
    except ValueError as e:
        raise MoefitError(f"parallel.expert: {e}") from None
    workers = "GPUs" if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl" \
        else "processes"
    say(f"expert parallel: {size} {workers} share each MoE layer's {experts} routed experts ({experts // size} each), "
        f"{ctx.world_size // size} replica(s)")
    return ep


def _match_sequences_per_step(cfg: RunConfig, saved: ckpt.TrainerState, ctx: pdist.DistContext, say: Any) -> None:
    """Resuming on another number of processes: keep the checkpoint's sequences per optimizer step (hence the same
    gradient, schedule and data order) by changing train.grad_accum, or refuse when no grad_accum does it."""
    t = cfg.train
    per_step = saved.sequences_per_step or t.batch_size * t.grad_accum * saved.world_size
    now = t.batch_size * t.grad_accum * ctx.world_size
    if per_step == now:
        return
    per_rank_micro = t.batch_size * ctx.world_size
    if per_step % per_rank_micro:
        raise MoefitError(f"the checkpoint's run took {per_step} sequences per optimizer step "
                          f"({saved.world_size} process(es)); with {ctx.world_size} process(es) and "
                          f"train.batch_size {t.batch_size} no train.grad_accum gives that. Resume on a number of "
                          f"GPUs that divides {per_step // t.batch_size}, or set train.batch_size (--set).")
    old = t.grad_accum
    t.grad_accum = per_step // per_rank_micro
    say(f"resuming on {ctx.world_size} process(es) instead of {saved.world_size}: train.grad_accum {old} -> "
        f"{t.grad_accum}, so each optimizer step still takes {per_step} sequences (same data order and gradient).")


def _warn_on_chunked_packing(cfg: RunConfig, say: Any) -> None:
    """Say so when this transformers would give packed samples other attention chunks than they have alone."""
    import json

    from ..data.packing import chunked_packing_problem
    from ..plan.model_facts import resolve_config_path

    if not cfg.data.packing:
        return
    try:
        raw = json.loads(resolve_config_path(cfg.model).read_text(encoding="utf-8"))
    except (ConfigError, OSError, ValueError):
        return  # the loader says why
    problem = chunked_packing_problem(raw, cfg.train.max_length)
    if problem is not None:
        say(f"warning: {problem}")


def fit_check(cfg: RunConfig, gpu_label: str, gpu_memory_bytes: int, num_gpus: int = 1):
    """The planner's verdict for this GPU (one of `num_gpus` in data parallel): (plan, None) when the run fits,
    (plan, message) when it does not."""
    import copy

    from ..plan import check_fits
    from ..plan.gpus import match_device_name

    planned = copy.deepcopy(cfg)
    planned.plan.num_gpus = num_gpus
    # The device's catalogue entry ('NVIDIA H200' -> h200) gives the plan its speed: without it there is no step
    # time, hence no faster layout for train.layout: auto.
    plan = check_fits(planned, gpu=cfg.plan.gpu or match_device_name(gpu_label), gpu_memory_bytes=gpu_memory_bytes)
    if plan.fits:
        return plan, None
    return plan, (f"the run does not fit on this {gpu_label} ({fmt_bytes(gpu_memory_bytes)}): predicted "
                  f"{fmt_bytes(plan.memory.needed)} on the GPU "
                  f"(peak allocated {fmt_bytes(plan.memory.peak_allocated)})."
                  f" {plan.suggestion or ''} Run `moefit plan` for the breakdown, or pass --force to try anyway.")


def fit_check_lean_if_needed(cfg: RunConfig, gpu_label: str, gpu_memory_bytes: int, num_gpus: int = 1,
                             offload: bool = True):
    """`fit_check`, and when the run does not fit but would with less memory on the GPU, the settings that make it
    fit changed in `cfg`: the CUDA graphs' memory given up (their pool grows with the tokens per micro-batch, and
    with engine.backward_graphs holds a layer's recompute + backward working set), the backward's first, then the
    first pass's; then, with `offload`, the layers' saved inputs in host memory (train.offload_checkpoints: the
    same gradient, pinned host memory instead). Returns (plan, message or None, the settings changed, e.g.
    {"engine.backward_graphs": False}). Where nothing fits, `cfg` is left as it was."""
    plan, refusal = fit_check(cfg, gpu_label, gpu_memory_bytes, num_gpus)
    if refusal is None:
        return plan, None, {}
    changes: dict[str, bool] = {}
    steps = [("engine", "backward_graphs", False), ("engine", "layer_graphs", False)]
    if offload and cfg.train.gradient_checkpointing:
        steps.append(("train", "offload_checkpoints", True))
    for section, name, value in steps:
        node = getattr(cfg, section)
        if getattr(node, name) != value:
            setattr(node, name, value)
            changes[f"{section}.{name}"] = value
            lean_plan, msg = fit_check(cfg, gpu_label, gpu_memory_bytes, num_gpus)
            if msg is None:
                return lean_plan, None, changes
    apply_layout(cfg, {k: not v for k, v in changes.items()})
    return plan, refusal, {}


def describe_lean_changes(changes: dict[str, bool]) -> str:
    """What `fit_check_lean_if_needed` changed, in words."""
    off = [k for k, v in changes.items() if v is False]
    parts = [f"{' and '.join(off)} off (the host issues those layer passes instead of CUDA graphs)"] if off else []
    if changes.get("train.offload_checkpoints"):
        parts.append("train.offload_checkpoints on (the layers' saved inputs in host memory)")
    return f"{'; '.join(parts)}: the run fits this GPU only with less on the GPU"


def run(
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    resume_from: Path | None = None,
    smoke: bool = False,
    smoke_steps: int | None = None,
    force: bool = False,
    stop_after: int | None = None,
    echo: bool = True,
    overwrite: bool = False,
) -> RunResult:
    """Train as `cfg` says. `resume_from` is a complete checkpoint folder (see checkpoint.resolve_resume).

    `smoke` runs `smoke_steps` optimizer steps (default `smoke.steps`) at the recipe's peak learning rate
    (warmup shortened to a fifth of the steps, then constant) without checkpoints, then judges the run.
    `stop_after` ends the run after that many optimizer steps in total, as a kill would (the schedule is the
    full run's; no final adapter): `resume_from` then continues it. `overwrite` lets a new run replace the files
    of an earlier one in `run_dir` (rundir_guard.claim). SIGTERM/SIGINT stop after the current optimizer step with
    a checkpoint and raise preempt.Preempted.
    """
    wall0 = time.perf_counter()
    with pdist.process_group(resolve_device(cfg.train.device).type) as ctx:
        return _run_in_dir(cfg, ctx, wall0, run_dir, resume_from, smoke, smoke_steps, force, stop_after, echo,
                           overwrite)


def _choose_run_dir(cfg: RunConfig, run_dir: Path | None, resume_from: Path | None, smoke: bool,
                    overwrite: bool = False) -> tuple[Path | None, str | None]:
    """(the run directory, None) or (None, why it cannot be used). A new run claims the folder
    (rundir_guard.claim: a non-empty one is refused, or with `overwrite` cleared of the earlier run's files)."""
    if resume_from is not None:
        return ckpt.run_dir_of(resume_from), None
    if run_dir is None:
        run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg, smoke)
    run_dir = Path(run_dir)
    try:
        rundir_guard.claim(run_dir, overwrite)
    except MoefitError as e:
        return None, str(e)
    return run_dir, None


def _run_in_dir(cfg: RunConfig, ctx: pdist.DistContext, wall0: float, run_dir: Path | None,
                resume_from: Path | None, smoke: bool, smoke_steps: int | None, force: bool,
                stop_after: int | None, echo: bool, overwrite: bool) -> RunResult:
    """Rank 0 chooses the run directory (a default one has a timestamp), picks the checkpoint that verifies and
    is the only one to write the directory."""
    resuming, chosen, problem, notes = resume_from is not None, None, None, []
    if ctx.is_main:
        chosen, problem = _choose_run_dir(cfg, run_dir, resume_from, smoke, overwrite)
        if resuming and problem is None:
            try:
                resume_from, notes = rundir_guard.resume_point(resume_from, cfg)
            except MoefitError as e:
                problem = str(e)
    chosen, problem, resume_str, notes = pdist.broadcast_object(
        (str(chosen) if chosen else None, problem, str(resume_from) if resume_from else None, notes), ctx)
    if problem:
        raise MoefitError(problem)
    run_dir, resume_from = Path(chosen), (Path(resume_str) if resume_str else None)
    if resuming and resume_from is None:  # a finished run: nothing to do, nothing written
        if echo and ctx.is_main:
            print(notes[0])
        return rundir_guard.finished_result(run_dir, rundir_guard.finished_report(run_dir) or {})
    created = not run_dir.exists()
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    cfg.output_dir = str(run_dir)
    console = Console(run_dir / "train.log" if ctx.is_main else None, echo=echo and ctx.is_main)
    for note in notes:
        console.print(note)
    try:
        with preempt.stop_on_signals() as stop:
            return _run(cfg, ctx, run_dir, console, wall0, resume_from, smoke, smoke_steps, force, stop_after, stop)
    except torch.OutOfMemoryError:
        raise MoefitError(failures.oom_message(cfg, run_dir)) from None
    except MoefitError:
        # A run that could not start (bad data, does not fit) leaves no folder behind; the error says why.
        console.close()
        if ctx.is_main and created and not (run_dir / "checkpoints").exists() \
                and not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
        if latest is not None:
            console.print(f"\ninterrupted; the newest checkpoint is {latest}. Continue with: "
                          f"moefit train --resume {run_dir}")
        raise
    finally:
        console.close()


def _run(cfg: RunConfig, ctx: pdist.DistContext, run_dir: Path, console: Console, wall0: float,
         resume_from: Path | None, smoke: bool, smoke_steps: int | None, force: bool, stop_after: int | None,
         stop: preempt.StopFlag) -> RunResult:
    from ..data import DataPosition, build_datasets, iterate_batches, load_tokenizer
    from ..data.dataset import any_packed, fingerprint
    from ..lora import add_lora, save_adapter
    from ..models import load_model

    t = cfg.train
    say = console.print
    device = resolve_device(t.device, ctx)
    if device.type == "cpu" and t.num_threads:
        torch.set_num_threads(t.num_threads)
    elif device.type == "cpu" and ctx.local_world_size > 1:  # the host's cores shared by its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    seed_everything(t.seed + ctx.rank)
    mode = "smoke run" if smoke else ("resuming" if resume_from else "training")
    say(f"moefit {mode}: {cfg.model} -> {run_dir}")
    if ctx.enabled:
        say(f"data parallel: {ctx.world_size} processes ({ctx.local_world_size} on this host), "
            f"{'NCCL' if device.type == 'cuda' else 'gloo'}; only rank 0 writes the run directory")
    say(f"device {device}{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}"
        f"{' per process' if ctx.enabled else ''}, "
        f"weights {cfg.quantization.weights}, compute {t.precision}, LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} "
        f"on {','.join(cfg.lora.targets)}{' (routed experts too)' if cfg.lora.routed_experts else ''}")

    # Data first: a broken file should fail in seconds, not after loading a 100B model.
    _warn_on_chunked_packing(cfg, say)
    tok = load_tokenizer(cfg.model)
    bundle = build_datasets(cfg.data, tok, max_length=t.max_length, seed=t.seed)
    for line in bundle.report.summary_lines():
        say(line)
    if not bundle.train:
        raise DataError("the training split is empty after tokenization and filtering: nothing to train on. "
                        "Check data.train and train.max_length (see the data report above).")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # Fits? (CUDA only: the planner models GPU memory; on CPU there is nothing to refuse.)
    plan = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        plan, msg, lean = fit_check_lean_if_needed(cfg, props.name, props.total_memory, ctx.world_size,
                                                   offload=t.layout == "auto")
        if lean:
            say(describe_lean_changes(lean))
        if msg is not None:
            if not force:
                raise MoefitError(msg)
            say(f"warning (--force): {msg}")
        elif plan.faster and t.layout == "auto" and resume_from is None:
            apply_layout(cfg, plan.faster_settings)
            say(f"layout (train.layout: auto): {plan.faster} Set train.layout: as_written to keep the "
                "settings as given.")
            plan, _ = fit_check(cfg, props.name, props.total_memory, ctx.world_size)  # the layout that runs
        elif plan.faster:
            say(f"plan: {plan.faster}")

    identity = verify.run_identity(cfg, fingerprint(bundle.train))  # before a resume on other ranks adapts it
    ep = _expert_parallel(cfg, ctx, say)
    if resume_from is not None:
        saved = ckpt.read_trainer_state(resume_from)
        if (saved.expert_parallel > 1 or ep is not None) and \
                (saved.expert_parallel, saved.world_size) != (cfg.parallel.expert, ctx.world_size):
            raise MoefitError(f"the checkpoint was written by {saved.world_size} process(es) with parallel.expert "
                              f"{saved.expert_parallel}; an expert-parallel run resumes on the same layout only "
                              f"(now {ctx.world_size} process(es), parallel.expert {cfg.parallel.expert}).")
        _match_sequences_per_step(cfg, saved, ctx, say)
    if ctx.is_main:
        save_config(cfg, run_dir / "config.yaml")
    world = ctx.world_size
    total_steps = total_optimizer_steps(t, len(bundle.train), world)
    per_epoch = steps_per_epoch(len(bundle.train), t.batch_size, t.grad_accum, world)
    if smoke:
        total_steps = smoke_steps if smoke_steps is not None else cfg.smoke.steps
        if total_steps < 2:
            raise MoefitError(f"--steps must be at least 2 for a smoke run (the loss needs a start and an end), "
                              f"got {total_steps}.")
    stop_step = total_steps if stop_after is None else min(stop_after, total_steps)

    t_load = time.perf_counter()
    model = load_model(cfg.model, quantization=cfg.quantization.weights, dtype=t.precision,
                       device=device.type, quant=cfg.quantization, engine=cfg.engine,
                       expert_shard=ep.shard if ep else None)
    params = add_lora(model, cfg=cfg.lora)
    expert_names = expert_parallel.expert_lora_names(model) if ep else set()
    if ep:
        expert_parallel.attach_dispatch(model, ep.shard, ep.group)
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing(keep_routed_gate_up=t.keep_routed_gate_up,
                                            offload_checkpoints=t.offload_checkpoints)
        if t.offload_checkpoints:
            say(offload.check_host_memory(model.hf, t.batch_size, t.max_length,
                                          int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    rows = model.hf.get_input_embeddings().weight.shape[0]
    top = max(max(s["input_ids"]) for s in bundle.train + bundle.eval)
    if top >= rows:
        raise MoefitError(f"the tokenizer of {cfg.model} produced token id {top}, but the model's embedding has "
                          f"only {rows} rows: the tokenizer files and the weights do not belong together.")
    n_train = sum(p.numel() for p in params.values())
    say(f"model loaded in {time.perf_counter() - t_load:.1f}s; {n_train:,} trainable LoRA parameters "
        f"in {len(params)} tensors")

    optimizer = build_optimizer(params, t, device, note=say)
    if smoke:
        scheduler = build_scheduler(optimizer, t, total_steps, warmup_steps=min(t.warmup_steps, total_steps // 5),
                                    kind="constant")
    else:
        scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None

    state = ckpt.TrainerState(step=0, data_epoch=0, data_index=0, tokens_seen=0, label_tokens_seen=0,
                              elapsed_s=0.0, train_time_s=0.0, start_eval_loss=None)
    if resume_from is not None:
        state, rng_restored = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, scaler, rank=ctx.rank)
        if not rng_restored:  # a rank the checkpoint's run did not have: a fresh stream of its own
            seed_everything(t.seed + ctx.rank + 7919 * state.step)
        seeded = pdist.all_reduce_sum([0.0 if rng_restored else 1.0], ctx)[0]
        if seeded:
            say(f"note: {int(seeded)} rank(s) had no RNG state in the checkpoint (it was written by "
                f"{state.world_size} process(es)); their LoRA dropout draws from a new seed.")
        say(f"resumed from {resume_from} (step {state.step}/{total_steps}, data epoch {state.data_epoch} "
            f"item {state.data_index})")
        for warning in verify.identity_changes(resume_from, identity):
            say(warning)
    state.world_size, state.sequences_per_step = world, t.batch_size * t.grad_accum * world
    state.expert_parallel = cfg.parallel.expert
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step if resume_from else None) \
        if ctx.is_main else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    trainable = [p for p in params.values() if p.requires_grad]
    experts = [p for n, p in params.items() if n in expert_names and p.requires_grad]
    replicated = [p for n, p in params.items() if n not in expert_names and p.requires_grad]
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
    has_eval = bool(bundle.eval) and not smoke
    # Data parallelism over the (replicated) LoRA parameters when several ranks; the experts' own LoRA
    # gradients are complete on their rank (expert parallelism) and summed over replicas by `ep`.
    wrapped = wrap_model(model, ctx, exclude={id(p) for p in experts})

    def whole_adapter() -> dict[str, torch.Tensor] | None:
        """The whole model's LoRA on rank 0 (every rank must call it under expert parallelism)."""
        return ep.whole_lora_state(model) if ep else None

    def write_metrics(record: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(record)

    def run_eval(step: int) -> float:
        te = time.perf_counter()
        loss, n = evaluate(model, bundle.eval, t.batch_size, pad_id, device, t.eval_batches, ctx,
                           equal_passes=ep is not None)
        write_metrics({"kind": "eval", "step": step, "eval_loss": loss, "eval_tokens": n,
                       "eval_s": round(time.perf_counter() - te, 3)})
        say(f"eval @ step {step}: held-out loss {loss:.4f} ({n:,} label tokens, {time.perf_counter() - te:.1f}s)")
        return loss

    if not bundle.eval and not smoke:
        say("no held-out split (data.eval is empty and data.eval_fraction is 0): evaluation is skipped.")
    model.train()
    if has_eval and state.step == 0:
        state.start_eval_loss = run_eval(0)
    evals_done = metrics.eval_records() if metrics is not None else []
    last_eval_step, last_eval_loss = pdist.broadcast_object(
        (evals_done[-1]["step"], evals_done[-1]["eval_loss"]) if evals_done else (-1, None), ctx)

    say(f"{total_steps} optimizer steps ({per_epoch} per epoch of {len(bundle.train)} sequences), batch "
        f"{t.batch_size} x accumulation {t.grad_accum}, lr {t.lr:g} {'constant (smoke)' if smoke else t.scheduler}")
    pad_to = graph_pad_length(cfg, device, bundle.train)
    if graphs_replay(cfg, device):  # (pad_to is set only then, and is t.max_length)
        share = padding_fraction(bundle.train, t.max_length)
        if pad_to:
            say(f"micro-batches padded to train.max_length {pad_to} for engine.layer_graphs (one shape to replay): "
                f"{100 * share:.1f} % of their tokens are padding")
        elif model.layer_graphs is not None:
            model.layer_graphs.disabled = (f"unpacked rows of many lengths (padded to train.max_length "
                                           f"{t.max_length} they would be {100 * share:.0f} % padding)")
            say(f"engine.layer_graphs off for this run: {model.layer_graphs.disabled}; data.packing true keeps them")
    if model.layer_graphs is not None:
        # one graph per layer: packed rows' masks for all rows, unless none is packed (then the causal ones)
        model.layer_graphs.masks_as_packed = any_packed(bundle.train, pad_to or t.max_length)
    batches = iterate_batches(bundle.train, t.batch_size, t.seed,
                              start=DataPosition(state.data_epoch, state.data_index), pad_id=pad_id, pad_to=pad_to)
    step_losses: list[float] = []
    session_t0, session_tokens, session_train_s = time.perf_counter(), 0, 0.0
    elapsed_base = state.elapsed_s
    nan_step = None
    # the process's long-lived Python objects (imports, the model) out of the collector's full collections (host_gc)
    with frozen_heap(cfg.engine.gc_freeze):
        while state.step < stop_step:
            ts = time.perf_counter()
            # This rank's micro-batches of the step; the label tokens and tokens of the whole step (all ranks).
            step = take_step(batches, t.grad_accum, ctx, _label_tokens)
            pos, step_label_tokens, step_tokens = step.position, step.label_tokens, step.tokens
            denom = max(step_label_tokens, 1)
            loss_acc = torch.zeros((), dtype=torch.float32, device=device)
            for i, (batch, count) in enumerate(zip(step.mine, step.mine_label_tokens, strict=True)):
                batch = placed_batch(batch, model, device)
                with grad_sync(wrapped, sync=i == len(step.mine) - 1):  # ranks' gradients summed after the last one
                    out = wrapped(**batch)
                    if int(out.num_tokens) != count:
                        raise RuntimeError(f"label-token count mismatch: loop counted {count}, "
                                           f"model {int(out.num_tokens)}")
                    loss = out.loss_sum / denom  # the gradient of the step = that of the mean over all its label tokens
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_acc += out.loss_sum.detach().float()
            if scaler:
                scaler.unscale_(optimizer)
            if ep:
                ep.reduce_expert_grads(experts)
                grad_norm = ep.clip_grad_norm_(replicated, experts, max_norm)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            lr = scheduler.get_last_lr()[0]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            # data parallelism's gradients are views of flat buffers: keep them
            optimizer.zero_grad(set_to_none=not ctx.enabled)

            step_loss = pdist.all_reduce_sum([float(loss_acc)], ctx)[0] / denom
            state.step += 1
            state.data_epoch, state.data_index = pos.epoch, pos.index
            state.tokens_seen += step_tokens
            state.label_tokens_seen += step_label_tokens
            state.train_time_s += time.perf_counter() - ts
            session_train_s += time.perf_counter() - ts
            session_tokens += step_tokens
            step_losses.append(step_loss)
            state.elapsed_s = elapsed_base + time.perf_counter() - session_t0
            tok_s = session_tokens / max(session_train_s, 1e-9)  # training only: evals are not in it; all ranks
            logged = state.step % t.log_every == 0 or state.step == stop_step or not math.isfinite(step_loss)
            peaks = pdist.all_gather_int(peak_memory_bytes(device), ctx) if logged else [peak_memory_bytes(device)]
            peak = max(peaks)
            if logged:
                record = {"kind": "train", "step": state.step, "loss": step_loss, "lr": lr,
                          "tokens_per_s": round(tok_s, 2), "peak_mem_bytes": peak, "grad_norm": grad_norm,
                          "elapsed_s": round(state.elapsed_s, 3), "tokens": state.tokens_seen,
                          "label_tokens": step_label_tokens, "epoch": state.data_epoch}
                if ctx.enabled:
                    record["peak_mem_bytes_per_rank"] = peaks
                write_metrics(record)
            done_s = time.perf_counter() - session_t0
            eta = done_s / len(step_losses) * (stop_step - state.step)
            console.status(progress_line(state.step, total_steps, step_loss, lr, grad_norm, tok_s, peaks, eta),
                           permanent=state.step % t.log_every == 0 or state.step == stop_step)
            bad = failures.non_finite(step_loss, grad_norm if scaler is None else 0.0)  # fp16: the scaler skips inf
            if bad:
                nan_step = state.step
                if smoke:
                    break
                raise MoefitError(failures.nan_message(bad, state.step, t, run_dir))
            if has_eval and state.step % t.eval_every == 0:
                last_eval_loss = run_eval(state.step)
                last_eval_step = state.step
            stopping = stop.agreed(ctx) and state.step < total_steps
            path = None
            if not smoke and (state.step % t.save_every == 0 or state.step == total_steps or stopping):
                rngs = pdist.gather_objects(ckpt.capture_rng(), ctx)
                adapter_state = whole_adapter()
                # Expert parallelism: every rank's optimizer state is its own (its experts' moments)
                optimizers = pdist.gather_objects(optimizer.state_dict(), ctx) if ep else None
                path = run_dir / "checkpoints" / f"step-{state.step}"
                if ctx.is_main:
                    ckpt.save_checkpoint(run_dir / "checkpoints", state, model, optimizer, scheduler, scaler,
                                         rank_rngs=rngs, identity=identity, adapter_state=adapter_state,
                                         rank_optimizers=optimizers)
                    ckpt.prune_checkpoints(run_dir / "checkpoints", t.keep_checkpoints)
                    say(f"checkpoint: {path}")
            if stopping:
                raise stop.preempted(state.step, path, run_dir)

    completed = state.step >= total_steps
    if not completed and nan_step is None:
        say(f"stopped after step {state.step} of {total_steps} (resume with --resume {run_dir}).")
        return RunResult(run_dir=run_dir, completed=False, step=state.step, total_steps=total_steps,
                         start_eval_loss=state.start_eval_loss, end_eval_loss=None, train_losses=step_losses,
                         tokens=state.tokens_seen, wall_s=time.perf_counter() - wall0)

    end_eval = None
    if has_eval:
        end_eval = run_eval(state.step) if last_eval_step != state.step else last_eval_loss
    adapter_dir = None
    if not smoke:
        adapter_state = whole_adapter()
        if ctx.is_main:
            save_adapter(model, run_dir, state=adapter_state)
        adapter_dir = run_dir
    peaks = pdist.all_gather_int(peak_memory_bytes(device), ctx)
    peak = max(peaks)
    wall = time.perf_counter() - wall0
    tok_s = state.tokens_seen / state.train_time_s if state.train_time_s else 0.0

    smoke_result = None
    if smoke:
        limit, source_note = None, "smoke.max_memory_gib"
        if cfg.smoke.max_memory_gib is not None:
            limit = int(cfg.smoke.max_memory_gib * 2**30)
        elif plan is not None:
            limit, source_note = int(plan.memory.peak_allocated * 1.05), "the plan's predicted peak + 5 %"
        smoke_result = judge_smoke(step_losses, peak, limit, cfg.smoke.min_loss_drop, source_note)

    report = {
        "run_dir": str(run_dir),
        "mode": "smoke" if smoke else "train",
        "model": cfg.model,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({torch.get_num_threads()} threads)"),
        "config": {"quantization": cfg.quantization.weights, "double_quant": cfg.quantization.double_quant,
                   "precision": t.precision, "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
                   "expert_r": cfg.lora.expert_r, "targets": cfg.lora.targets,
                   "routed_experts": cfg.lora.routed_experts, "optimizer": t.optimizer, "lr": t.lr,
                   "scheduler": t.scheduler, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                   "max_length": t.max_length, "gradient_checkpointing": t.gradient_checkpointing,
                   "keep_routed_gate_up": t.keep_routed_gate_up, "offload_checkpoints": t.offload_checkpoints,
                   "layout": t.layout},
        "engine": cfg.engine.__dict__,
        "nf4_decoder_used": decoder_in_use(device),  # engine.nf4_decoder, or bitsandbytes where it could not run
        # engine.layer_graphs: layer passes replayed, those run eagerly and why (None: the setting off)
        "layer_graphs": model.layer_graphs.stats() if model.layer_graphs is not None else None,
        # train.offload_checkpoints: the most host memory the saved layer inputs held at once
        "offloaded_checkpoint_bytes": model.host_checkpoints.peak_saved_bytes if model.host_checkpoints else None,
        "trainable_params": n_train,
        "data": bundle.report.to_dict(),
        "steps": state.step,
        "total_steps": total_steps,
        "start_eval_loss": state.start_eval_loss,
        "end_eval_loss": end_eval,
        "final_train_loss": step_losses[-1] if step_losses else None,
        "tokens": state.tokens_seen,
        "label_tokens": state.label_tokens_seen,
        "wall_s": round(elapsed_base + wall, 2),
        "train_s": round(state.train_time_s, 2),
        "tokens_per_s": round(tok_s, 2),
        "peak_mem_bytes": peak,
        "peak_mem_bytes_per_rank": peaks,
        "world_size": world,
        "expert_parallel": cfg.parallel.expert,
        "sequences_per_step": state.sequences_per_step,
        "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        # the CUDA graphs' pools now: a replay's temporaries sit there without the allocator, so peak allocated
        # does not count them (allocated + idle bounds what a replayed step uses)
        **(graph_pool_bytes(device) if device.type == "cuda" else {}),
        "plan_peak_bytes": plan.memory.peak_allocated if plan is not None else None,
        "smoke": smoke_result.to_dict() if smoke_result else None,
        "versions": versions(),
    }
    if ctx.is_main:
        write_report(run_dir / "report.json", report)
        plot_loss(run_dir / "loss.png", metrics, f"{model_short_name(cfg.model)}: {run_dir.name}")

    say("")
    say(f"done: {state.step} steps in {fmt_duration(elapsed_base + wall)}, {state.tokens_seen:,} tokens, "
        f"{tok_s:,.0f} tokens/s{f' on {world} processes' if ctx.enabled else ''}, peak memory "
        f"{' / '.join(fmt_bytes(b) for b in peaks)}{' (per rank)' if ctx.enabled else ''}")
    if state.start_eval_loss is not None and end_eval is not None:
        say(f"held-out loss {state.start_eval_loss:.4f} -> {end_eval:.4f}")
    if report["layer_graphs"] and (report["layer_graphs"]["replayed"] or device.type == "cuda"):
        from ..models.layer_graphs import describe

        say(f"layer graphs (engine.layer_graphs): {describe(report['layer_graphs'])}")
    if adapter_dir:
        say(f"adapter: {run_dir / 'adapter_model.safetensors'}")
    say(f"report: {run_dir / 'report.json'}, loss curve: {run_dir / 'loss.png'}")
    if smoke_result:
        for line in smoke_result.lines():
            say(line)
    return RunResult(run_dir=run_dir, completed=completed, step=state.step, total_steps=total_steps,
                     start_eval_loss=state.start_eval_loss, end_eval_loss=end_eval, train_losses=step_losses,
                     tokens=state.tokens_seen, wall_s=wall, tokens_per_s=tok_s, peak_mem_bytes=peak,
                     adapter_dir=adapter_dir, smoke=smoke_result, report=report)

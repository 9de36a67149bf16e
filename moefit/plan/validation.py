"""Planned vs measured: re-plan a recorded benchmark configuration, and fit calibration.json to measurements.

A record (one line of benchmarks/plan_validation.json "results") holds the configuration that was measured
(model, seq_len, batch, lora, quant, optimizer, GPU) and what the GPU measured. `planned_for` re-plans it with
the current code, so a change in either the engine (new measurements) or the planner shows in the CPU test.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import EngineConfig, LoraConfig, QuantConfig
from .calibration import CALIBRATION_PATH, load_calibration
from .gpus import get_gpu, gpu_from_memory, match_device_name
from .memory import RunShape, estimate_memory
from .model_facts import ModelFacts, load_model_facts
from .timing import (
    HOST_TERMS,
    optimizer_seconds,
    overlap,
    replayed_work,
    seconds_per_unit,
    step_time,
    time_work,
)


def record_shape(rec: dict[str, Any]) -> RunShape:
    # Records from before keep_routed_gate_up and fp32_linear_scales existed (or were on by default) were measured
    # without them: a record's absent key means off, not today's default.
    return RunShape(seq_len=rec["seq_len"], batch=rec["batch"], grad_accum=rec.get("grad_accum", 1),
                    quant=QuantConfig(**{"fp32_linear_scales": False, **rec.get("quant", {})}),
                    lora=LoraConfig(**rec.get("lora", {})),
                    optimizer=rec.get("optimizer", "adamw_8bit"),
                    gradient_checkpointing=rec.get("gradient_checkpointing", True),
                    keep_routed_gate_up=rec.get("keep_routed_gate_up", False),
                    offload_checkpoints=rec.get("offload_checkpoints", False),
                    nf4_decoder=record_decoder(rec),
                    lora_cast_cache=bool((rec.get("engine") or {}).get("lora_cast_cache", False)),
                    layer_graphs=bool((rec.get("engine") or {}).get("layer_graphs", False)),
                    backward_graphs=bool((rec.get("engine") or {}).get("backward_graphs", False)))


def record_facts(rec: dict[str, Any]) -> ModelFacts:
    f = load_model_facts(rec["model"])
    n = rec.get("num_layers")
    return dataclasses.replace(f, layers=f.layers[:n]) if n else f


def _gpu(rec: dict[str, Any]):
    name = rec.get("gpu") or match_device_name(rec.get("device_name", ""))
    if rec.get("device_memory_bytes"):
        return gpu_from_memory(rec["device_memory_bytes"], name)
    return get_gpu(name) if name else None


def planned_for(rec: dict[str, Any], calib: dict[str, Any] | None = None) -> dict[str, Any]:
    calib = calib or load_calibration()
    f, shape = record_facts(rec), record_shape(rec)
    m = estimate_memory(f, shape, calib)
    by = m.by_key()
    out = {"peak_allocated_bytes": m.peak_allocated, "peak_reserved_bytes": m.peak_reserved,
           "total_bytes": m.total, "peak_phase": m.peak_phase,
           "working_set_bytes": by.get("layer_working_set", 0) + by.get("loss_chunk", 0),
           "checkpoint_bytes": by.get("checkpoints", 0), "kept_bytes": by.get("kept_gate_up", 0),
           "transient_bytes": m.transient}
    gpu = _gpu(rec)
    st = step_time(f, shape, gpu, calib, by) if gpu else None
    if st:
        out.update(step_s=st.step_s, optimizer_s=st.optimizer_s,
                   # per optimizer step, as step_s: grad_accum micro-steps
                   time_work={k: v * shape.grad_accum for k, v in time_work(f, shape, by).items()},
                   time_unit_s=seconds_per_unit(gpu, calib["time"], nf4_decoder=shape.nf4_decoder),
                   peak_flops=gpu.bf16_tflops * 1e12)
    return out


def compare(rec: dict[str, Any], calib: dict[str, Any] | None = None) -> dict[str, float | None]:
    """Relative errors (planned - measured) / measured for allocated, reserved, total and step time."""
    p, m = planned_for(rec, calib), rec["measured"]

    def err(pk: str, mk: str) -> float | None:
        if p.get(pk) is None or not m.get(mk):
            return None
        return (p[pk] - m[mk]) / m[mk]

    out = {"allocated": err("peak_allocated_bytes", "peak_allocated_bytes"),
           "reserved": err("peak_reserved_bytes", "peak_reserved_bytes"),
           "step_time": err("step_s", "step_s")}
    if m.get("context_bytes") is not None:
        measured_total = m["peak_reserved_bytes"] + m["context_bytes"]
        out["total"] = (p["total_bytes"] - measured_total) / measured_total
    return out


# ---------------------------------------------------------------------------------------------- records

# The engine of a recorded measurement that does not name one: every such file predates the Triton NF4 decoder's
# becoming the default (2026-11-30, seventh session; since then plan_validation.py and moefit bench record it), so
# bitsandbytes decoded (the engine's other settings were their defaults of then, which the planner does not read).
UNRECORDED_ENGINE = {"nf4_decoder": "bnb"}

# What a record keeps of a measurement (moefit.bench.measure_training's result), from any recorded format.
MEASURED_KEYS = ("peak_allocated_bytes", "peak_reserved_bytes", "step_s", "tokens_per_s", "kernel_s",
                 "gpu_busy_fraction", "kernel_launches", "host_op_s", "micro_step_s", "optimizer_s", "layer_graphs")


def records_from_document(doc: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """The one-GPU measurements of a recorded benchmark document as plan-validation records: a
    plan_validation.json ("results" with "measured"), a `moefit bench --json` document ("runs"), a dict of named
    ones (scout_qlora_settings.json), data_parallel.json (its one-GPU rows; "args" are moefit bench's) or
    families.json (a bench run per model).
    Bench rows are named `source:key:BATCHxSEQxGRAD_ACCUM`."""
    if "results" in doc:
        rows = doc["results"]
        if rows and "one_gpu" in rows[0]:
            return [r for row in rows for r in _bench_records(_bench_doc_from_args(row["args"], row["one_gpu"]),
                                                              f"{source}:{row['name']}")]
        if rows and "args" in rows[0]:  # benchmarks/families.json: one `moefit bench` run per model
            return [r for row in rows if row.get("measured")
                    for r in _bench_records(_bench_doc_from_args(row["args"], row["measured"]),
                                            f"{source}:{row['model']}")]
        # a plan_validation.json: every configuration ran the engine its document records
        return [{**copy.deepcopy(r), "engine": r.get("engine") or doc.get("engine") or UNRECORDED_ENGINE,
                 "source": source, "measured_after": after}
                for r, after in zip(rows, _measured_after(doc), strict=True)]
    if "runs" in doc:
        return _bench_records(doc, source)
    return [r for key, sub in doc.items() if isinstance(sub, dict) and "runs" in sub
            for r in _bench_records(sub, f"{source}:{key}")]


def _measured_after(doc: dict[str, Any]) -> list[int]:
    """How many configurations each row's process measured before it: as recorded since the fifteenth session;
    for an older document 0 throughout when it ran with --fresh-process, else the rows of its group recorded
    before it (rows are kept in the order measured; one that failed is not counted)."""
    fresh = "--fresh-process" in str(doc.get("command", ""))
    seen: collections.Counter[str] = collections.Counter()
    out = []
    for row in doc["results"]:
        group = row.get("group", row["name"])
        out.append(row["measured_after"] if "measured_after" in row else 0 if fresh else seen[group])
        seen[group] += 1
    return out


def _bench_doc_from_args(args: list[str], run: dict[str, Any]) -> dict[str, Any]:
    """A `moefit bench --json` document for one run from its command-line arguments."""
    flags = {x for x in args if x in ("--embeddings-on-host", "--keep-routed-gate-up", "--offload-checkpoints")}
    pairs = [x for x in args if x not in flags]  # the rest are "--option value" pairs
    a = dict(zip(pairs[::2], pairs[1::2], strict=False))
    r = int(a.get("--rank", 32))
    er = None if a.get("--expert-rank") is None else int(a["--expert-rank"])
    return {"model": a.get("--model", "llama4-scout"), "layers": int(a["--layers"]) if "--layers" in a else None,
            "device_name": run.get("device_name", ""), "world_size": run.get("world_size", 1),
            "embeddings_on_host": "--embeddings-on-host" in flags,
            "keep_routed_gate_up": "--keep-routed-gate-up" in flags,
            "offload_checkpoints": "--offload-checkpoints" in flags,
            "lora": {"r": r, "alpha": 2.0 * r, "expert_r": er, "routed_experts": er != 0,
                     "targets": a.get("--targets", "q,k,v,o,gate,up,down").split(","),
                     "dtype": a.get("--lora-dtype", "float32")},
            "engine": run.get("engine"),  # kept with the run since 2026-11-30 (benchmarks/data_parallel._run_record)
            "runs": [run]}


def _bench_records(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    if doc.get("world_size", 1) != 1 or doc.get("expert_parallel", 1) != 1:
        return []  # one GPU only
    lora = {k: doc["lora"][k] for k in ("r", "alpha", "dropout", "targets", "routed_experts", "expert_r",
                                        "expert_alpha", "dtype") if k in doc["lora"]}
    full = len(load_model_facts(doc["model"]).layers)
    out = []
    for run in doc["runs"]:
        if run.get("world_size", 1) != 1:
            continue
        out.append({"name": f"{name}:{run['batch']}x{run['seq_len']}x{run['grad_accum']}", "model": doc["model"],
                    "num_layers": doc.get("layers") if doc.get("layers") not in (None, full) else None,
                    "seq_len": run["seq_len"], "batch": run["batch"], "grad_accum": run["grad_accum"], "lora": lora,
                    "quant": {"weights": "nf4", "embeddings_on_host": bool(doc.get("embeddings_on_host")),
                              "fp32_linear_scales": bool(doc.get("fp32_linear_scales"))},
                    "optimizer": doc.get("optimizer", "adamw_8bit"), "gradient_checkpointing": True,
                    "keep_routed_gate_up": bool(doc.get("keep_routed_gate_up")),
                    "offload_checkpoints": bool(doc.get("offload_checkpoints")),
                    "device_name": run.get("device_name") or doc.get("device_name", ""),
                    "engine": doc.get("engine") or UNRECORDED_ENGINE,
                    "measured": {k: run[k] for k in MEASURED_KEYS if run.get(k) is not None}})
    return out


def measured_decoder(measured: dict[str, Any]) -> str:
    """The engine.nf4_decoder of a recorded `moefit bench` run (its "engine"; a run recording none predates the
    Triton decoder's default: bitsandbytes)."""
    return (measured.get("engine") or UNRECORDED_ENGINE)["nf4_decoder"]


def record_decoder(rec: dict[str, Any]) -> str:
    """The engine.nf4_decoder a record ran (a record of no recorded file: the engine's default)."""
    return (rec.get("engine") or {}).get("nf4_decoder") or EngineConfig.nf4_decoder


def other_engine(rec: dict[str, Any], decoder: str | None = None) -> str | None:
    """Why a record measured another engine than `decoder`'s (default: the engine's default NF4 decoder), or None.
    Its host issues other kernels (bitsandbytes decodes in three launches, the Triton decoder in one): time
    constants fitted to one engine leave the other's records out rather than average the two."""
    want, got = decoder or EngineConfig.nf4_decoder, record_decoder(rec)
    return None if got == want else f"engine.nf4_decoder={got} (this fit: {want})"


# ---------------------------------------------------------------------------------------------- fitting

def fit_calibration(records: list[dict[str, Any]], measured_on: str,
                    sections: tuple[str, ...] = ("memory", "time")) -> dict[str, Any]:
    """Least-squares fit of the calibration constants to measured records; returns a new calibration dict
    (comment keys kept). Memory: measured_allocated = fixed part + checkpoints + a*working_set + c (the
    checkpoints are exact bf16 tensors, one per layer: activation_scale stays 1; fitted, it went to 0.88 and moved
    a dense model's miss at 16k tokens onto the checkpoints); reserved - allocated = f*transient + g + segment
    rounding; context = mean measured. Time: see `fit_time_constants`. `sections`: the constants refitted
    ("memory", "time"); the others stay."""
    unknown = set(sections) - {"memory", "time"}
    if unknown or not sections:
        raise ValueError(f"fit sections must be among memory, time; got {sorted(sections)}")
    import numpy as np

    raw = json.loads(CALIBRATION_PATH.read_text(encoding="utf-8"))
    base = copy.deepcopy(load_calibration())
    for key in ("working_set_scale", "activation_scale"):
        base["memory"][key] = 1.0
    base["memory"]["extra_allocated_bytes"] = 0
    memory_records = [r for r in records if "peak_allocated_bytes" in r["measured"]]  # (not: step time only)
    if "memory" in sections and not memory_records:
        raise ValueError("no record with a current memory measurement to fit the memory constants to")
    for _ in range(2 if memory_records else 0):  # the peak phase can move with the scales: fit, re-plan, fit again
        rows, y = [], []
        for rec in memory_records:
            p = planned_for(rec, base)
            fixed = p["peak_allocated_bytes"] - p["working_set_bytes"] - p["checkpoint_bytes"] \
                - base["memory"]["extra_allocated_bytes"]
            ws = p["working_set_bytes"] / base["memory"]["working_set_scale"]
            rows.append([ws, 1.0])
            y.append(rec["measured"]["peak_allocated_bytes"] - fixed - p["checkpoint_bytes"])
        a, c = np.linalg.lstsq(np.array(rows), np.array(y), rcond=None)[0]
        base["memory"].update(working_set_scale=float(max(a, 1e-6)), extra_allocated_bytes=int(c))
    # reserve: what is reserved beyond allocated, against the transient memory at the peak
    rows, y = [], []
    for rec in memory_records:
        p = planned_for(rec, base)
        without = p["peak_reserved_bytes"] - p["peak_allocated_bytes"]
        frac = base["memory"]["allocator_dynamic_reserve_fraction"]
        transient = p["transient_bytes"]  # (as estimate_memory scales its dynamic reserve: the fit is its own fixpoint)
        seg = without - int(frac * transient) - base["memory"]["allocator_fixed_reserve_bytes"]
        rows.append([transient, 1.0])
        y.append(rec["measured"]["peak_reserved_bytes"] - rec["measured"]["peak_allocated_bytes"] - seg)
    if rows:
        f_, g_ = np.linalg.lstsq(np.array(rows), np.array(y), rcond=None)[0]
        base["memory"].update(allocator_dynamic_reserve_fraction=float(max(f_, 0.0)),
                              allocator_fixed_reserve_bytes=int(max(g_, 0)))
    ctx = [r["measured"]["context_bytes"] for r in records if r["measured"].get("context_bytes")]
    if ctx:
        base["memory"]["cuda_context_bytes"] = int(max(ctx))
    if "memory" not in sections:
        base["memory"] = copy.deepcopy(load_calibration()["memory"])
    base["time"].update(fit_time_constants(records, base) if "time" in sections else {})
    for section in sections:
        for k, v in base[section].items():
            raw[section][k] = v
    if sections == ("memory", "time"):
        raw["measured_on"] = measured_on
        for section in sections:  # refitted together: no section was refitted apart since
            raw.get("sections_measured_on", {}).pop(section, None)
        raw["_status"] = (f"fitted by benchmarks/plan_validation.py --fit to {_counted(records)} ({measured_on}); the "
                          "first-principles values are in git history.")
    else:
        raw.setdefault("sections_measured_on", {}).update(dict.fromkeys(sections, measured_on))
        raw["_status"] = (f"{' and '.join(sections)} constants refitted by benchmarks/plan_validation.py --fit "
                          f"--fit-sections {','.join(sections)} to {_counted(records)} ({measured_on}); the others "
                          f"as fitted on {raw['measured_on']}.")
    return raw


def _counted(records: list[dict[str, Any]]) -> str:
    n, names = len(records), len({r["name"] for r in records})
    return f"{n} measured configurations" if n == names else f"{n} measurements of {names} configurations"


# ---------------------------------------------------------------------------------------------- time fit
# The fitted time constants (calibration.json "time") and the TIME_TERMS term each one prices: an efficiency
# divides the term's peak rate, a `_s` constant is seconds per unit of its work. `optimizer_tensor_s` prices the
# LoRA tensors of one optimizer step, `overlap_exponent` combines GPU and host time (timing.overlap), and
# `host_family_scale` and `gpu_family_scale` (one each per model family other than the reference ones) multiply
# its host terms and its fitted GPU terms.
_PRICED = {"gemm_efficiency": "matmul", "attention_efficiency": "attention",
           "masked_attention_efficiency": "masked_attention", "activation_bandwidth_efficiency": "activation",
           "gpu_layer_pass_s": "gpu_layer_passes", "gpu_moe_layer_pass_s": "gpu_moe_layer_passes",
           "moe_layer_pass_s": "moe_layer_passes",
           "dense_layer_pass_s": "dense_layer_passes", "expert_lora_layer_pass_s": "expert_lora_layer_passes",
           "host_micro_step_s": "micro_steps"}
# Where the fit starts and what it is pulled towards, weakly (TIME_PRIOR_WEIGHT): first-principles guesses that
# depend on no record (so a leave-one-out fit learns nothing from the record it leaves out). Efficiencies: between
# one grouped expert GEMM (0.43) and a dense GEMM (0.80) measured on the H200; flash attention well below GEMMs;
# elementwise kernels at a third of bandwidth. Host: ~700 kernels per MoE layer pass at ~7 us each.
TIME_PRIOR = {"gemm_efficiency": 0.6, "attention_efficiency": 0.3, "masked_attention_efficiency": 0.2,
              "activation_bandwidth_efficiency": 0.3, "gpu_layer_pass_s": 3e-4, "gpu_moe_layer_pass_s": 3e-4,
              "moe_layer_pass_s": 5e-3,
              "dense_layer_pass_s": 3e-3, "expert_lora_layer_pass_s": 1.5e-3, "host_micro_step_s": 0.02,
              "optimizer_tensor_s": 2e-5, "overlap_exponent": 3.0}
TIME_PRIOR_WEIGHT = 0.03  # residual per unit of log(constant / prior): a factor e costs as much as a 3 % miss
SCALE_PRIOR_WEIGHT = 0.1  # the same for a family's scales: a family differs from the reference only when its
# records say so clearly (few records of a family would otherwise carry their noise into its scales)
# A record's measured optimizer update (where it has one) counts a tenth as much as its step time: it pins the
# per-tensor price to what the update costs (~70-85 us a tensor, not the 148 us the step time alone had pushed it
# to, standing in for host time of the micro-steps) while the step time stays what the fit answers for. At 0.1 or
# 0.2 leave-one-out is within 12.3 % on the 30 configurations' medians; at 0.5 or 1 the host-bound Scout
# micro-steps, no longer padded by the optimizer, go 20-33 % fast (eleventh session).
OPTIMIZER_WEIGHT = 0.1
KERNEL_WEIGHT = 0.5  # a record's profiled GPU kernel time counts half as much as its step time
# Bounds of the fitted constants: efficiencies (a GEMM mix cannot beat one large dense GEMM, 0.80 of peak
# measured), seconds, the overlap exponent, a family's scales.
_BOUNDS = {"gemm_efficiency": (0.1, 0.85), "eff": (0.02, 1.0), "s": (1e-8, 1.0), "overlap_exponent": (1.0, 16.0),
           "scale": (0.25, 4.0)}
_FAMILY_SCALES = ("host_family_scale", "gpu_family_scale")
# A reference family per layer kind: their times define the per-layer constants and the efficiencies.
REFERENCE_FAMILIES = ("llama4_text", "llama")
# A constant no training record exercises (only seq >= chunk uses the masked kernel) takes this one's value.
_FALLBACK = {"masked_attention_efficiency": "attention_efficiency"}


class _TimeRecords:
    """The records' work per micro-step in unit seconds (each _PRICED term at efficiency 1 or 1 s per unit), what
    stays fixed in the fit, and what the GPU measured, as arrays: the fit evaluates timing.step_time's formula
    for all records at once (`predict`)."""

    def __init__(self, records: list[dict[str, Any]], calib: dict[str, Any]):
        import numpy as np

        from .memory import lora_tensors

        ones = dict(calib["time"], **dict.fromkeys(_PRICED, 1.0), **{k: {} for k in _FAMILY_SCALES})
        rows = []
        for rec in records:
            gpu, step = _gpu(rec), rec["measured"].get("step_s")
            if not gpu or not gpu.bf16_tflops or not gpu.bandwidth_gbs or not step:
                continue
            f, shape = record_facts(rec), record_shape(rec)
            by = estimate_memory(f, shape, calib).by_key()
            work = time_work(f, shape, by)
            first = replayed_work(f, shape, by, work)
            unit = seconds_per_unit(gpu, ones, nf4_decoder=shape.nf4_decoder)
            opt = optimizer_seconds(f, shape, gpu, dict(calib["time"], optimizer_tensor_s=0.0))[1]
            read_rate = gpu.bandwidth_gbs * 1e9 * calib["time"]["bandwidth_efficiency"]
            rows.append((f.family, shape.grad_accum, [work[t] * unit[t] for t in _PRICED.values()],
                         work["dequant"] * unit["dequant"], opt,
                         sum(len(ts) for _, ts in lora_tensors(f, shape)), step,
                         rec["measured"].get("optimizer_s") or np.nan,
                         rec["measured"].get("kernel_s") or np.nan,
                         [first.get(t, 0.0) * unit[t] for t in _PRICED.values()], first["dequant"] * unit["dequant"],
                         # (timing.expert_read_excess: the routed banks' read, their FLOPs at efficiency 1)
                         [w.get("expert_read", 0.0) / read_rate for w in (work, first)],
                         [w.get("routed_matmul", 0.0) * unit["matmul"] for w in (work, first)]))
        self.n = len(rows)
        if not rows:
            return
        fam, ga, work, dq, opt, tensors, step, opt_meas, kern, first, first_dq, read, routed = zip(*rows, strict=True)
        self.read, self.routed = np.array(read), np.array(routed)  # [record, (micro-step, replayed share)]
        self.optimizer_measured = np.array(opt_meas)
        self.family = list(fam)
        self.work = np.array(work)  # [record, _PRICED term]
        self.first, self.first_dequant = np.array(first), np.array(first_dq)  # the replayed first pass's share
        self.host = np.array([t in HOST_TERMS for t in _PRICED.values()])
        self.layer_host = np.array([t in HOST_TERMS and t != "micro_steps" for t in _PRICED.values()])
        self.ga, self.dequant, self.optimizer = np.array(ga, float), np.array(dq), np.array(opt)
        self.tensors, self.step, self.kernel = np.array(tensors, float), np.array(step), np.array(kern)

    def predict(self, c: dict[str, Any]):
        """(step seconds, GPU kernel seconds) of every record with time constants `c`."""
        import numpy as np

        prices = np.array([1 / c[k] if k.endswith("efficiency") else c[k] for k in _PRICED])
        host, dev = (np.array([c[k].get(f, 1.0) for f in self.family]) for k in _FAMILY_SCALES)
        sec = self.work * prices
        gemm = prices[list(_PRICED).index("gemm_efficiency")]
        excess = np.maximum(0.0, self.read - self.routed * gemm * dev[:, None])
        gpu_s = sec[:, ~self.host].sum(axis=1) * dev + self.dequant + excess[:, 0]
        # the family's host scale is of its layers' launches (timing.seconds_per_unit), not of the per-micro-step
        # work or the optimizer's
        host_s = sec[:, self.layer_host].sum(axis=1) * host + sec[:, self.host & ~self.layer_host].sum(axis=1)
        first = (self.first * prices)[:, ~self.host].sum(axis=1) * dev + self.first_dequant + excess[:, 1]
        micro = first + overlap(gpu_s - first, host_s, c["overlap_exponent"])  # (timing.micro_step_seconds)
        optimizer = self.optimizer + self.tensors * c["optimizer_tensor_s"]
        return self.ga * micro + optimizer, self.ga * gpu_s + self.optimizer, optimizer


def fit_time_constants(records: list[dict[str, Any]], calib: dict[str, Any],
                       unexercised: str = "keep") -> dict[str, Any]:
    """Least squares on relative error (every record weighs the same) of the measured step time, at half
    weight of the profiled GPU kernel time and at a tenth of the optimizer update's time where a record has them, against timing.step_time: a damped Gauss-Newton
    (Levenberg-Marquardt) on the logarithms of the constants, within bounds, pulled weakly towards TIME_PRIOR.
    The dequantization and optimizer bandwidths are measured constants and stay. A constant no record exercises
    keeps its current value (`unexercised="keep"`) or the prior's (`"prior"`, for leave-one-out: nothing of the
    record left out reaches the fit); a `_FALLBACK` constant takes its fallback's fitted value."""
    import numpy as np

    recs = _TimeRecords(records, calib)
    if recs.n < 3:
        return {}
    families = sorted(set(recs.family) - set(REFERENCE_FAMILIES))
    scaled = [(k, fam) for k in _FAMILY_SCALES for fam in families]
    names = list(TIME_PRIOR) + [f"{k}:{fam}" for k, fam in scaled]
    center = np.log([TIME_PRIOR.get(n, 1.0) for n in names])
    weight = np.array([SCALE_PRIOR_WEIGHT if ":" in n else TIME_PRIOR_WEIGHT for n in names])
    lo, hi = (np.log([_BOUNDS["scale" if ":" in n else n if n in _BOUNDS else
                      "eff" if n.endswith("efficiency") else "s"][i] for n in names]) for i in (0, 1))
    profiled = ~np.isnan(recs.kernel)
    timed = ~np.isnan(recs.optimizer_measured)

    def consts(z: np.ndarray) -> dict[str, Any]:
        v = dict(zip(names, np.exp(z).tolist(), strict=True))
        c = {n: v[n] for n in TIME_PRIOR}
        for k in _FAMILY_SCALES:
            c[k] = {fam: v[f"{k}:{fam}"] for fam in families}
        return c

    def residuals(z: np.ndarray) -> np.ndarray:
        step, kern, opt = recs.predict(consts(z))
        return np.concatenate([step / recs.step - 1, KERNEL_WEIGHT * (kern[profiled] / recs.kernel[profiled] - 1),
                               OPTIMIZER_WEIGHT * (opt[timed] / recs.optimizer_measured[timed] - 1),
                               weight * (z - center)])

    # exercised: moving the constant moves some record's prediction
    z0 = center.copy()
    base = residuals(z0)[: -len(names)]
    free = []
    for i in range(len(names)):
        dz = np.zeros(len(names))
        dz[i] = 0.1
        if np.abs(residuals(z0 + dz)[: -len(names)] - base).max() > 1e-12:
            free.append(i)
    best = None
    for p0 in (1.5, 3.0, 8.0):  # the overlap exponent makes the problem non-convex: a few starts
        z = z0.copy()
        z[names.index("overlap_exponent")] = np.log(p0)
        z = _levenberg_marquardt(residuals, z, free, lo, hi)
        cost = float(np.sum(residuals(z) ** 2))
        if best is None or cost < best[0]:
            best = (cost, z)
    fitted = consts(best[1])
    exercised = {names[i] for i in free}
    current = calib["time"]
    out: dict[str, Any] = {}
    for n in TIME_PRIOR:
        if n in exercised:
            out[n] = fitted[n]
        elif n in _FALLBACK and _FALLBACK[n] in exercised:
            out[n] = fitted[_FALLBACK[n]]
        else:
            out[n] = TIME_PRIOR[n] if unexercised == "prior" or n not in current else current[n]
    for k in _FAMILY_SCALES:
        out[k] = {} if unexercised == "prior" else dict(current.get(k, {}))
        out[k].update({fam: fitted[k][fam] for fam in families if f"{k}:{fam}" in exercised})
    return out


def _levenberg_marquardt(residuals, z, free: list[int], lo, hi, iterations: int = 100):
    """Minimise sum(residuals(z)^2) over the coordinates `free` of z, each kept within [lo, hi] (a coordinate at
    a bound that the descent pushes outwards sits out that iteration)."""
    import numpy as np

    z, free = np.clip(z, lo, hi), np.array(free)
    lam, r = 1e-2, residuals(z)
    for _ in range(iterations):
        jac = np.zeros((len(r), len(free)))
        for j, i in enumerate(free):
            dz = np.zeros(len(z))
            dz[i] = 1e-6
            jac[:, j] = (residuals(z + dz) - r) / 1e-6
        grad = jac.T @ r
        move = ~(((z[free] <= lo[free] + 1e-9) & (grad > 0)) | ((z[free] >= hi[free] - 1e-9) & (grad < 0)))
        if not move.any():
            break
        a, g, idx = jac[:, move].T @ jac[:, move], grad[move], free[move]
        moved = 0.0
        while lam < 1e10:
            cand = z.copy()
            cand[idx] = np.clip(z[idx] + np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g), lo[idx], hi[idx])
            rc = residuals(cand)
            if rc @ rc < r @ r:
                moved, z, r, lam = np.abs(cand - z).max(), cand, rc, max(lam / 3, 1e-9)
                break
            lam *= 4
        if moved < 1e-7:
            break
    return z


def leave_one_out(records: list[dict[str, Any]], calib: dict[str, Any] | None = None) -> dict[str, float]:
    """Step-time relative error of each record predicted by time constants fitted to all the others (nothing of
    the record left out reaches its prediction: constants only it exercises take their prior value). A
    configuration measured more than once (the same name in two recorded calls) is left out whole, each of its
    records keyed `name [source]`."""
    calib = calib or load_calibration()
    fits: dict[str, dict[str, Any]] = {}
    out = {}
    for rec, key in zip(records, record_keys(records), strict=True):
        name = rec["name"]
        if name not in fits:
            fits[name] = copy.deepcopy(calib)
            fits[name]["time"].update(fit_time_constants([r for r in records if r["name"] != name], fits[name],
                                                         unexercised="prior"))
        e = compare(rec, fits[name])["step_time"]
        if e is not None:
            out[key] = e
    return out


def median_of_repeats(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per configuration: where one was measured in several recorded calls (machines), its median step
    time, GPU kernel time and peak memory, so that a fit or a leave-one-out table weighs the typical machine, not
    one call's (host-bound steps of one configuration moved up to 53 % between two H200 machines of one day; the
    GPU-bound ones 2.5 %). `repeats` says how many records each stands for.

    Peak memory is the median of the records measured first in their process (`measured_after` 0) where there is
    one: that is what a run of the configuration peaks at. One measured after other configurations in the same
    process reads what their caches and graph pools left behind: Llama 3.1 8B read up to 0.77 GiB (5 %) more
    after ten others than alone (benchmarks/speed_targets.md, fourteenth and fifteenth sessions). `memory_alone`
    says which it is."""
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(rec["name"], []).append(rec)
    out = []
    for recs in groups.values():
        alone = [r for r in recs if r.get("measured_after") == 0]
        rec = copy.deepcopy((alone or recs)[0])
        if len(recs) > 1:
            measured = {}
            for key in ("step_s", "optimizer_s", "kernel_s", "peak_allocated_bytes", "peak_reserved_bytes",
                        "context_bytes", "gpu_busy_fraction"):
                pool = (alone or recs) if key in _MEMORY_KEYS else recs
                values = [r["measured"][key] for r in pool if r["measured"].get(key) is not None]
                if values:
                    measured[key] = statistics.median(values)
            rec["measured"] = measured
            rec["source"] = "median of " + ", ".join(str(r.get("source", "?")) for r in recs)
        rec["repeats"] = len(recs)
        rec["memory_alone"] = bool(alone)
        out.append(rec)
    return out


_MEMORY_KEYS = ("peak_allocated_bytes", "peak_reserved_bytes", "context_bytes")


def record_keys(records: list[dict[str, Any]]) -> list[str]:
    """Each record's name, or `name [source]` where a configuration was measured in more than one recorded call."""
    counts = collections.Counter(r["name"] for r in records)
    return [r["name"] if counts[r["name"]] == 1 else f"{r['name']} [{r.get('source', '?')}]" for r in records]


def fit_overlap_exponent(points: list[tuple[float, float, float, int, float]], lo: float = 1.0,
                         hi: float = 16.0) -> float:
    """The overlap exponent p (timing.overlap) that best fits measured steps, each given as (GPU seconds, host
    seconds of a micro-step, the step's seconds outside its micro-steps, micro-steps per step, measured step
    seconds): least squares of log(planned / measured) over a grid of p in [lo, hi] (0.01 apart)."""
    import numpy as np

    from .timing import overlap

    g, h, fixed, n, measured = (np.array(c, dtype=float) for c in zip(*points, strict=True))
    grid = np.arange(lo, hi + 1e-9, 0.01)
    loss = [float(np.sum(np.log((n * overlap(g, h, p) + fixed) / measured) ** 2)) for p in grid]
    return float(grid[int(np.argmin(loss))])


def write_calibration(cal: dict[str, Any], path: Path = CALIBRATION_PATH) -> None:
    path.write_text(json.dumps(cal, indent=2) + "\n", encoding="utf-8")
    load_calibration.cache_clear()

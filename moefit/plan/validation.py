"""Planned vs measured: re-plan a recorded benchmark configuration, and fit calibration.json to measurements.

A record (one line of benchmarks/plan_validation.json "results") holds the configuration that was measured
(model, seq_len, batch, lora, quant, optimizer, GPU) and what the GPU measured. `planned_for` re-plans it with
the current code, so a change in either the engine (new measurements) or the planner shows in the CPU test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config import LoraConfig, QuantConfig
from .calibration import CALIBRATION_PATH, load_calibration
from .gpus import get_gpu, gpu_from_memory, match_device_name
from .memory import RunShape, estimate_memory
from .model_facts import ModelFacts, load_model_facts
from .timing import seconds_per_unit, step_time, time_work


def record_shape(rec: dict[str, Any]) -> RunShape:
    # Records from before keep_routed_gate_up existed were measured without it.
    return RunShape(seq_len=rec["seq_len"], batch=rec["batch"], grad_accum=rec.get("grad_accum", 1),
                    quant=QuantConfig(**rec.get("quant", {})), lora=LoraConfig(**rec.get("lora", {})),
                    optimizer=rec.get("optimizer", "adamw_8bit"),
                    gradient_checkpointing=rec.get("gradient_checkpointing", True),
                    keep_routed_gate_up=rec.get("keep_routed_gate_up", False))


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
           "checkpoint_bytes": by.get("checkpoints", 0), "kept_bytes": by.get("kept_gate_up", 0)}
    gpu = _gpu(rec)
    st = step_time(f, shape, gpu, calib, by) if gpu else None
    if st:
        out.update(step_s=st.step_s, optimizer_s=st.optimizer_s,
                   # per optimizer step, as step_s: grad_accum micro-steps
                   time_work={k: v * shape.grad_accum for k, v in time_work(f, shape, by).items()},
                   time_unit_s=seconds_per_unit(gpu, calib["time"]),
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


# ---------------------------------------------------------------------------------------------- fitting

def fit_calibration(records: list[dict[str, Any]], measured_on: str,
                    sections: tuple[str, ...] = ("memory", "time")) -> dict[str, Any]:
    """Least-squares fit of the calibration constants to measured records; returns a new calibration dict
    (comment keys kept). Memory: measured_allocated = fixed part + a*working_set + b*checkpoints + c;
    reserved - allocated = f*transient + g + segment rounding; context = mean measured. Time:
    see `fit_time_constants`. `sections`: the constants refitted ("memory", "time"); the others stay."""
    unknown = set(sections) - {"memory", "time"}
    if unknown or not sections:
        raise ValueError(f"fit sections must be among memory, time; got {sorted(sections)}")
    import numpy as np

    raw = json.loads(CALIBRATION_PATH.read_text(encoding="utf-8"))
    base = copy.deepcopy(load_calibration())
    for key in ("working_set_scale", "activation_scale"):
        base["memory"][key] = 1.0
    base["memory"]["extra_allocated_bytes"] = 0
    for _ in range(2):  # the peak phase can move when the scales change: fit, re-plan, fit again
        rows, y = [], []
        for rec in records:
            p = planned_for(rec, base)
            fixed = p["peak_allocated_bytes"] - p["working_set_bytes"] - p["checkpoint_bytes"] \
                - base["memory"]["extra_allocated_bytes"]
            ws = p["working_set_bytes"] / base["memory"]["working_set_scale"]
            ck = p["checkpoint_bytes"] / base["memory"]["activation_scale"]
            rows.append([ws, ck, 1.0])
            y.append(rec["measured"]["peak_allocated_bytes"] - fixed)
        a, b, c = np.linalg.lstsq(np.array(rows), np.array(y), rcond=None)[0]
        base["memory"].update(working_set_scale=float(max(a, 0.0)), activation_scale=float(max(b, 0.0)),
                              extra_allocated_bytes=int(c))
    # reserve: what is reserved beyond allocated, against the transient memory at the peak
    rows, y = [], []
    for rec in records:
        p = planned_for(rec, base)
        without = p["peak_reserved_bytes"] - p["peak_allocated_bytes"]
        frac = base["memory"]["allocator_dynamic_reserve_fraction"]
        transient = p["working_set_bytes"] + p["checkpoint_bytes"] + p["kept_bytes"]
        seg = without - int(frac * transient) - base["memory"]["allocator_fixed_reserve_bytes"]
        rows.append([transient, 1.0])
        y.append(rec["measured"]["peak_reserved_bytes"] - rec["measured"]["peak_allocated_bytes"] - seg)
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
        raw["_status"] = (f"fitted by benchmarks/plan_validation.py --fit to {len(records)} measured configurations "
                          f"({measured_on}); the first-principles values are in git history.")
    else:
        raw.setdefault("sections_measured_on", {}).update(dict.fromkeys(sections, measured_on))
        raw["_status"] = (f"{' and '.join(sections)} constants refitted by benchmarks/plan_validation.py --fit "
                          f"--fit-sections {','.join(sections)} to {len(records)} measured configurations "
                          f"({measured_on}); the others as fitted on {raw['measured_on']}.")
    return raw


# time: step_s - optimizer - dequant = matmul/(peak e_g) + attn/(peak e_a) + masked/(peak e_m)
#                                       + moe_passes o_m + dense_passes o_d + expert_lora_passes o_e
_FIT_TIME = {"matmul": "gemm_efficiency", "attention": "attention_efficiency",
             "masked_attention": "masked_attention_efficiency", "moe_layer_passes": "moe_layer_pass_s",
             "dense_layer_passes": "dense_layer_pass_s", "expert_lora_layer_passes": "expert_lora_layer_pass_s"}
_EFFICIENCIES = ("matmul", "attention", "masked_attention")
# A constant no training record exercises (only seq >= chunk uses the masked kernel) takes this one's value.
_FALLBACK = {"masked_attention": "attention"}


def fit_time_constants(records: list[dict[str, Any]], calib: dict[str, Any]) -> dict[str, float]:
    """Least squares on relative error (every record weighs the same) of the measured step time against the
    terms of `timing.py`; linear in 1/efficiency and in the per-pass seconds. The dequantization bandwidth and
    the optimizer's bandwidth are measured constants and stay as they are. A term no record exercises keeps the
    value of its `_FALLBACK` (or the current one). Raises ValueError if a fitted constant comes out <= 0."""
    import numpy as np

    cols, rows, y = list(_FIT_TIME), [], []
    for rec in records:
        p = planned_for(rec, calib)
        if not p.get("step_s") or not rec["measured"].get("step_s"):
            continue
        w, u, meas = p["time_work"], p["time_unit_s"], rec["measured"]["step_s"]
        rows.append([w[k] / p["peak_flops"] if k in _EFFICIENCIES else w[k] for k in cols])
        y.append(meas - p["optimizer_s"] - w["dequant"] * u["dequant"])
        rows[-1] = [v / meas for v in rows[-1]]
        y[-1] /= meas
    if len(rows) < 3:
        return {}
    a, b = np.array(rows), np.array(y)
    used = [i for i, k in enumerate(cols) if a[:, i].any()]
    coef = np.linalg.lstsq(a[:, used], b, rcond=None)[0]
    got = {cols[i]: float(c) for i, c in zip(used, coef, strict=True)}
    bad = [k for k, v in got.items() if v <= 0]
    if bad:
        raise ValueError(f"time fit: {bad} came out <= 0 ({got}); the records do not separate these terms")
    for k in cols:
        if k not in got:
            fb = _FALLBACK.get(k)
            got[k] = got[fb] if fb in got else (1 / calib["time"][_FIT_TIME[k]] if k in _EFFICIENCIES
                                                else calib["time"][_FIT_TIME[k]])
    return {_FIT_TIME[k]: (1 / v if k in _EFFICIENCIES else v) for k, v in got.items()}


def leave_one_out(records: list[dict[str, Any]], calib: dict[str, Any] | None = None) -> dict[str, float]:
    """Step-time relative error of each record predicted by time constants fitted to all the others."""
    calib = calib or load_calibration()
    out = {}
    for i, rec in enumerate(records):
        cal = copy.deepcopy(calib)
        cal["time"].update(fit_time_constants(records[:i] + records[i + 1:], cal))
        e = compare(rec, cal)["step_time"]
        if e is not None:
            out[rec["name"]] = e
    return out


def write_calibration(cal: dict[str, Any], path: Path = CALIBRATION_PATH) -> None:
    path.write_text(json.dumps(cal, indent=2) + "\n", encoding="utf-8")
    load_calibration.cache_clear()

"""Measure moefit's real peak memory and step time on the GPU and compare them with `moefit plan`.

    python benchmarks/plan_validation.py --out DIR [--configs all|quick|issue4|loo]   # on a GPU: measure, compare
    python benchmarks/plan_validation.py --plan-only [--configs ...]   # on CPU: the plan of each config, and how
                                                                       # long measuring the set takes
    python benchmarks/plan_validation.py --fit DIR/plan_validation.json [MORE.json ...]   # refit calibration.json
    python benchmarks/plan_validation.py --loo DIR/plan_validation.json [MORE.json ...] [--median]   # leave-one-out

Each group of configurations that share weights and LoRA runs in a fresh subprocess (so peak memory is clean):
it builds the model once with synthetic NF4 weights at real shapes on the GPU (moefit.bench.build_synthetic_model)
and, per configuration, resets the peak statistics and calls moefit.bench.measure_training (a configuration that
fails, e.g. out of memory, is reported and the group goes on). Results go to DIR/plan_validation.json after every
configuration (a run cut short keeps what it measured) and, at the end, DIR/plan_validation.md (measured vs
planned, % error, leave-one-out, command, date, GPU, library versions); copy the JSON to
benchmarks/plan_validation.json to make tests/test_plan_validation.py check the planner against it.
`--fit` and `--loo` also read the other recorded formats: `moefit bench --json` documents (one or a dict of
them, as benchmarks/scout_qlora_settings.json) and benchmarks/data_parallel.json (its one-GPU rows).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCOUT = "llama4-scout"
DENSE = "llama3.1-8b"
QWEN = "qwen3-30b-a3b"
GPT_OSS = "gpt-oss-20b"
STEPS, WARMUP = 3, 1
# Two micro-batches per optimizer step: the second runs with the first one's LoRA gradients resident, as in the
# seed recipe's accumulation (grad_accum 8), so the measured peak is the one a real run reaches.
GRAD_ACCUM = 2
KEEP = "keep"  # a shape tagged with it runs with keep_routed_gate_up on
OFFLOAD = "offload"  # ... with offload_checkpoints on (the layers' saved inputs in host memory, no layer graphs)


def _lora(r: int, expert_r: int | None = None) -> dict:
    return {"r": r, "alpha": 2.0 * r, "expert_r": expert_r, "routed_experts": expert_r != 0,
            "targets": ["q", "k", "v", "o", "gate", "up", "down"]}


# (group, model, lora) -> [(seq_len, batch[, grad_accum][, KEEP])]: one model build per group.
GROUPS = [
    ("scout-r32", SCOUT, _lora(32), [(1024, 1), (2048, 1), (4096, 1), (8192, 1), (2048, 2), (2048, 1, KEEP)]),
    ("scout-r8", SCOUT, _lora(8), [(2048, 1)]),
    ("scout-r64", SCOUT, _lora(64), [(2048, 1)]),
    ("scout-r32-no-expert-lora", SCOUT, _lora(32, 0), [(2048, 1), (4096, 1)]),
    ("llama3.1-8b-r32", DENSE, _lora(32), [(2048, 1), (4096, 2)]),
]
QUICK = [("scout-r32", SCOUT, _lora(32), [(2048, 1), (4096, 1)]), ("llama3.1-8b-r32", DENSE, _lora(32), [(2048, 1)])]
# The four moefit rows of issue 4's table (benchmarks/scout_qlora.sh).
ISSUE4 = [("scout-r32", SCOUT, _lora(32), [(2048, 1), (4096, 1)]),
          ("scout-r32-no-expert-lora", SCOUT, _lora(32, 0), [(2048, 1), (4096, 1)])]
# Issue 15: the step time out of the calibrated corner. Micro-batch 1-8, grad_accum 1-8, sequences 512-16k, dense
# and three MoE families, each configuration predicted by a fit without it (`--loo`); host-bound (micro-batch 1,
# short sequences) and GPU-bound (many tokens per micro-step) in every family, so that each family's host time
# and the GPU terms stay determined when any one configuration is left out. With engine.layer_graphs the first
# pass costs the host nearly nothing: Llama 3.1 8B at 1 x 2048 went GPU-bound, so its host-bound corner has
# 1 x 1024 and 1 x 512 ga4 beside 1 x 512, and Qwen3's 1 x 1024 between its 1 x 512 and 1 x 2048 (tenth session).
LOO = [
    ("loo-scout-r32", SCOUT, _lora(32), [(512, 1, 1), (2048, 1, 1), (2048, 1, 4), (512, 8, 1), (1024, 8, 1),
                                         (4096, 2, 1), (8192, 1, 1), (16384, 1, 1)]),
    ("loo-llama3.1-8b-r16", DENSE, _lora(16), [(512, 1, 1), (1024, 1, 1), (512, 1, 4), (2048, 1, 1), (2048, 1, 8),
                                               (2048, 2, 4), (512, 4, 2), (1024, 8, 2), (512, 8, 1), (4096, 4, 1),
                                               (16384, 1, 1)]),
    ("loo-qwen3-30b-a3b-r16", QWEN, _lora(16), [(512, 1, 2), (1024, 1, 1), (2048, 1, 1), (2048, 4, 1), (4096, 2, 1),
                                                (2048, 8, 1), (16384, 1, 1)]),
    ("loo-gpt-oss-20b-r16", GPT_OSS, _lora(16), [(512, 1, 1), (512, 1, 4), (512, 2, 2), (2048, 1, 1)]),
]
# train.offload_checkpoints (fourteenth session): the layouts auto picks with it under 80 GB, long sequences, and
# a dense model whose layers are short (the copies are the least hidden there)
OFFLOADED = [
    ("offload-scout-r32", SCOUT, _lora(32), [(2048, 8, 1, OFFLOAD), (2048, 4, 2, OFFLOAD), (16384, 1, 1, OFFLOAD)]),
    ("offload-llama3.1-8b-r16", DENSE, _lora(16), [(2048, 1, 1, OFFLOAD), (16384, 1, 1, OFFLOAD),
                                                   (4096, 4, 1, OFFLOAD)]),
]
SETS = {"all": GROUPS, "quick": QUICK, "issue4": ISSUE4, "loo": LOO, "offload": OFFLOADED,
        "dense": [g for g in GROUPS if g[1] == DENSE]}
# Per configuration of the loo set: warm-up 1, 2 timed steps, then one profiled step (GPU kernel time and count)
# unless a step is planned longer than PROFILE_MAX_S; a step planned longer than ONE_STEP_S is timed once.
LOO_STEPS, PROFILE_MAX_S, ONE_STEP_S = 2, 3.5, 8.0
PLANNED_SLACK = 1.3  # the runtime estimate's allowance for a step slower than planned
PROFILED_SLOWDOWN = 1.5  # a profiled step against an unprofiled one (CUPTI's per-kernel cost)
GROUP_START_S = 15.0  # a group's subprocess: start, import torch / transformers / bitsandbytes, CUDA context


def _default_fp32_linear_scales() -> bool:
    from moefit.config import QuantConfig

    return QuantConfig().fp32_linear_scales


def configs(which: str, timed_steps: int | None = None) -> list[dict]:
    """The configurations of set `which`; `timed_steps` replaces the loo set's LOO_STEPS (a step planned longer
    than ONE_STEP_S is still timed once)."""
    out = []
    for group, model, lora, shapes in SETS[which]:
        for seq, batch, *rest in shapes:
            keep, off = KEEP in rest, OFFLOAD in rest
            accum = next((x for x in rest if isinstance(x, int)), GRAD_ACCUM)
            name = f"{group}-s{seq}-b{batch}" + (f"-ga{accum}" if accum != GRAD_ACCUM else "") + \
                (f"-{KEEP}" if keep else "") + (f"-{OFFLOAD}" if off else "")
            rec = {"name": name, "group": group, "model": model, "num_layers": None, "seq_len": seq, "batch": batch,
                   "grad_accum": accum, "lora": lora, "optimizer": "adamw_8bit",
                   # every quantization setting the run used, so the record says it whatever the defaults become
                   "quant": {"weights": "nf4", "fp32_linear_scales": _default_fp32_linear_scales()},
                   "gradient_checkpointing": True, "keep_routed_gate_up": keep, "offload_checkpoints": off}
            out.append(dict(rec, **_protocol(rec, which, timed_steps)))
    return out


def _protocol(rec: dict, which: str, timed_steps: int | None = None) -> dict:
    """Warm-up, timed steps and whether to profile one more step; for the loo set, chosen by the planned step."""
    if which != "loo":
        return {"warmup": WARMUP, "steps": timed_steps or STEPS, "profile": False}
    step = _planned_step(rec) * PLANNED_SLACK
    return {"warmup": WARMUP, "steps": 1 if step > ONE_STEP_S else timed_steps or LOO_STEPS,
            "profile": step <= PROFILE_MAX_S}


def run_units(recs: list[dict], fresh: bool) -> list[list[dict]]:
    """The subprocesses to run, each a list of configurations: one per group (one build, the group's
    configurations one after another), or with `fresh` one per configuration (a build each: no configuration
    measured after another in the same process)."""
    if fresh:
        return [[r] for r in recs]
    return [[r for r in recs if r["group"] == g] for g in dict.fromkeys(r["group"] for r in recs)]


def _planned_step(rec: dict) -> float:
    from moefit.plan.validation import planned_for

    return planned_for(dict(rec, gpu="h200"))["step_s"]


def estimate_seconds(recs: list[dict], fresh: bool = False) -> dict[str, float]:
    """Seconds to measure each group on one H200: subprocess start, build (~0.35 s per billion parameters, as
    Scout's 108 B take ~40 s), and per configuration its warm-up, timed and profiled steps at the planned step
    time x PLANNED_SLACK, + 1 s of cache clearing."""
    from moefit.plan.model_facts import load_model_facts

    out: dict[str, float] = {}
    for rec in recs:
        if rec["group"] not in out or fresh:  # a subprocess and a build per group, or per configuration
            start = GROUP_START_S + 5 + 0.35 * load_model_facts(rec["model"]).total_params() / 1e9
            out[rec["group"]] = out.get(rec["group"], 0.0) + start
        step = _planned_step(rec) * PLANNED_SLACK
        out[rec["group"]] += 1 + step * (rec["warmup"] + rec["steps"] + PROFILED_SLOWDOWN * rec["profile"])
    return out


# ---------------------------------------------------------------------------------------------- GPU worker

def worker(recs: list[dict], device: str = "cuda") -> None:
    """Runs in a subprocess: one build, every configuration of the group; prints one JSON line per config that
    was measured ("RESULT ...") or failed ("FAILED ...": the error, and the group goes on)."""
    import gc

    import torch

    from moefit.bench import build_synthetic_model, measure_training
    from moefit.config import LoraConfig, QuantConfig
    from moefit.plan.validation import MEASURED_KEYS

    cuda = device.startswith("cuda")
    first = recs[0]
    t0 = time.perf_counter()
    model = build_synthetic_model(first["model"], num_layers=first["num_layers"], quant=QuantConfig(**first["quant"]),
                                  lora=LoraConfig(**first["lora"]), device=device,
                                  dtype=torch.bfloat16 if cuda else torch.float32, seed=0)
    build_s = time.perf_counter() - t0
    props = torch.cuda.get_device_properties(0) if cuda else None
    for rec in recs:
        for p in model.parameters():
            p.grad = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        try:
            m = measure_training(model, seq_len=rec["seq_len"], batch=rec["batch"], steps=rec.get("steps", STEPS),
                                 warmup=rec.get("warmup", WARMUP), optimizer=rec["optimizer"],
                                 gradient_checkpointing=rec["gradient_checkpointing"], grad_accum=rec["grad_accum"],
                                 keep_routed_gate_up=rec["keep_routed_gate_up"],
                                 offload_checkpoints=rec.get("offload_checkpoints", False),
                                 profile_kernels=rec.get("profile", False))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, measure the rest of the group
            print("FAILED " + json.dumps({"name": rec["name"], "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
            continue
        measured = {k: m[k] for k in MEASURED_KEYS if k in m}
        if cuda:
            free, total = torch.cuda.mem_get_info()
            measured["context_bytes"] = int((total - free) - torch.cuda.memory_reserved())  # outside the allocator
        rec = dict(rec, device_name=props.name if props else device, build_s=round(build_s, 1),
                   measure_s=round(time.perf_counter() - t1, 1), measured=measured)
        if props:
            rec["device_memory_bytes"] = props.total_memory
        print("RESULT " + json.dumps(rec), flush=True)


def _worker_command(recs: list[dict], device: str) -> list[str]:
    return [sys.executable, __file__, "--worker", json.dumps(recs), "--device", device]


def run_group(recs: list[dict], on_result=None, timeout_s: float | None = None, device: str = "cuda") -> list[dict]:
    """One subprocess for the group; `on_result(rec)` as each configuration's line arrives. Stops the group at
    `timeout_s` (what it measured by then stays). Each result says how many configurations its process measured
    before it (`measured_after`; 0: its peak is a run's alone, moefit.plan.validation.median_of_repeats)."""
    cmd = _worker_command(recs, device)
    order = [r["name"] for r in recs]
    got, failed, start = [], [], time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as err, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT) as proc:
        timer = None
        if timeout_s is not None:
            timer = threading.Timer(max(timeout_s, 1.0), proc.kill)
            timer.start()
        for line in proc.stdout:
            if line.startswith("RESULT "):
                got.append(json.loads(line[7:]))
                got[-1]["measured_after"] = order.index(got[-1]["name"])
                if on_result:
                    on_result(got[-1])
            elif line.startswith("FAILED "):
                failed.append(json.loads(line[7:]))
                print(f"  {failed[-1]['name']}: not measured: {failed[-1]['error']}", file=sys.stderr, flush=True)
        proc.wait()
        if timer:
            timer.cancel()
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0 or len(got) != len(recs):
        tail = "\n".join(stderr.splitlines()[-15:])
        why = "stopped at its time limit" if timeout_s is not None and time.perf_counter() - start >= timeout_s \
            else f"exit {proc.returncode}"
        print(f"group {recs[0]['group']}: {len(got)}/{len(recs)} configurations measured ({why}):\n{tail}",
              file=sys.stderr)
    return got


# ---------------------------------------------------------------------------------------------- reports

def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _measurement(doc: dict) -> dict:
    """The GPU run's own metadata, as recorded (never this machine's)."""
    return {k: doc[k] for k in ("command", "date", "gpu", "versions", "engine") if k in doc}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _with_plans(results: list[dict]) -> list[dict]:
    """Each record with the current planner's figures and its relative errors."""
    from moefit.plan.validation import compare, planned_for

    rows = []
    for rec in results:
        p, e = planned_for(rec), compare(rec)
        rows.append(dict(rec, planned={k: p.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes",
                                                             "total_bytes", "step_s", "peak_phase")}, error=e))
    return rows


def write_json(results: list[dict], out: Path, measurement: dict, skipped: int, fit: dict | None = None) -> list:
    rows = _with_plans(results)
    doc = {**measurement, "configurations_skipped": skipped, "results": rows}
    if fit:
        doc["calibration_fit"] = fit
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_validation.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return rows


def write_reports(results: list[dict], out: Path, measurement: dict, skipped: int, fit: dict | None = None,
                  loo_records: list[dict] | None = None, source: str | None = None) -> None:
    """JSON + Markdown report. `measurement`: command, date, gpu, versions of the GPU run (kept as recorded);
    `fit`: when/how calibration.json was fitted (only with --fit), reported on its own line; `loo_records`: the
    records the leave-one-out fits draw on (default `results`; with --fit, every file fitted), `source` the name
    the results have among them (a configuration recorded in several files is keyed `name [source]` there)."""
    from moefit.plan.validation import leave_one_out

    rows = write_json(results, out, measurement, skipped, fit)
    pool = rows if loo_records is None else loo_records
    every = leave_one_out(pool) if len(pool) >= 4 else {}
    loo = {r["name"]: every.get(r["name"], every.get(f"{r['name']} [{source}]")) for r in rows}
    loo = {k: v for k, v in loo.items() if v is not None}
    g = 2**30
    lines = ["# Plan validation: measured vs planned peak memory and step time", "",
             f"- measured with: `{measurement['command']}`", f"- measured on: {measurement['gpu']}, "
             f"{measurement['date']}", "- versions at measurement: "
             + ", ".join(f"{k} {v}" for k, v in measurement["versions"].items()),
             f"- configurations not measured: {skipped}"]
    if measurement.get("median_of"):
        lines.append(f"- each row: the configuration's median over the calls recorded in {measurement['median_of']} "
                     "(step time, kernel time; peak memory over the calls that measured it first in its process, "
                     "where one did, as a run is: validation.median_of_repeats)")
    if fit:
        lines.append(f"- calibration fitted: {fit['date']} with `{fit['command']}` "
                     f"({', '.join(f'{k} {v}' for k, v in fit['versions'].items())}); planned columns use it")
    lines += ["",
              "Peak allocated = `torch.cuda.max_memory_allocated()` (tensors alive at the step's peak; the issue's "
              "<= 3 % acceptance is on this). Peak reserved = `max_memory_reserved()` (allocated + the caching "
              "allocator's cached, unused blocks). Total = reserved + the CUDA context outside the allocator "
              "(what nvidia-smi shows; what must fit on the GPU). Step = one optimizer step (grad_accum "
              f"{GRAD_ACCUM} unless the name ends in -gaN: the peak with gradients resident, as in an accumulating "
              "run), mean of the timed steps after a warm-up; LOO = the step-time error when the time constants "
              f"are fitted without that configuration (to the other {len(pool) - 1} records fitted).", "",
              "| config | alloc GiB meas. | planned | err | reserved GiB meas. | planned | err | total GiB meas. | "
              "planned | err | step s meas. | planned | err | LOO err |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    for r in rows:
        m, p, e = r["measured"], r["planned"], r["error"]
        step = "-" if p["step_s"] is None else f"{p['step_s']:.3f}"
        tot = m["peak_reserved_bytes"] + m["context_bytes"] if m.get("context_bytes") is not None else None
        lines.append(f"| {r['name']} | {m['peak_allocated_bytes'] / g:.2f} | {p['peak_allocated_bytes'] / g:.2f} | "
                     f"{_pct(e['allocated'])} | {m['peak_reserved_bytes'] / g:.2f} | "
                     f"{p['peak_reserved_bytes'] / g:.2f} | {_pct(e['reserved'])} | "
                     f"{'-' if tot is None else f'{tot / g:.2f}'} | {p['total_bytes'] / g:.2f} | "
                     f"{_pct(e.get('total'))} | {m['step_s']:.3f} | {step} | {_pct(e['step_time'])} | "
                     f"{_pct(loo.get(r['name']))} |")
    worst = {k: max((abs(r["error"][k]) for r in rows if r["error"].get(k) is not None), default=None)
             for k in ("allocated", "reserved", "total", "step_time")}
    worst["step_time_leave_one_out"] = max(map(abs, loo.values()), default=None)
    lines += ["", "max |error|: " + ", ".join(f"{k} {_pct(v)}" for k, v in worst.items()),
              "", "acceptance (issue 5): peak allocated <= 3 % and step time <= 15 % on every configuration: "
              + ("PASS" if worst["allocated"] is not None and worst["allocated"] <= 0.03
                 and worst["step_time"] is not None and worst["step_time"] <= 0.15 else "FAIL")]
    (out / "plan_validation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f} %"


# ---------------------------------------------------------------------------------------------- leave-one-out

# Recorded runs of an earlier engine, not of the one the planner models: the hosted embedding synced the device
# every micro-step until bae3b1f (2026-11-28 19:27 UTC; re-measured as step_ab_host_emb_nosync_h200).
# Llama 3.1 8B's 1 x 8 rows peaked at the loss with 1,024-token lm_head chunks, before the chunk was sized by bytes
# (moefit/loss_chunk.py, 2026-11-30: 512 tokens at its vocabulary): plan_validation.json's 8B rows were measured
# again then; these were not.
# Llama 3.1 8B's 1 x 8 rows of data_parallel.json / data_parallel_dense_repeat peaked at the loss with 1,024-token
# lm_head chunks, before the chunk was sized by bytes (moefit/loss_chunk.py, 2026-11-30); their step times (0.41-0.44
# s per micro-step) are also 25-30 % slower than the 8B rows measured again after it (plan_validation.json, same
# day, another host): left out of both fits.
# families_fitted_h200's Qwen3-30B and gpt-oss-20b rows were measured on the engine before the fifth session's set
# (CURRENT has these models again); step_ab_session5_call_e's "scales" row ran with fp32_linear_scales on, which the
# time model has no term for.
STALE = {"scout_qlora_settings:seed-1x8-host-emb:1x2048x8", "scout_qlora_settings:seed-2x4-host-emb:2x2048x4",
         "data_parallel:llama3.1-8b-r16-1x8:1x2048x8",
         "data_parallel_dense_repeat_h200x2:llama3.1-8b-r16-1x8:1x2048x8",
         "families_fitted_h200:qwen3-30b-a3b:1x2048x2", "families_fitted_h200:gpt-oss-20b:1x2048x2",
         "step_ab_session5_call_e_h200:scales:1x2048x8"}
# The one-GPU records on one H200 before issue 15, from four sessions, in every recorded format: the set the time
# constants were fitted to until the sixth session. The engine has run faster since (the steps of CURRENT, GPU-bound
# ones too: Scout 8 x 1024, busy 95 %, and the 4 x 2 auto layout were planned 15-18 % slow by those constants,
# Qwen3-30B at 4 x 2048, busy 95 %, 45 %), so they now plan these fast: 13-25 % for its Scout records, each planned
# with the decoder it ran (tests/test_plan_validation.py).
EARLIER = ["plan_validation.json", "scout_qlora_settings.json", "raw/step_ab_large_micro_batch_h200.json",
           "raw/step_ab_host_emb_nosync_h200.json", "data_parallel.json",
           "raw/data_parallel_dense_repeat_h200x2.json"]
# The records of the fifth session's engine (2026-11-30 17:30-18:10 UTC, four H200 hosts, bitsandbytes' NF4 decoder):
# the 27 configurations of the leave-one-out set on one host, the seed recipe 1 x 8 / 1 x 1 / 1 x 2 and the 4 x 2 auto
# layout, Llama 3.1 8B 1 x 2: the set the time constants were fitted to in the sixth session.
BNB_DECODER = ["raw/plan_validation_loo_one_host_session5_h200.json", "raw/step_ab_session5_call_e_h200.json",
               "raw/scout_auto_default_session5_call_f_h200.json", "raw/families_dense_call_d_h200.json"]
# The seventh session's engine (2026-11-30 22:00-22:10 UTC, one H200 host; NF4 decoded by moefit's Triton kernel,
# engine.nf4_decoder: triton-load, the default since; first passes issued eagerly): the 27 configurations of the
# leave-one-out set and the seed recipe at 1 x 8 and in its 4 x 2 auto layout (the same call's bitsandbytes rows are
# left out by engine): the set the time constants were fitted to until the tenth session.
SEVENTH = ["raw/plan_validation_loo_triton_load_session7_h200.json",
           "raw/step_ab_scales_in_kernel_session7_call_u_h200.json"]
# The records of the ninth to twelfth sessions' engine (first passes replayed from CUDA graphs, engine.layer_graphs,
# and the LoRA casts cached; the recomputation and backward issued eagerly): the leave-one-out set of 30
# configurations measured in three device calls on three H200 machines (2026-12-01: two in the tenth session, the
# first of them without the three configurations added after it; one in the eleventh). Host-bound steps of one
# configuration differ between the machines by up to 53 %, GPU-bound ones by 2.5 %: the memory constants are still
# fitted to each configuration's median over the calls (`--fit ... --median`;
# raw/plan_validation_first_pass_graphs_median_h200.md); the time constants were until the thirteenth session.
# All of them, like every synthetic-model record from 2026-11-30 07:39 to 2026-12-02, ran with frozen weights that
# decoded to 0 (moefit/bench/synthetic.py's old fill): 3.7-5.2 % less kernel time than real weights
# (raw/zero_weights_ab_session12_call_w_h200.json); peak memory is the same.
FIRST_PASS_GRAPHS = ["raw/plan_validation_loo30_session10_h200.json",
                     "raw/plan_validation_loo_graphs_fresh_session10_h200.json",
                     "raw/plan_validation_loo30_session11_h200.json"]
# The engine as it stands (thirteenth session, 2026-12-02: engine.backward_graphs on by default, every layer pass
# replayed from CUDA graphs; synthetic weights real since 455ee13): the leave-one-out set of 30 configurations
# measured in one device call on one H200 (call L), and again in the fourteenth session (call R, another H200, the
# code with an epoch's last batch padded and offloading beside it: the same peaks to the byte, steps within 3.5 %);
# all 30 a third time in the fifteenth, each in a process of its own (three calls V: Llama 3.1 8B, Qwen3-30B and
# gpt-oss-20b, Scout): alone they peak up to 0.77 GiB lower than after the group's others, within 1.4 % of the plan.
# Most of its steps are GPU-bound now (busy 74-99 %), so one machine stands for the others better than before. The
# shipped time constants are fitted to each configuration's median over the five files (`--fit <CURRENT's files>
# --median --fit-sections time`; peak memory from the calls that measured a configuration first in its process;
# plan_validation_current_engine.md, _loo.md).
CURRENT = ["raw/plan_validation_loo_session14_call_r_h200.json", "raw/plan_validation_loo_session13_call_l_h200.json",
           "raw/plan_validation_loo_llama_fresh_session15_call_v_h200.json",
           "raw/plan_validation_loo_qwen3_gpt_oss_fresh_session15_call_v_h200.json",
           "raw/plan_validation_loo_scout_fresh_session15_call_v_h200.json"]
FITTED = [*CURRENT]


def _engine() -> dict:
    """The engine settings every configuration runs with (the defaults: the set sets none)."""
    import dataclasses

    from moefit.config import EngineConfig

    return dataclasses.asdict(EngineConfig())


def load_records(paths: list[Path]) -> list[dict]:
    """The records of recorded benchmark files (any format `records_from_document` reads), less STALE."""
    from moefit.plan.validation import records_from_document

    out, zero = [], []
    for path in paths:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        out += [r for r in records_from_document(doc, Path(path).stem) if r["name"] not in STALE]
        if "synthetic_weights" not in doc:
            zero.append(Path(path).name)
    if zero and len(zero) < len(paths):
        print(f"warning: {len(zero)} of {len(paths)} files ran before 2026-12-02 with synthetic frozen weights that "
              f"decoded to 0 (4-6 % less GPU time than real ones; benchmarks/speed_targets.md, twelfth session): "
              f"{', '.join(zero)}. Fit or compare one kind at a time.", file=sys.stderr)
    return out


def this_engine(records: list[dict], decoder: str | None = None) -> list[dict]:
    """The records of one engine, `decoder`'s (default: the engine's default, which the shipped constants plan): a
    fit or a leave-one-out table over two engines would average them. Those left out are counted on stderr."""
    from moefit.plan.validation import other_engine

    kept, skipped = [], collections.Counter()
    for r in records:
        why = other_engine(r, decoder)
        if why:
            skipped[why] += 1
        else:
            kept.append(r)
    for why, n in skipped.items():
        print(f"left out {n} record(s) measured with {why}", file=sys.stderr)
    return kept


def loo_report(records: list[dict], title: str) -> tuple[list[str], dict]:
    """Markdown: per record, the measured step, the plan with the shipped calibration, the leave-one-out step
    error (time constants fitted without it), the peak-allocated error with the shipped constants and
    leave-one-out (memory constants fitted without it); and the maxima."""
    from moefit.plan.calibration import load_calibration
    from moefit.plan.validation import compare, fit_calibration, leave_one_out, planned_for, record_keys

    loo, keys = leave_one_out(records), record_keys(records)  # (a configuration measured twice: left out whole)
    memory_loo, memory_fits = {}, {}  # (memory constants fitted without a configuration: once per configuration)
    for rec, key in zip(records, keys, strict=True):
        if "peak_allocated_bytes" not in rec["measured"]:  # a record of step time only
            memory_loo[key] = None
            continue
        name = rec["name"]
        if name not in memory_fits:
            cal = fit_calibration([r for r in records if r["name"] != name], "leave-one-out", sections=("memory",))
            memory_fits[name] = {n: v for n, v in cal["memory"].items() if not n.startswith("_")}
        memory_loo[key] = compare(rec, dict(load_calibration(), memory=memory_fits[name]))["allocated"]
    lines = [f"# Leave-one-out: {title}", "",
             "Each configuration predicted by the planner's time constants fitted to all the others "
             "(validation.fit_time_constants); memory likewise with the memory constants. `plan` = the shipped "
             "calibration.json. Step = one optimizer step; GPU busy = profiled kernel time / step.", "",
             "| config | model | batch x seq x accum | step s meas. | GPU busy | plan | err | LOO err | "
             "alloc GiB meas. | alloc err | LOO alloc err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    g, worst = 2**30, {"step_time": 0.0, "step_time_leave_one_out": 0.0, "allocated": 0.0,
                       "allocated_leave_one_out": 0.0}
    for rec, key in zip(records, keys, strict=True):
        m, p, e = rec["measured"], planned_for(rec), compare(rec)
        busy = m.get("gpu_busy_fraction")
        alloc = f"{m['peak_allocated_bytes'] / g:.2f}" if "peak_allocated_bytes" in m else "(stale)"
        lines.append(f"| {key} | {rec['model']} | {rec['batch']} x {rec['seq_len']} x {rec['grad_accum']} | "
                     f"{m['step_s']:.3f} | {'-' if busy is None else f'{100 * busy:.0f} %'} | {p['step_s']:.3f} | "
                     f"{_pct(e['step_time'])} | {_pct(loo.get(key))} | {alloc} | {_pct(e['allocated'])} | "
                     f"{_pct(memory_loo[key])} |")
        for what, v in (("step_time", e["step_time"]), ("step_time_leave_one_out", loo.get(key)),
                        ("allocated", e["allocated"]), ("allocated_leave_one_out", memory_loo[key])):
            worst[what] = max(worst[what], abs(v or 0.0))
    lines += ["", f"{len(records)} records of {len(set(r['name'] for r in records))} configurations; max |error|: "
              + ", ".join(f"{k} {_pct(v)}" for k, v in worst.items()),
              "", "acceptance (issue 15): leave-one-out step time <= 15 % and peak allocated <= 3 % on every "
              "configuration: " + ("PASS" if worst["step_time_leave_one_out"] <= 0.15 and worst["allocated"] <= 0.03
                                   else "FAIL")]
    return lines, worst


def plan_only(which: str, timed_steps: int | None = None, fresh: bool = False) -> None:
    from moefit.plan.validation import planned_for

    g = 2**30
    recs = configs(which, timed_steps)
    print(f"{'config':44} {'alloc GiB':>10} {'reserved':>9} {'total':>7} {'step s (h200)':>14}  steps  peak at")
    for rec in recs:
        p = planned_for(dict(rec, gpu="h200"))
        proto = f"{rec['warmup']}+{rec['steps']}{'+p' if rec['profile'] else ''}"
        print(f"{rec['name']:44} {p['peak_allocated_bytes'] / g:10.2f} {p['peak_reserved_bytes'] / g:9.2f} "
              f"{p['total_bytes'] / g:7.2f} {p['step_s']:14.3f}  {proto:5}  {p['peak_phase']}")
    est = estimate_seconds(recs, fresh)
    print(f"\nto measure ({len(recs)} configurations; steps = warm-up + timed [+ profiled]; step times x "
          f"{PLANNED_SLACK}, builds ~0.35 s per billion parameters, {GROUP_START_S:.0f} s to start each "
          f"{'configuration' if fresh else 'group'}):")
    for group, sec in est.items():
        print(f"  {group:42} {sec:6.0f} s")
    print(f"  {'total':42} {sum(est.values()):6.0f} s = {sum(est.values()) / 60:.1f} min on one H200")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for plan_validation.json / .md")
    ap.add_argument("--configs", choices=sorted(SETS), default="all")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="measure only these configurations of the set (by name, as --plan-only prints them)")
    ap.add_argument("--deadline", type=float, metavar="S",
                    help="stop measuring after S seconds (what was measured is written)")
    ap.add_argument("--plan-only", action="store_true", help="print the plan of each configuration (no GPU)")
    ap.add_argument("--fit", type=Path, nargs="+", metavar="JSON",
                    help="refit moefit/plan/calibration.json to recorded runs (the report goes beside the first)")
    ap.add_argument("--median", action="store_true",
                    help="with --loo or --fit: a configuration recorded in several files counts once, at its median step "
                         "time (the typical machine; validation.median_of_repeats)")
    ap.add_argument("--fit-sections", default="memory,time",
                    help="with --fit: which constants to refit (memory, time or both; the others stay)")
    ap.add_argument("--loo", type=Path, nargs="+", metavar="JSON",
                    help="leave-one-out table of recorded runs (written beside the first as *_loo.md)")
    ap.add_argument("--fresh-process", action="store_true",
                    help="each configuration in a subprocess of its own, with its own build (slower; nothing "
                         "measured after another configuration in the same process)")
    ap.add_argument("--timed-steps", type=int, metavar="N",
                    help=f"timed steps per configuration (default {STEPS}; loo set {LOO_STEPS}, one for a step "
                         f"planned longer than {ONE_STEP_S:g} s)")
    ap.add_argument("--no-profile", action="store_true",
                    help="no profiled step after any configuration (kernel time and GPU busy are then not recorded): "
                         "whether profiling one configuration slows the next ones in the same process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.device)
        return 0
    if args.timed_steps is not None and args.timed_steps < 1:
        ap.error(f"--timed-steps must be at least 1, got {args.timed_steps}")
    if args.plan_only:
        plan_only(args.configs, args.timed_steps, args.fresh_process)
        return 0
    if args.loo:
        from moefit.plan.validation import record_decoder

        records = load_records(args.loo)  # the set's engine: its first record's
        if args.median:
            from moefit.plan.validation import median_of_repeats

            records = median_of_repeats(records)
        records = this_engine(records, record_decoder(records[0])) if records else records
        lines, worst = loo_report(records, ", ".join(str(p) for p in args.loo))
        suffix = "_loo_median.md" if args.median else "_loo.md"
        (args.loo[0].parent / f"{args.loo[0].stem}{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print("\n".join(lines))
        return 0 if worst["step_time_leave_one_out"] <= 0.15 and worst["allocated"] <= 0.03 else 1
    if args.fit:
        from moefit.plan.validation import fit_calibration, write_calibration

        doc = json.loads(args.fit[0].read_text(encoding="utf-8"))
        names = ", ".join(p.name for p in args.fit)
        records = this_engine(load_records(args.fit))
        if args.median:
            from moefit.plan.validation import median_of_repeats

            records = median_of_repeats(records)
        try:
            cal = fit_calibration(records, f"{doc['gpu']}, {doc['date']}, {names}",
                                  sections=tuple(args.fit_sections.split(",")))
        except ValueError as e:
            ap.error(f"--fit {names}: {e}")
        write_calibration(cal)
        print(json.dumps({k: cal[k] for k in ("memory", "time")}, indent=2))
        fit = {"command": " ".join(["python", "benchmarks/plan_validation.py", *sys.argv[1:]]), "date": _now(),
               "versions": _versions()}
        if args.median:  # the report's rows: each configuration at its median over the calls fitted
            docs = [json.loads(p.read_text(encoding="utf-8")) for p in args.fit]
            measurement = dict(_measurement(doc), command=" ; ".join(dict.fromkeys(d["command"] for d in docs)),
                               date=", ".join(d["date"] for d in docs), median_of=names)
            write_reports(records, args.fit[0].parent, measurement, doc.get("configurations_skipped", 0), fit)
        else:
            write_reports(doc["results"], args.fit[0].parent, _measurement(doc), doc.get("configurations_skipped", 0),
                          fit, records, args.fit[0].stem)
        return 0
    if not args.out:
        ap.error("--out DIR is required to measure (or use --plan-only / --fit / --loo)")
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: use --plan-only on CPU", file=sys.stderr)
        return 2
    recs = configs(args.configs, args.timed_steps)
    if args.no_profile:
        recs = [dict(r, profile=False) for r in recs]
    if args.only:
        unknown = sorted(set(args.only) - {r["name"] for r in recs})
        if unknown:
            ap.error(f"--only: not in --configs {args.configs}: {', '.join(unknown)} (--plan-only lists the names)")
        recs = [r for r in recs if r["name"] in args.only]
    command = " ".join(["python", "benchmarks/plan_validation.py", *sys.argv[1:]])
    results, t0 = [], time.perf_counter()

    def measurement() -> dict:
        from moefit.bench.synthetic import SYNTHETIC_WEIGHTS

        return {"command": command, "date": _now(), "gpu": results[0]["device_name"] if results else None,
                "versions": _versions(), "engine": _engine(), "synthetic_weights": SYNTHETIC_WEIGHTS}

    def keep(rec: dict) -> None:  # the JSON after every configuration: a run cut short loses nothing measured
        results.append({**rec, "engine": _engine()})
        write_json(results, args.out, measurement(), len(recs) - len(results))
        print(f"  {rec['name']}: step {rec['measured']['step_s']:.3f} s ({rec['measure_s']:.0f} s to measure), "
              f"{time.perf_counter() - t0:.0f} s so far", flush=True)

    for batch in run_units(recs, args.fresh_process):
        unit = batch[0]["name"] if args.fresh_process else batch[0]["group"]
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - t0)
        if left is not None and left < 30:
            print(f"{unit}: not started, {left:.0f} s left before --deadline", file=sys.stderr)
            continue
        got = run_group(batch, keep, left)
        print(f"{unit}: {len(got)}/{len(batch)} measured, {time.perf_counter() - t0:.0f} s so far", flush=True)
    write_reports(results, args.out, measurement(), len(recs) - len(results))
    return 0 if len(results) == len(recs) else 1


if __name__ == "__main__":
    sys.exit(main())

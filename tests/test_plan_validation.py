"""The planner against the GPU measurements recorded in benchmarks/ (issue 5 acceptance: max |planned - measured| /
measured <= 3 % for peak memory, <= 15 % for step time; issue 15: the same for leave-one-out step time), and the
calibration fit. The shipped time constants are fitted to the current engine's records (plan_validation.py CURRENT,
FITTED: every layer pass replayed from CUDA graphs since the thirteenth session, real synthetic weights);
benchmarks/plan_validation_current_engine.md is their table. The memory constants are still the ninth to twelfth
sessions' engine's (FIRST_PASS_GRAPHS)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from moefit.plan.calibration import load_calibration
from moefit.plan.validation import compare, fit_calibration, leave_one_out, planned_for, record_keys

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "benchmarks" / "plan_validation_current_engine.json"  # the 30 configurations, median of 3 calls


def _bench_module():
    spec = importlib.util.spec_from_file_location("plan_validation", ROOT / "benchmarks" / "plan_validation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_covers_the_required_configurations():
    recs = _bench_module().configs("all")
    assert len(recs) >= 10
    scout = [r for r in recs if r["model"] == "llama4-scout"]
    assert {r["seq_len"] for r in scout if r["lora"]["r"] == 32 and r["batch"] == 1} >= {1024, 2048, 4096, 8192}
    assert {r["lora"]["r"] for r in scout} >= {8, 32, 64}
    assert {r["lora"]["routed_experts"] for r in scout} == {True, False}
    assert {r["batch"] for r in recs} >= {1, 2}
    assert any(r["model"] == "llama3.1-8b" for r in recs)
    assert all(r["num_layers"] is None for r in scout)  # full depth


def _recorded() -> dict:
    assert RECORDED.exists(), f"{RECORDED.name} (the H200 measurements) is missing"
    return json.loads(RECORDED.read_text(encoding="utf-8"))


def test_planner_matches_recorded_gpu_measurements():
    """The shipped calibration against the 30 configurations of the current engine (every layer pass replayed from
    CUDA graphs) measured on one H200 (micro-batch 1-8, grad_accum 1-8, seq 512-16k; Scout, Llama 3.1 8B,
    Qwen3-30B, gpt-oss-20b), each configuration's median over the calls that measured it (peak memory over those
    that measured it first in its process, as a run is). Target (issue 5): peak allocated within 3 %, step time
    within 15 % on every one. As fitted: step time within 9.3 % on all, peak allocated within 1.4 % (Llama 3.1 8B
    read up to 5.2 % more after other configurations in the same process: benchmarks/speed_targets.md, fourteenth
    and fifteenth sessions), reserved within 6.7 % (the graphs' pool and the capture stream's cache counted)."""
    results = _recorded()["results"]
    assert len(results) == 30, f"{len(results)} configurations recorded"
    errors = {r["name"]: compare(r) for r in results}
    assert all(e["step_time"] is not None for e in errors.values()), "a record's GPU has no timing model"
    bad = {n: e for n, e in errors.items()
           if abs(e["allocated"]) > 0.03 or abs(e["step_time"]) > 0.094 or abs(e["reserved"]) > 0.07}
    assert not bad, f"planned vs measured out of bounds (relative errors): {bad}"
    assert sum(r["memory_alone"] for r in results) == 30


def _earlier_records(which: str = "EARLIER") -> list[dict]:
    mod = _bench_module()
    return mod.load_records([ROOT / "benchmarks" / f for f in getattr(mod, which)])


def test_step_time_model_generalises_leave_one_out():
    """Each configuration of the earlier engine's set (EARLIER: four sessions before issue 15), predicted by time
    constants fitted to the others of that set, stays within the 15 % acceptance."""
    loo = leave_one_out(_earlier_records())
    assert len(loo) >= 18
    # The one record of Llama 4's chunked attention over its 8,192-token chunk (SDPA with a mask) is the only one
    # that measures masked_attention_efficiency: left out, that constant has nothing to fit (16.8 % off). Held to
    # 20 % until the loo set's 16k Scout record joins it (benchmarks/plan_validation.py --configs loo).
    alone = {"scout-r32-s8192-b1": 0.20}
    bad = {n: e for n, e in loo.items() if abs(e) > alone.get(n, 0.15)}
    assert not bad, f"leave-one-out step-time errors out of bounds: {bad}"


def test_the_shipped_time_constants_fit_the_records_they_are_fitted_to():
    """The shipped calibration against the 30 configurations it is fitted to (CURRENT, five calls, each
    configuration's median): step time within 9.3 % on all (14.1 % before a MoE layer's pass had a GPU floor of its
    own, fifteenth session). The engine before the backward graphs (FIRST_PASS_GRAPHS: 30 configurations on three
    machines, zero synthetic weights) it plans within 17 % at each configuration's median (its Llama 3.1 8B rows
    with the backward eager planned slow), so data-parallel runs (whose backward stays eager) keep a plan near; the
    seventh session's engine (first passes issued eagerly, cast cache off) from 51 % fast (host-bound) to 32 % slow;
    the earlier engines' Scout records (EARLIER, decoded by bitsandbytes) from 8 % fast to 2 % slow."""
    from moefit.plan.validation import median_of_repeats

    mod = _bench_module()
    recs = median_of_repeats(mod.this_engine(_earlier_records("FITTED")))
    errors = {k: compare(r) for k, r in zip(record_keys(recs), recs, strict=True)}
    assert len(errors) == 30 and len({r["name"] for r in recs}) == 30
    assert all(abs(e["step_time"]) <= 0.094 for e in errors.values()), errors
    before = median_of_repeats(mod.this_engine(_earlier_records("FIRST_PASS_GRAPHS")))
    assert len(before) == 30 and all(abs(compare(r)["step_time"]) <= 0.175 for r in before)
    seventh = {r["name"]: compare(r)["step_time"] for r in mod.this_engine(_earlier_records("SEVENTH"))}
    assert len(seventh) == 29 and all(-0.53 <= e <= 0.33 for e in seventh.values()), seventh
    earlier = {r["name"]: compare(r)["step_time"] for r in _earlier_records() if r["model"] == "llama4-scout"}
    assert len(earlier) >= 14 and all(-0.09 <= e <= 0.025 for e in earlier.values()), earlier


def test_backward_graphs_set_leave_one_out_as_recorded():
    """Issue 15's acceptance on the current engine's set (CURRENT, five calls on H200s, every layer pass
    replayed; each configuration's median): each configuration predicted by time constants fitted to the other 29
    stays within 15 % (worst 14.8 %, Qwen3-30B 1 x 512, its only micro-step under 1,024 tokens; Scout 1 x 512 ga1
    31 % before the expert GEMMs' bank read was counted, 15.3 % before a MoE layer's pass had a GPU floor of its
    own), and peak allocated within 3 % (each configuration measured alone, in a process of its own: 1.4 % at
    worst)."""
    from moefit.plan.validation import median_of_repeats

    recs = median_of_repeats(_bench_module().this_engine(_earlier_records("CURRENT")))
    assert len(recs) == 30 and sum(r["memory_alone"] for r in recs) == 30
    loo = leave_one_out(recs)
    assert len(loo) == 30 and all(abs(e) <= 0.15 for e in loo.values()), loo
    assert all(abs(compare(r)["allocated"]) <= 0.03 for r in recs), {r["name"]: compare(r) for r in recs}


def test_records_of_another_nf4_decoder_are_left_out_of_fits(capsys):
    """A record names the engine it ran; a fit of the default engine leaves the others out and says how many."""
    mod = _bench_module()
    recs = _earlier_records("SEVENTH")
    assert len(recs) == 31 and sum((r.get("engine") or {}).get("nf4_decoder") == "bnb" for r in recs) == 2
    kept = mod.this_engine(recs)
    assert len(kept) == 29 and "left out 2 record(s) measured with engine.nf4_decoder=bnb" in capsys.readouterr().err
    # a recorded file that names no engine predates the Triton decoder's default: planned as bitsandbytes decoding
    legacy = _earlier_records("BNB_DECODER")
    assert legacy and all(r["engine"]["nf4_decoder"] == "bnb" for r in legacy)
    # families.json / data_parallel.json rows keep the engine with each run (newer ones): read from there
    from moefit.plan.validation import records_from_document

    fam = json.loads((ROOT / "benchmarks" / "families.json").read_text())
    decoders = {r["name"]: r["engine"]["nf4_decoder"] for r in records_from_document(fam, "families")}
    assert decoders and set(decoders.values()) == {"bnb", "triton-load"}, decoders  # older calls / eighth session
    for row in fam["results"]:
        if row.get("measured"):
            row["measured"]["engine"] = {"nf4_decoder": "triton-load"}
    assert {r["engine"]["nf4_decoder"] for r in records_from_document(fam, "families")} == {"triton-load"}
    seed = next(r for r in recs if r["name"].endswith("seed-load:1x2048x8"))
    as_bnb = copy.deepcopy(seed) | {"engine": {"nf4_decoder": "bnb"}}
    # the slower decoder costs time (a step the host leads: the decode partly hides behind the host's launches)
    assert planned_for(as_bnb)["step_s"] > planned_for(seed)["step_s"] * 1.01


def test_first_pass_graphs_set_leave_one_out():
    """Leave-one-out over every one of the previous engine's 87 records (FIRST_PASS_GRAPHS: 30 configurations,
    measured in three calls on three machines; a configuration is left out with all its records): 77 of 87 within
    15 %, none over 38 % (the family's host scale counts its layers' launches only since the thirteenth session: 80
    of 87 before; 78 before a MoE layer's pass had a GPU floor of its own, fifteenth session). The ten over are
    host-bound or nearly (GPU busy 27-85 %, one unprofiled): the same configuration measured on two machines differs
    by up to 53 % (Qwen3-30B 1 x 2048: 0.548 s and 0.841 s), more than the target itself
    (benchmarks/speed_targets.md, tenth and eleventh sessions)."""
    recs = _bench_module().this_engine(_earlier_records("FIRST_PASS_GRAPHS"))
    assert len(recs) == 87
    loo = leave_one_out(recs)
    assert len(loo) == 87
    over = {n: e for n, e in loo.items() if abs(e) > 0.15}
    assert len(over) <= 10 and all(abs(e) <= 0.38 for e in loo.values()), over
    busy = {k: r["measured"].get("gpu_busy_fraction") or 0 for k, r in zip(record_keys(recs), recs, strict=True)}
    assert all(busy[n] < 0.9 for n in over), {n: busy[n] for n in over}


def test_first_pass_graphs_medians_leave_one_out():
    """The previous engine's records with each configuration counted once at its median over the calls that
    measured it (the typical machine; `plan_validation.py --loo ... --median`; the memory constants are still fitted
    to them): leave-one-out step time within 15 % on all 30 (worst 13.4 %), peak allocated within 3 % on all
    (2.7 %)."""
    from moefit.plan.validation import median_of_repeats

    recs = median_of_repeats(_bench_module().this_engine(_earlier_records("FIRST_PASS_GRAPHS")))
    assert len(recs) == 30 and sum(r["repeats"] == 3 for r in recs) == 27 and sum(r["repeats"] == 2 for r in recs) == 3
    loo = leave_one_out(recs)
    assert len(loo) == 30 and all(abs(e) <= 0.15 for e in loo.values()), loo
    assert all(abs(compare(r)["allocated"]) <= 0.03 for r in recs)


def test_median_of_repeats_takes_each_configurations_median():
    from moefit.plan.validation import median_of_repeats

    def rec(name, step, source, kernel=None):
        return {"name": name, "source": source, "measured": {"step_s": step, "peak_allocated_bytes": 100,
                                                             **({"kernel_s": kernel} if kernel else {})}}

    got = median_of_repeats([rec("a", 1.0, "x", 0.5), rec("b", 2.0, "x"), rec("a", 3.0, "y"), rec("a", 1.5, "z", 0.7)])
    assert [r["name"] for r in got] == ["a", "b"] and [r["repeats"] for r in got] == [3, 1]
    assert got[0]["measured"] == {"step_s": 1.5, "kernel_s": 0.6, "peak_allocated_bytes": 100}
    assert got[0]["source"] == "median of x, y, z" and got[1]["measured"]["step_s"] == 2.0 and got[1]["source"] == "x"


def test_peak_memory_is_taken_from_the_runs_measured_alone():
    """A configuration measured after others in one process reads what they left cached (Llama 3.1 8B up to
    0.77 GiB): its peak memory comes from the records measured first in their process where there are any, its
    step time from all. Older documents say it by their order within a group, or by --fresh-process."""
    from moefit.plan.validation import median_of_repeats, records_from_document

    def row(name, group, step, peak, **extra):
        return {"name": name, "group": group, "measured": {"step_s": step, "peak_allocated_bytes": peak}, **extra}

    grouped = {"command": "python benchmarks/plan_validation.py --configs loo", "engine": {"nf4_decoder": "x"},
               "results": [row("a", "g1", 1.0, 100), row("b", "g1", 2.0, 210), row("c", "g2", 3.0, 300)]}
    fresh = {"command": "python benchmarks/plan_validation.py --only b --fresh-process",
             "results": [row("b", "g1", 2.4, 200)]}
    recorded = {"command": "python benchmarks/plan_validation.py --only b",  # as written since the fifteenth session
                "results": [row("b", "g1", 1.9, 205, measured_after=3)]}
    recs = [r for doc, src in ((grouped, "x"), (fresh, "y"), (recorded, "z")) for r in records_from_document(doc, src)]
    assert [r["measured_after"] for r in recs] == [0, 1, 0, 0, 3]
    got = {r["name"]: r for r in median_of_repeats(recs)}
    assert got["b"]["measured"]["step_s"] == 2.0 and got["b"]["measured"]["peak_allocated_bytes"] == 200
    assert got["b"]["memory_alone"] and got["b"]["repeats"] == 3 and got["a"]["memory_alone"]
    # none alone: the median of all
    late = [dict(r, measured_after=2) for r in recs if r["name"] == "b"]
    only = median_of_repeats(late)[0]
    assert not only["memory_alone"] and only["measured"]["peak_allocated_bytes"] == 205


def test_loo_set_spans_the_issue_15_space_in_one_gpu_call():
    """Issue 15's set: >= 20 configurations over micro-batch 1-8, grad_accum 1-8, sequences 512-16k, dense and MoE,
    measurable in one call of under ~8 minutes on one H200 (the estimate allows 30 % slower steps than planned)."""
    mod = _bench_module()
    recs = mod.configs("loo")
    assert len(recs) >= 24
    assert {r["batch"] for r in recs} >= {1, 2, 4, 8} and max(r["batch"] for r in recs) == 8
    assert {r["grad_accum"] for r in recs} >= {1, 2, 4, 8}
    assert min(r["seq_len"] for r in recs) == 512 and max(r["seq_len"] for r in recs) == 16384
    models = {r["model"] for r in recs}
    assert {"llama3.1-8b", "llama4-scout"} <= models and len(models) >= 3
    assert len({r["name"] for r in recs}) == len(recs)
    for model in models:  # every model host-bound (micro-batch 1) and with many tokens per micro-step
        mine = [r for r in recs if r["model"] == model]
        assert len(mine) >= 4 and min(r["batch"] * r["seq_len"] for r in mine) <= 2048
        assert max(r["batch"] * r["seq_len"] for r in mine) >= 8192 or model == "gpt-oss-20b"
    assert all(r["warmup"] == 1 and 1 <= r["steps"] <= 2 for r in recs)
    assert sum(mod.estimate_seconds(recs).values()) <= 480
    groups = [r["group"] for r in recs]
    assert groups == sorted(groups, key=groups.index)  # one build per group: its configurations together


def test_fresh_processes_and_more_timed_steps_for_the_next_set():
    """--fresh-process: one subprocess (and build) per configuration, and the estimate counts each build;
    --timed-steps N: N timed steps, except a step planned longer than ONE_STEP_S (timed once). Every record says
    its quantization settings, whatever the defaults become."""
    mod = _bench_module()
    recs = mod.configs("loo", timed_steps=5)
    assert {r["steps"] for r in recs} == {1, 5}
    assert all(r["steps"] == 5 for r in recs if mod._planned_step(r) * mod.PLANNED_SLACK <= mod.ONE_STEP_S)
    assert all("fp32_linear_scales" in r["quant"] for r in recs)
    grouped, fresh = mod.run_units(recs, fresh=False), mod.run_units(recs, fresh=True)
    assert len(grouped) == len({r["group"] for r in recs}) and len(fresh) == len(recs)
    assert [r["name"] for u in fresh for r in u] == [r["name"] for u in grouped for r in u]
    assert sum(mod.estimate_seconds(recs, fresh=True).values()) > sum(mod.estimate_seconds(recs).values()) + 200


def test_earlier_records_are_read_from_every_recorded_format():
    """plan_validation.json, moefit bench documents (one, or a dict of them) and data_parallel.json's one-GPU rows
    become records the planner re-plans; the runs of an engine since changed (STALE) are left out."""
    recs = _earlier_records()
    names = {r["name"] for r in recs}
    assert len(recs) == len(names) == 18
    assert "scout_qlora_settings:seed-1x8:1x2048x8" in names and "data_parallel:scout-seed-1x8:1x2048x8" in names
    assert not names & _bench_module().STALE
    from moefit.plan.validation import records_from_document

    fitted = ROOT / "benchmarks" / "raw" / "families_fitted_h200.json"
    families = {r["name"]: r for r in records_from_document(json.loads(fitted.read_text()), fitted.stem)}
    oss = families["families_fitted_h200:gpt-oss-20b:1x2048x2"]  # flags and "--option value" pairs of moefit bench read apart
    assert oss["quant"]["embeddings_on_host"] is True and oss["lora"]["dtype"] == "bfloat16"
    scout_8x1 = next(r for r in recs if r["name"] == "step_ab_large_micro_batch_h200:seed-8x1:8x2048x1")
    assert scout_8x1["measured"]["kernel_s"] > 0 and scout_8x1["num_layers"] is None
    assert scout_8x1["lora"]["r"] == 32 and scout_8x1["quant"]["embeddings_on_host"] is False
    dense = families["families_fitted_h200:llama3.1-8b:1x2048x2"] if "families_fitted_h200:llama3.1-8b:1x2048x2" in families else \
        next(r for r in recs if r["name"] == "llama3.1-8b-r32-s2048-b1")
    assert dense["model"] == "llama3.1-8b" and dense["grad_accum"] == 2


def test_fit_report_keeps_the_gpu_measurement_metadata(tmp_path):
    doc = _recorded()
    mod = _bench_module()
    fit = {"command": "python benchmarks/plan_validation.py --fit x.json", "date": "2030-01-01T00:00:00+00:00",
           "versions": {"python": "0.0-test"}}
    mod.write_reports(copy.deepcopy(doc["results"]), tmp_path, mod._measurement(doc), 0, fit)
    out = json.loads((tmp_path / "plan_validation.json").read_text(encoding="utf-8"))
    assert {k: out[k] for k in ("command", "date", "gpu", "versions", "engine")} == mod._measurement(doc)
    assert out["engine"]["nf4_decoder"] == "triton-load"
    assert out["calibration_fit"] == fit
    assert [r["measured"] for r in out["results"]] == [r["measured"] for r in doc["results"]]
    md = (tmp_path / "plan_validation.md").read_text(encoding="utf-8")
    assert doc["date"] in md and doc["versions"]["torch"] in md and "0.0-test" in md and "acceptance (issue 5)" in md


def _synthetic(recs: list[dict], truth: dict) -> list[dict]:
    """'Measurements' made by the planner with known constants (step and GPU kernel time)."""
    from moefit.plan.validation import _TimeRecords

    for r in recs:
        r["gpu"] = "h200"
        p = planned_for(r, truth)
        r["measured"] = {"peak_allocated_bytes": p["peak_allocated_bytes"],
                         "peak_reserved_bytes": p["peak_reserved_bytes"], "step_s": p["step_s"],
                         "optimizer_s": p["optimizer_s"], "context_bytes": 600 << 20}
    kernel = _TimeRecords(recs, truth).predict(truth["time"])[1]
    for r, k in zip(recs, kernel, strict=True):
        r["measured"]["kernel_s"] = float(k)
    return recs


TRUTH_TIME = dict(gemm_efficiency=0.5, attention_efficiency=0.35, masked_attention_efficiency=0.15,
                  activation_bandwidth_efficiency=0.2, gpu_layer_pass_s=2e-4, moe_layer_pass_s=0.006,
                  dense_layer_pass_s=0.004, expert_lora_layer_pass_s=0.001, host_micro_step_s=0.03,
                  optimizer_tensor_s=3e-5, overlap_exponent=4.0, host_family_scale={"qwen3_moe": 0.8},
                  gpu_family_scale={"qwen3_moe": 1.2})


def test_fit_recovers_known_constants():
    """Fake 'measurements' made by the planner with known constants: the fit must find them again (the time
    constants that the records separate; the weak prior costs a little)."""
    mod = _bench_module()
    recs = mod.configs("all") + mod.configs("loo")
    truth = copy.deepcopy(load_calibration())
    truth["memory"].update(working_set_scale=1.3, activation_scale=1.0, extra_allocated_bytes=300 << 20,
                           allocator_dynamic_reserve_fraction=0.05, allocator_fixed_reserve_bytes=100 << 20,
                           cuda_context_bytes=600 << 20)
    truth["time"].update(TRUTH_TIME)
    recs = _synthetic(recs, truth)
    fitted = fit_calibration(recs, "synthetic")
    cal = {s: {k: v for k, v in fitted[s].items() if not k.startswith("_")} for s in ("memory", "time")}
    assert cal["memory"]["working_set_scale"] == pytest.approx(1.3, rel=0.02)
    assert cal["memory"]["activation_scale"] == 1.0  # the checkpoints are exact tensors: not fitted
    assert cal["time"]["optimizer_tensor_s"] == pytest.approx(3e-5, rel=0.1)  # the measured updates pin it
    for k in ("gemm_efficiency", "attention_efficiency", "masked_attention_efficiency",
              "activation_bandwidth_efficiency", "moe_layer_pass_s", "dense_layer_pass_s", "overlap_exponent"):
        assert cal["time"][k] == pytest.approx(truth["time"][k], rel=0.1), k
    assert cal["time"]["host_family_scale"]["qwen3_moe"] == pytest.approx(0.8, rel=0.05)
    assert cal["time"]["gpu_family_scale"]["qwen3_moe"] == pytest.approx(1.2, rel=0.05)
    for r in recs:
        e = compare(r, cal)
        assert abs(e["allocated"]) < 0.002 and abs(e["reserved"]) < 0.005 and abs(e["step_time"]) < 0.01


def test_leave_one_out_predicts_each_record_from_the_others_only():
    """A small synthetic set: every record is predicted closely by a fit to the others; a record whose measurement
    is off by half is predicted as before (its own measurement never reaches its prediction), so its error
    shows, while it pulls the others' predictions by a few percent at most."""
    mod = _bench_module()
    recs = [r for r in mod.configs("loo") if r["model"] in ("llama3.1-8b", "llama4-scout")]
    truth = copy.deepcopy(load_calibration())
    truth["time"].update(TRUTH_TIME)
    recs = _synthetic(recs, truth)
    loo = leave_one_out(recs, truth)
    assert set(loo) == {r["name"] for r in recs} and max(map(abs, loo.values())) < 0.05
    odd = recs[3]["name"]
    recs[3]["measured"]["step_s"] *= 1.5
    loo_odd = leave_one_out(recs, truth)
    assert loo_odd[odd] == pytest.approx((1 + loo[odd]) / 1.5 - 1, abs=1e-9)
    assert max(abs(v) for n, v in loo_odd.items() if n != odd) < 0.12


def test_loo_report_is_a_markdown_table_with_the_maxima():
    mod = _bench_module()
    recs = [r for r in mod.configs("loo") if r["model"] == "llama3.1-8b"][:5]
    truth = copy.deepcopy(load_calibration())
    recs = _synthetic(recs, truth)
    lines, worst = mod.loo_report(recs, "synthetic")
    table = [ln for ln in lines if ln.startswith("| loo-")]
    assert len(table) == 5 and all(ln.count("|") == 12 for ln in table)
    assert set(worst) == {"step_time", "step_time_leave_one_out", "allocated", "allocated_leave_one_out"}
    assert worst["step_time"] < 1e-9 and worst["allocated"] < 1e-9  # the truth itself: no in-sample error
    met = worst["step_time_leave_one_out"] <= 0.15 and worst["allocated"] <= 0.03  # as the report's line says
    assert lines[-1].endswith("PASS" if met else "FAIL")


def test_fit_of_the_time_section_leaves_the_memory_constants():
    """--fit-sections time: the step-time constants are refitted, the memory ones stay as they are; an unknown
    section is refused."""
    recs = _recorded()["results"]
    before = load_calibration()
    fitted = fit_calibration(recs, "synthetic", sections=("time",))
    assert {k: v for k, v in fitted["memory"].items() if not k.startswith("_")} == before["memory"]
    assert fitted["sections_measured_on"]["time"] == "synthetic" and fitted["measured_on"] == before["measured_on"]
    with pytest.raises(ValueError, match="fit sections"):
        fit_calibration(recs, "synthetic", sections=("speed",))


def test_a_group_is_measured_once_built_and_a_failing_configuration_does_not_stop_it(tmp_path, capsys):
    """The GPU worker on CPU with a tiny model: one build, one RESULT line per configuration measured, a FAILED
    line for one that raises (here an unknown optimizer; on the GPU, out of memory), and the group goes on."""
    from tests.test_engine_parity import tiny_config

    tiny_config(num_local_experts=4, num_experts_per_tok=1).save_pretrained(tmp_path)
    mod = _bench_module()
    base = {"group": "tiny", "model": str(tmp_path), "num_layers": None, "lora": mod._lora(4),
            "quant": {"weights": "nf4"}, "optimizer": "adamw", "gradient_checkpointing": True,
            "keep_routed_gate_up": False, "warmup": 0, "steps": 1, "profile": False}
    mod.worker([dict(base, name="a", seq_len=16, batch=1, grad_accum=1),
                dict(base, name="bad", seq_len=16, batch=1, grad_accum=1, optimizer="no-such-optimizer"),
                dict(base, name="c", seq_len=8, batch=2, grad_accum=2)], device="cpu")
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" ", 1)[0] for ln in lines] == ["RESULT", "FAILED", "RESULT"]
    got = [json.loads(ln[7:]) for ln in lines]
    assert got[1]["name"] == "bad" and "no-such-optimizer" in got[1]["error"]
    assert got[2]["measured"]["step_s"] > 0 and got[2]["grad_accum"] == 2 and "kernel_s" not in got[2]["measured"]


def test_each_result_is_kept_as_it_arrives_and_a_group_is_stopped_at_its_time_limit(monkeypatch, capsys):
    """run_group hands each configuration on as its line arrives (the caller writes the JSON then), reports
    failures, and a group past its time limit is stopped with what it measured kept. Each result says how many
    configurations its process measured before it (a failed one counts: it ran)."""
    import sys

    mod = _bench_module()
    script = ("import json, time\n"
              "print('RESULT ' + json.dumps({'name': 'a'}), flush=True)\n"
              "print('FAILED ' + json.dumps({'name': 'b', 'error': 'OutOfMemoryError: boom'}), flush=True)\n"
              "print('RESULT ' + json.dumps({'name': 'c'}), flush=True)\n"
              "time.sleep(30)\n"
              "print('RESULT ' + json.dumps({'name': 'd'}), flush=True)\n")
    monkeypatch.setattr(mod, "_worker_command", lambda recs, device: [sys.executable, "-c", script])
    arrived = []
    got = mod.run_group([{"group": "g", "name": n} for n in "abcd"], arrived.append, timeout_s=3.0)
    assert [r["name"] for r in got] == [r["name"] for r in arrived] == ["a", "c"]
    assert [r["measured_after"] for r in got] == [0, 2]
    err = capsys.readouterr().err
    assert "b: not measured: OutOfMemoryError" in err and "2/4 configurations measured (stopped at its time" in err


def test_issue_15_set_leave_one_out_as_recorded():
    """Issue 15's 27-configuration set, measured on one H200 (benchmarks/plan_validation_issue15.json; one
    configuration that ran beside another lane's work is kept out): each configuration predicted by time constants
    fitted to the others. The target is <= 15 % on all; recorded: 22 of 26, the worst 22.6 % (the dense 8B at 8 x 512
    on a host ~1.5x slower than the one the shipped constants saw; benchmarks/speed_targets.md). Holds that state:
    no more than 4 over 15 %, none over 25 %, and peak allocated within 3.5 % with the shipped constants."""
    _loo_state_holds("plan_validation_issue15.json", configurations=26, most_over=4, worst=0.25, allocated=0.035)


def _loo_state_holds(record: str, configurations: int, most_over: int, worst: float, allocated: float) -> None:
    """A recorded set of the four models: leave-one-out step time with at most `most_over` configurations over
    15 % and none over `worst`; peak allocated within `allocated` with the shipped constants."""
    recs = _bench_module().load_records([ROOT / "benchmarks" / record])
    assert len(recs) == configurations and len({r["model"] for r in recs}) == 4
    loo = leave_one_out(recs)
    assert len(loo) == configurations
    over = {n: e for n, e in loo.items() if abs(e) > 0.15}
    assert len(over) <= most_over and all(abs(e) <= worst for e in loo.values()), over
    assert all(abs(compare(r)["allocated"]) <= allocated for r in recs)


def test_one_host_set_leave_one_out_as_recorded():
    """The same 27 configurations measured again on one H200 host, one after another, nothing beside them
    (benchmarks/raw/plan_validation_loo_one_host_session5_h200.json, 2026-11-30 17:56). Target <= 15 % on all;
    recorded: 20 of 27, the worst gpt-oss-20b 1 x 2048 ga1 +25.1 % (benchmarks/speed_targets.md). Holds that state:
    no more than 7 over 15 %, none over 26 %; peak allocated within 3 % with the shipped constants."""
    _loo_state_holds("raw/plan_validation_loo_one_host_session5_h200.json", configurations=27, most_over=7,
                     worst=0.26, allocated=0.03)


def test_loading_records_of_zero_and_real_synthetic_weights_together_warns(tmp_path, capsys):
    """Records from before 2026-12-02 ran with frozen weights that decoded to 0 (4-6 % less GPU time): a fit or a
    comparison that mixes them with records of real weights is told which files are which."""
    mod = _bench_module()
    old = ROOT / "benchmarks" / "raw" / "plan_validation_loo30_session11_h200.json"
    new = tmp_path / "real.json"
    new.write_text(json.dumps(dict(json.loads(old.read_text()), synthetic_weights="random")), encoding="utf-8")
    assert len(mod.load_records([old, new])) == 2 * len(mod.load_records([old]))
    err = capsys.readouterr().err
    assert "1 of 2 files ran before 2026-12-02" in err and old.name in err and "real.json" not in err
    mod.load_records([new])
    assert "warning" not in capsys.readouterr().err


def test_offloaded_records_are_planned_offloaded():
    """A `moefit bench --offload-checkpoints` record (the fourteenth session's call R) is read with the setting, and
    planned with two saved layer inputs on the GPU instead of one per layer (its peak within 3 %)."""
    from moefit.plan.validation import records_from_document

    doc = json.loads((ROOT / "benchmarks" / "raw" / "offload_ab_session14_call_r_h200.json").read_text())
    recs = records_from_document(doc, "offload_ab")
    assert {r["name"].split(":")[1]: r["offload_checkpoints"] for r in recs} == {"offload": True, "plain": False}
    for r in recs:
        assert abs(compare(r)["allocated"]) <= 0.03, (r["name"], compare(r))
    by = {r["name"]: planned_for(r)["checkpoint_bytes"] for r in recs}
    assert by["offload_ab:offload:1x2048x1"] < by["offload_ab:plain:1x2048x1"] / 10

"""A trial refit of the planner's time constants, written nowhere (calibration.json is left as shipped).

Three record sets: the shipped one (CURRENT of plan_validation.py), the same with the current-engine rows of
families.json, and that without call V's host-bound Llama 3.1 8B rows, which took 60-70 us of host per kernel
launch against 30-44 in every other dense record of four sessions and 30-45 for the other models of call V itself
(benchmarks/speed_targets.md, eighth session). For each: the in-sample and leave-one-out step-time errors.

    python benchmarks/refit_trial.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# call V's Llama 3.1 8B rows with the GPU busy under 80 % (or not profiled)
CALL_V_DENSE_HOST_BOUND = {
    "loo-llama3.1-8b-r16-s512-b1-ga1", "loo-llama3.1-8b-r16-s2048-b1-ga1", "loo-llama3.1-8b-r16-s2048-b1-ga8",
    "loo-llama3.1-8b-r16-s2048-b2-ga4", "loo-llama3.1-8b-r16-s512-b4", "loo-llama3.1-8b-r16-s512-b8-ga1"}


def _plan_validation():
    spec = importlib.util.spec_from_file_location("plan_validation", ROOT / "benchmarks" / "plan_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    from moefit.plan.validation import compare, fit_calibration, leave_one_out

    pv = _plan_validation()
    shipped = pv.this_engine(pv.load_records([ROOT / "benchmarks" / f for f in pv.CURRENT]))
    families = pv.this_engine(pv.load_records([ROOT / "benchmarks" / "families.json"]))
    sets = {"shipped set": shipped,
            "shipped + families.json": shipped + families,
            "shipped - call V's host-bound 8B rows + families.json":
                [r for r in shipped if r["name"] not in CALL_V_DENSE_HOST_BOUND] + families}
    for label, records in sets.items():
        cal = fit_calibration(records, "trial", sections=("time",))
        in_sample = {r["name"]: compare(r, cal)["step_time"] for r in records}
        loo = leave_one_out(records, cal)
        over = sorted(((n, round(100 * e, 1)) for n, e in loo.items() if abs(e) > 0.15), key=lambda x: -abs(x[1]))
        print(f"{label}: {len(records)} records; in-sample worst {100 * max(map(abs, in_sample.values())):.1f} %; "
              f"leave-one-out within 15 %: {sum(abs(e) <= 0.15 for e in loo.values())} of {len(loo)}, worst "
              f"{100 * max(map(abs, loo.values())):.1f} %")
        dense = in_sample.get("families:llama3.1-8b:1x2048x2")
        if dense is not None:
            print(f"  families' Llama 3.1 8B 1 x 2 in-sample: {100 * dense:+.1f} %")
        print(f"  over 15 % leave-one-out: {over}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

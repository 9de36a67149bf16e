"""Expert parallelism on the GPUs of one host, in one call: Llama 4 Maverick (400 B) at full depth on 2 GPUs, and
Scout expert-parallel against Scout data-parallel on the same 2 GPUs.

    python benchmarks/expert_parallel.py --out DIR [--gpus 2] [--configs maverick scout]   # on >= 2 GPUs
    python benchmarks/expert_parallel.py --plan-only [--gpus 2]   # what the planner says for each (CPU)
    python benchmarks/expert_parallel.py --fit-overlap benchmarks/expert_parallel.json   # refit the planner (CPU)

Each configuration is `moefit bench --json --gpus N [--expert-parallel N]` on synthetic weights (every rank builds
only its slice of the routed experts). Recorded per configuration: per-GPU peak memory against `moefit plan` for
the same layout, tokens/s of all GPUs, GPU busy, and the NCCL kernel time of one profiled step (the all-to-all of
the routed rows plus the all-reduce of the replicated LoRA). Maverick's expert rank is the largest of 32 / 16 / 8
that the planner says fits (reported). Writes DIR/expert_parallel.json and .md after every measurement.

--fit-overlap: under expert parallelism the host waits for every MoE layer's row counts, so host and GPU time
overlap less than in a one-GPU step; this refits calibration.json's `overlap_exponent_expert_parallel` (the
planner's only constant of its own for expert parallelism) to the recorded steps and prints the step-time
errors before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_parallel import (  # noqa: E402
    ALL_TARGETS,
    _bench,
    _now,
    _plan,
    _run_record,
    _versions,
    call_lines,
    merge_calls,
    plan_of,
    recorded_doc_command,
)

from moefit.plan.model_facts import load_model_facts  # noqa: E402

ATTN_SHARED_DENSE = "q,k,v,o,gate,up,down"  # gate/up/down reach the shared expert, dense MLPs and routed experts


def configs(gpus: int) -> dict[str, list[str]]:
    """name -> moefit bench arguments. Maverick: LoRA r=32 on attention, shared expert and dense MLPs, the routed
    experts at the largest rank the plan fits on `gpus` H200s."""
    maverick_rank = next((r for r in (32, 16, 8) if _fits(["--model", "llama4-maverick", "--seq-len", "2048",
                                                           "--batch", "1", "--grad-accum", "8", "--rank", "32",
                                                           "--expert-rank", str(r), "--targets", ATTN_SHARED_DENSE,
                                                           "--expert-parallel", str(gpus)], gpus)), 8)
    seed = ["--seq-len", "2048", "--batch", "1", "--grad-accum", "8", "--rank", "32", "--targets", ALL_TARGETS]

    def maverick(ep: int, rank: int) -> list[str]:
        return ["--model", "llama4-maverick", "--seq-len", "2048", "--batch", "1", "--grad-accum", "8", "--rank",
                "32", "--expert-rank", str(rank), "--targets", ATTN_SHARED_DENSE, "--expert-parallel", str(ep)]

    out = {f"maverick-ep{gpus}-expert-r{maverick_rank}": maverick(gpus, maverick_rank)}
    if gpus >= 4:  # expert x data: half the GPUs per expert group, two replicas
        half = gpus // 2
        rank = next((r for r in (32, 16, 8) if _fits(maverick(half, r), gpus)), 8)
        out[f"maverick-ep{half}-dp2-expert-r{rank}"] = maverick(half, rank)
    for model in ("qwen3-235b-a22b", "deepseek-v3"):  # issue 13's two largest families, where they fit
        # grad_accum 4: a step of ~12 s (not ~24), so that building, warm-up and two timed steps fit one call
        args = ["--model", model, "--seq-len", "2048", "--batch", "1", "--grad-accum", "4", "--rank", "16",
                "--targets", ALL_TARGETS, "--expert-parallel", str(gpus)]
        if load_model_facts(model).num_experts % gpus == 0 and _fits(args, gpus):
            out[f"{model}-ep{gpus}"] = args
    out[f"scout-seed-ep{gpus}"] = ["--model", "llama4-scout", *seed, "--expert-parallel", str(gpus)]
    out[f"scout-seed-dp{gpus}"] = ["--model", "llama4-scout", *seed]
    return out


def fit_overlap(doc: dict, source: Path) -> int:
    from moefit.plan.calibration import CALIBRATION_PATH
    from moefit.plan.validation import fit_overlap_exponent, measured_decoder, write_calibration

    rows = [r for r in doc["results"] if r.get("measured") and "--expert-parallel" in r["args"]]
    if not rows:
        print(f"{source}: no measured expert-parallel configuration to fit to", file=sys.stderr)
        return 1

    def planned() -> list[tuple[str, float, float, float, int, float]]:
        out = []
        for r in rows:
            st = plan_of(r["args"], doc["gpus"], measured_decoder(r["measured"])).gpus[0].step  # as it ran
            accum = int(dict(zip(r["args"][::2], r["args"][1::2], strict=False))["--grad-accum"])
            out.append((r["name"], st.gpu_s, st.overhead_s, st.step_s - accum * st.micro_step_s, accum,
                        r["measured"]["step_s"], st.step_s))
        return out

    before = planned()
    p = fit_overlap_exponent([x[1:6] for x in before])
    raw = json.loads(CALIBRATION_PATH.read_text(encoding="utf-8"))
    raw["time"]["overlap_exponent_expert_parallel"] = p
    raw["time"]["_overlap_exponent_expert_parallel"] = (
        "overlap_exponent for a micro-step under expert parallelism: the host reads each MoE layer's row counts "
        "before its all-to-all (a sync per layer and pass), so it cannot run ahead of the GPU and the two times "
        f"add up more. Fitted to {len(rows)} expert-parallel steps on {doc['gpus']} GPUs by "
        f"benchmarks/expert_parallel.py --fit-overlap {source.name} ({', '.join(x[0] for x in before)}).")
    write_calibration(raw)
    after = planned()
    print(f"overlap_exponent_expert_parallel = {p:.2f} (one-GPU steps: {raw['time']['overlap_exponent']:.2f})")
    for b, a in zip(before, after, strict=True):
        print(f"  {b[0]:28} measured {b[5]:7.3f} s  planned {b[6]:7.3f} s ({100 * (b[6] / b[5] - 1):+.1f} %) -> "
              f"{a[6]:7.3f} s ({100 * (a[6] / a[5] - 1):+.1f} %)")
    return 0


def _fits(args: list[str], gpus: int) -> bool:
    from moefit.plan.gpus import get_gpu

    return _plan(args, gpus)["total_bytes"] <= get_gpu("h200").memory_bytes  # the planner's catalogue


def report(doc: dict) -> str:
    g = 2**30
    calls, header = call_lines(doc, f"{doc['gpus']}x ")
    lines = [f"# Expert parallelism on {doc['gpus']} GPUs", "", *header]
    lines += ["",
             "| config | tokens/s | step s | peak alloc per GPU | plan | err | plan step | err | NCCL s | GPU busy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        m, p = r.get("measured"), r.get("plan") or {}
        name = r["name"] + (f" (call {r['call'] + 1})" if "call" in r and len(calls) > 1 else "")
        if not m:
            lines.append(f"| {name} | failed | | | | | | | | |")
            continue
        per = " / ".join(f"{b / g:.2f}" for b in m.get("peak_allocated_bytes_per_rank", [m["peak_allocated_bytes"]]))
        mem_err = (p["peak_allocated_bytes"] - m["peak_allocated_bytes"]) / m["peak_allocated_bytes"]
        step_err = (p["step_s"] - m["step_s"]) / m["step_s"] if p.get("step_s") else None
        lines.append(f"| {name} | {m['tokens_per_s']:.0f} | {m['step_s']:.3f} | {per} GiB | "
                     f"{p['peak_allocated_bytes'] / g:.2f} | {100 * mem_err:+.1f} % | {p.get('step_s') or 0:.3f} | "
                     f"{'-' if step_err is None else f'{100 * step_err:+.1f} %'} | {m.get('nccl_kernel_s', 0):.3f} | "
                     f"{100 * m.get('gpu_busy_fraction', 0):.0f} % |")
    return "\n".join(lines) + "\n"


def merge(docs: list[dict]) -> dict:
    """Several calls' records as one: per configuration the row of the latest call that measured it."""
    calls, rows = merge_calls(docs, "name")
    return {"gpus": docs[0]["gpus"], "calls": calls, "results": list(rows.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--merge", type=Path, nargs="+",
                    help="expert_parallel.json of several calls -> one (per config the latest call's row; stdout)")
    ap.add_argument("--report", type=Path, help="rewrite the .md from a JSON (stdout)")
    ap.add_argument("--configs", nargs="+", default=["all"], help="names (or prefixes: maverick, scout) to run")
    ap.add_argument("--fit-overlap", type=Path, metavar="JSON",
                    help="refit calibration.json's overlap_exponent_expert_parallel to this record")
    args = ap.parse_args()
    if args.fit_overlap:
        return fit_overlap(json.loads(args.fit_overlap.read_text()), args.fit_overlap)
    if recorded_doc_command(args, merge, report, Path(__file__).with_name("expert_parallel_reading.md")):
        return 0
    runs = configs(args.gpus)
    if args.configs != ["all"]:
        runs = {n: a for n, a in runs.items() if any(n.startswith(c) for c in args.configs)}
    if args.plan_only:
        for name, a in runs.items():
            print(name, _plan(a, args.gpus))
        return 0
    if not args.out:
        ap.error("--out DIR is required to measure")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(["python", "benchmarks/expert_parallel.py", *sys.argv[1:]]), "date": _now(),
           "gpus": args.gpus, "gpu": None, "versions": _versions(), "results": []}
    t0 = time.perf_counter()
    for name, a in runs.items():
        res, err = _bench(a, args.gpus)
        row = {"name": name, "args": a, "plan": _plan(a, args.gpus), "measured": _run_record(res) if res else None}
        if res is None:
            print(f"{name} failed:\n{err}", file=sys.stderr, flush=True)
        else:
            doc["gpu"] = doc["gpu"] or res["device_name"]
            m = row["measured"]
            print(f"{name:32} {m['tokens_per_s']:8.0f} tok/s  step {m['step_s']:.3f} s  peak "
                  f"{m['peak_allocated_bytes'] / 2**30:.2f} GiB  NCCL {m.get('nccl_kernel_s', 0):.3f} s  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        doc["results"].append(row)
        (args.out / "expert_parallel.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "expert_parallel.md").write_text(report(doc))
    print(report(doc))
    return 0 if all(r["measured"] for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

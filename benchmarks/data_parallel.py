"""Data parallel on the GPUs of one host: the same per-GPU layout on 1 GPU and on N GPUs, side by side in one call.

    python benchmarks/data_parallel.py --out DIR [--gpus 2] [--configs all|quick]   # on a multi-GPU host
    python benchmarks/data_parallel.py --plan-only [--gpus 2]                      # the plan of each config (CPU)
    python benchmarks/data_parallel.py --report DIR/data_parallel.json             # rewrite the .md from the JSON

Each configuration runs `moefit bench --json` twice on full-depth synthetic weights: once on one GPU, once with
`--gpus N` (N processes through torch's elastic launcher, DDP over the LoRA parameters, exactly as `moefit train
--gpus N` trains). Per-GPU peak memory against `moefit plan --num-gpus N`; scaling efficiency = N-GPU tokens/s /
(N x 1-GPU tokens/s); the time in NCCL kernels (the LoRA-gradient all-reduce) from one profiled step. Writes
DIR/data_parallel.json and DIR/data_parallel.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS, WARMUP = 2, 1
ALL_TARGETS = "q,k,v,o,gate,up,down"
# name -> moefit bench arguments (per GPU: every GPU runs this micro-batch layout)
CONFIGS = {
    "scout-seed-1x8": ["--model", "llama4-scout", "--seq-len", "2048", "--batch", "1", "--grad-accum", "8",
                       "--rank", "32", "--targets", ALL_TARGETS],
    "scout-attn-shared-1x4": ["--model", "llama4-scout", "--seq-len", "2048", "--batch", "1", "--grad-accum", "4",
                              "--rank", "32", "--expert-rank", "0", "--targets", ALL_TARGETS],
    "scout-2x4-host-embedding": ["--model", "llama4-scout", "--seq-len", "2048", "--batch", "2", "--grad-accum",
                                 "4", "--rank", "32", "--targets", ALL_TARGETS, "--embeddings-on-host"],
    "llama3.1-8b-r16-1x8": ["--model", "llama3.1-8b", "--seq-len", "2048", "--batch", "1", "--grad-accum", "8",
                            "--rank", "16", "--targets", ALL_TARGETS],
}
SETS = {"all": list(CONFIGS), "quick": ["scout-attn-shared-1x4", "llama3.1-8b-r16-1x8"], "seed": ["scout-seed-1x8"]}
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _bench_cmd(args: list[str], gpus: int) -> list[str]:
    cmd = [sys.executable, "-m", "moefit", "bench", *args, "--steps", str(STEPS), "--warmup", str(WARMUP), "--json"]
    return cmd + (["--gpus", str(gpus)] if gpus > 1 else [])


def _parse(proc: subprocess.CompletedProcess | tuple[int, str, str]) -> tuple[dict | None, str]:
    code, out, err = (proc.returncode, proc.stdout, proc.stderr) if hasattr(proc, "returncode") else proc
    start = out.find("{")
    try:
        return json.loads(out[start:]) if code == 0 and start >= 0 else None, err[-3000:]
    except json.JSONDecodeError:
        return None, err[-3000:] + out[-2000:]


def _bench(args: list[str], gpus: int) -> tuple[dict | None, str]:
    env = {**os.environ, **NCCL_ENV, "PYTHONUNBUFFERED": "1"}
    return _parse(subprocess.run(_bench_cmd(args, gpus), capture_output=True, text=True, cwd=ROOT, env=env))


def _bench_side_by_side(args: list[str], gpus: int) -> list[tuple[dict | None, str]]:
    """`gpus` independent one-GPU runs at the same time (no DDP, one GPU each): what sharing the host costs."""
    procs = []
    for i in range(gpus):
        env = {**os.environ, **NCCL_ENV, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": str(i)}
        procs.append(subprocess.Popen(_bench_cmd(args, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT, env=env))
    results = []
    for p in procs:
        out, err = p.communicate()
        results.append(_parse((p.returncode, out, err)))
    return results


def _plan(args: list[str], gpus: int, nf4_decoder: str | None = None, layer_graphs: bool | None = None) -> dict:
    """moefit plan for the same settings on `gpus` H200s (what `moefit bench` prints as planned); NF4 decoded by
    `nf4_decoder` (default: the engine's; a record is planned with the decoder it ran, validation.measured_decoder),
    engine.layer_graphs as given (default: the engine's)."""
    p = plan_of(args, gpus, nf4_decoder, layer_graphs)
    fit = p.gpus[0]
    return {"peak_allocated_bytes": p.memory.peak_allocated, "total_bytes": p.memory.total,
            "peak_phase": p.memory.peak_phase, "step_s": fit.step.step_s if fit.step else None,
            "allreduce_s": fit.step.allreduce_s if fit.step else None,
            "alltoall_s": fit.step.alltoall_s if fit.step else None}


def plan_of(args: list[str], gpus: int, nf4_decoder: str | None = None, layer_graphs: bool | None = None):
    """The moefit.plan.Plan of `moefit bench` arguments on `gpus` H200s (NF4 decoded by `nf4_decoder`, default the
    engine's)."""
    from moefit.plan import plan

    flags = {"--embeddings-on-host"}
    pairs = [x for x in args if x not in flags]
    a = dict(zip(pairs[::2], pairs[1::2], strict=False))
    er = a.get("--expert-rank")
    cfg = {"model": a["--model"], "seq_len": int(a["--seq-len"]), "batch": int(a["--batch"]),
           "grad_accum": int(a["--grad-accum"]), "rank": int(a["--rank"]),
           "expert_rank": int(er) if er is not None else None, "targets": a["--targets"].split(","),
           "num_gpus": gpus, "expert_parallel": int(a.get("--expert-parallel", 1))}
    from moefit.config import RunConfig

    base = RunConfig()
    base.lora.alpha = 2.0 * int(a["--rank"])
    base.quantization.embeddings_on_host = "--embeddings-on-host" in args
    base.lora.dtype = a.get("--lora-dtype", "float32")
    if nf4_decoder:
        base.engine.nf4_decoder = nf4_decoder
    if layer_graphs is not None:
        base.engine.layer_graphs = layer_graphs
    return plan(base, gpus=["h200"], search=False, **cfg)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "bitsandbytes", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def merge_calls(docs: list[dict], key: str) -> tuple[list[dict], dict[str, dict]]:
    """Records of several device calls as one: (each call's command/date/gpu/versions, row by `key` from the
    latest call that measured it, tagged with that call's index). A row keeps all its measurements from one call."""
    calls, rows = [], {}
    for doc in docs:
        first = len(calls)  # an already merged record brings its calls along, its rows keep theirs
        calls.extend(doc.get("calls") or [{k: doc.get(k) for k in ("command", "date", "gpu", "versions")}])
        for row in doc["results"]:
            if row.get("measured") or row[key] not in rows:
                rows[row[key]] = row | {"call": first + row.get("call", 0)}
    return calls, rows


def call_lines(doc: dict, gpus_prefix: str = "") -> tuple[list[dict], list[str]]:
    """A record's device calls (several after merge_calls, else the document's own) and a markdown line for each:
    command, date, GPU, versions."""
    calls = doc.get("calls") or [{k: doc.get(k) for k in ("command", "date", "gpu", "versions")}]
    lines = []
    for i, call in enumerate(calls):
        tag = f"call {i + 1}: " if len(calls) > 1 else ""
        lines.append(f"- {tag}`{call['command']}`, {call['date']}, {gpus_prefix}{call.get('gpu')}; "
                     + ", ".join(f"{k} {v}" for k, v in call["versions"].items()))
    return calls, lines


def recorded_doc_command(args, merge, report, reading: Path) -> bool:
    """`--merge FILES` (one merged JSON to stdout) or `--report FILE` (the .md to stdout, with the hand-written
    `reading` appended when it exists) of a benchmark script; False when neither was asked for."""
    if args.merge:
        print(json.dumps(merge([json.loads(p.read_text()) for p in args.merge]), indent=2))
        return True
    if args.report:
        sys.stdout.write(report(json.loads(args.report.read_text()))
                         + (reading.read_text() if reading.is_file() else ""))
        return True
    return False


def _run_record(res: dict) -> dict:
    return res["runs"][0] | {"build_s": res["build_s"], "device_name": res["device_name"],
                             "world_size": res.get("world_size", 1), "engine": res.get("engine")}


def measure(names: list[str], gpus: int, side_by_side: list[str], save) -> dict:
    """Measure every configuration; `save(doc)` is called after each measurement (a run cut short keeps what it
    measured)."""
    doc = {"command": " ".join(["python", "benchmarks/data_parallel.py", *sys.argv[1:]]), "date": _now(),
           "gpus": gpus, "gpu": None, "versions": _versions(), "steps": STEPS, "warmup": WARMUP, "results": []}
    t0 = time.perf_counter()
    for name in names:
        args = CONFIGS[name]
        row = {"name": name, "args": args}
        doc["results"].append(row)
        for n in (1, gpus):
            res, err = _bench(args, n)
            key = "one_gpu" if n == 1 else "n_gpus"
            if res is None:
                print(f"{name} on {n} GPU(s) failed:\n{err}", file=sys.stderr, flush=True)
                row[key] = None
                continue
            row[key] = _run_record(res)
            row[f"plan_{key}"] = _plan(args, n)
            doc["gpu"] = doc["gpu"] or res["device_name"]
            r = row[key]
            print(f"{name:28} {n} GPU: {r['tokens_per_s']:8.0f} tok/s  step {r['step_s']:.3f} s  peak "
                  f"{r['peak_allocated_bytes'] / 2**30:.2f} GiB  busy {100 * r.get('gpu_busy_fraction', 0):.0f} %  "
                  f"NCCL {r.get('nccl_kernel_s', 0):.3f} s  ({time.perf_counter() - t0:.0f} s)", flush=True)
            save(doc)
        if name in side_by_side:
            row["side_by_side"] = []
            for i, (res, err) in enumerate(_bench_side_by_side(args, gpus)):
                if res is None:
                    print(f"{name} side by side, GPU {i} failed:\n{err}", file=sys.stderr, flush=True)
                    continue
                r = _run_record(res)
                row["side_by_side"].append(r)
                print(f"{name:28} alone on GPU {i} while the other GPU runs the same: {r['tokens_per_s']:8.0f} tok/s"
                      f"  step {r['step_s']:.3f} s  busy {100 * r.get('gpu_busy_fraction', 0):.0f} %  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            save(doc)
    return doc


def report(doc: dict) -> str:
    g, n = 2**30, doc["gpus"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:+.1f} %"

    lines = [f"# Data parallel: 1 GPU against {n} GPUs at the same per-GPU layout", "",
             f"- command: `{doc['command']}`", f"- date: {doc['date']}, GPU: {n}x {doc['gpu']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
             f"- each row: mean of {doc['steps']} optimizer steps after {doc['warmup']} warm-up, synthetic weights at "
             "full depth; scaling = N-GPU tokens/s / (N x 1-GPU tokens/s); NCCL = kernel time of the gradient "
             "all-reduce in one profiled step; plan = `moefit plan --num-gpus N` for the same settings", "",
             f"| config | 1 GPU tok/s | {n} GPU tok/s | scaling | step s 1 / {n} | plan step {n} | err | "
             f"peak alloc 1 GPU | per GPU on {n} | plan | err | NCCL s | GPU busy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        one, many, p = r.get("one_gpu"), r.get("n_gpus"), r.get("plan_n_gpus") or {}
        if not one or not many:
            lines.append(f"| {r['name']} | failed | | | | | | | | | | | |")
            continue
        scaling = many["tokens_per_s"] / (n * one["tokens_per_s"])
        step_err = (p["step_s"] - many["step_s"]) / many["step_s"] if p.get("step_s") else None
        mem_err = (p["peak_allocated_bytes"] - many["peak_allocated_bytes"]) / many["peak_allocated_bytes"]
        per_gpu = " / ".join(f"{b / g:.2f}" for b in many.get("peak_allocated_bytes_per_rank",
                                                            [many["peak_allocated_bytes"]]))
        lines.append(
            f"| {r['name']} | {one['tokens_per_s']:.0f} | {many['tokens_per_s']:.0f} | {100 * scaling:.1f} % | "
            f"{one['step_s']:.3f} / {many['step_s']:.3f} | {p.get('step_s') or 0:.3f} | {pct(step_err)} | "
            f"{one['peak_allocated_bytes'] / g:.2f} | {per_gpu} | {p['peak_allocated_bytes'] / g:.2f} | "
            f"{pct(mem_err)} | {many.get('nccl_kernel_s', 0):.3f} | "
            f"{100 * many.get('gpu_busy_fraction', 0):.0f} % |")
    return "\n".join(lines) + "\n"


def main() -> int:
    global STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["all"],
                    help=f"configuration names ({', '.join(CONFIGS)}) or a set ({', '.join(SETS)})")
    ap.add_argument("--side-by-side", nargs="*", default=[],
                    help="also run these configurations as N independent one-GPU processes at once (no DDP): "
                         "the cost of sharing the host, apart from data parallelism")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 2)")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--report", type=Path, metavar="JSON")
    args = ap.parse_args()
    STEPS = args.steps or STEPS
    names = [n for c in args.configs for n in SETS.get(c, [c])]
    unknown = [n for n in names + args.side_by_side if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    if args.plan_only:
        for name in names:
            print(name, {n: _plan(CONFIGS[name], n) for n in (1, args.gpus)})
        return 0
    if args.report:
        doc = json.loads(args.report.read_text())
        args.report.with_suffix(".md").write_text(report(doc))
        print(report(doc))
        return 0
    if not args.out:
        ap.error("--out DIR is required to measure")
    args.out.mkdir(parents=True, exist_ok=True)

    def save(doc: dict) -> None:
        (args.out / "data_parallel.json").write_text(json.dumps(doc, indent=2) + "\n")

    doc = measure(names, args.gpus, args.side_by_side, save)
    text = report(doc)
    (args.out / "data_parallel.md").write_text(text)
    print(text)
    return 0 if all(r.get("one_gpu") and r.get("n_gpus") for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())

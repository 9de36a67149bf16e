"""Python garbage-collector pauses during training micro-steps, with and without the model frozen (moefit.host_gc).

    python benchmarks/gc_pauses.py --json benchmarks/gc_pauses.json    # CPU: Scout and Qwen3-30B, 48 layers
    python benchmarks/gc_pauses.py --report benchmarks/gc_pauses.json   # the markdown table from the JSON

The number of Python objects a training process holds (~450,000 from the imports, ~30,000 more for Scout's 48
layers) does not depend on the model's widths, so a full-depth model at tiny widths
(benchmarks/host_overhead.py's builder: every expert, top-k and routing rule of the real model) has the real one's
objects, and the collector's full collections walk all of them. The families one after the other in one process;
for each, the model built once, a warm-up optimizer step, then the same micro-steps unfrozen and frozen,
alternating in blocks of one optimizer step (grad_accum micro-steps), each collection timed by `gc.callbacks`. The micro-step times on a 2-core CPU shared with
other work are noisy; the collection times are the measure. On the GPU the same pauses stop the host from issuing
kernels (`moefit bench --engine gc_freeze=false` against the default measures the step).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = ("scout", "qwen3")


class Pauses:
    """Every collection's generation and duration while `on`."""

    def __init__(self):
        self.on, self.start, self.rows = False, 0.0, []

    def __call__(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self.start = time.perf_counter()
        else:
            self.rows.append((info["generation"], time.perf_counter() - self.start))

    def take(self) -> list[tuple[int, float]]:
        rows, self.rows = self.rows, []
        return rows


def measure(family: str, layers: int, steps: int, grad_accum: int, seq_len: int, device: str) -> dict:
    import host_overhead as ho

    from moefit.bench.measure import _make_optimizer
    from moefit.host_gc import frozen_heap

    if device == "cpu":
        import moefit.moe.grouped as grouped

        grouped.GROUPED_ON_CPU = True  # the GPU's expert path (host_overhead.py's CPU setting)
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = ho.build(family, layers=layers, width="tiny", device=device, dropout=0.05, tmp=Path(tmp))
    opt = _make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw_8bit")
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len))

    def optimizer_step() -> list[float]:
        times = []
        for _ in range(grad_accum):
            t0 = time.perf_counter()
            model(ids.to(model.input_device), labels=ids).loss.backward()
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        opt.step()
        opt.zero_grad()
        return times

    optimizer_step()  # warm-up: the optimizer's state, the decoder's first calls
    gc.collect()
    tracked = len(gc.get_objects())
    pauses = Pauses()
    gc.callbacks.append(pauses)
    out = {"unfrozen": {"micro_step_s": [], "collections": []}, "frozen": {"micro_step_s": [], "collections": []}}
    try:
        pauses.on = True
        for _ in range(steps):
            for mode in ("unfrozen", "frozen"):
                with frozen_heap(mode == "frozen"):
                    pauses.take()
                    out[mode]["micro_step_s"] += optimizer_step()
                    out[mode]["collections"] += pauses.take()
    finally:
        gc.callbacks.remove(pauses)
    return {"family": family, "layers": layers, "seq_len": seq_len, "grad_accum": grad_accum, "steps": steps,
            "tracked_objects": tracked, **out}


def summary(row: dict, mode: str) -> dict:
    m = row[mode]
    n = len(m["micro_step_s"])
    full = [s for g, s in m["collections"] if g == 2]
    young = [s for g, s in m["collections"] if g < 2]
    return {"micro_steps": n, "full": len(full), "full_ms": 1e3 * sum(full), "full_max_ms": 1e3 * max(full, default=0),
            "young": len(young), "young_ms": 1e3 * sum(young),
            "gc_ms_per_micro_step": 1e3 * (sum(full) + sum(young)) / max(n, 1),
            "median_micro_step_ms": 1e3 * sorted(m["micro_step_s"])[n // 2] if n else 0.0}


def report(doc: dict) -> str:
    lines = ["# Python garbage-collector pauses in training micro-steps", "",
             f"- `{doc['command']}`, {doc['date']}, {doc['device']}; python {doc['python']}, torch {doc['torch']}", "",
             "| model (full depth, tiny widths) | objects tracked | frozen | micro-steps | full collections | "
             "their total ms | longest ms | younger collections (ms) | GC ms per micro-step | median micro-step ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in doc["results"]:
        for mode in ("unfrozen", "frozen"):
            s = summary(row, mode)
            lines.append(f"| {row['family']} x {row['layers']} | {row['tracked_objects']:,} | "
                         f"{'yes' if mode == 'frozen' else 'no'} | {s['micro_steps']} | {s['full']} | "
                         f"{s['full_ms']:,.1f} | {s['full_max_ms']:,.1f} | {s['young']} ({s['young_ms']:,.1f}) | "
                         f"{s['gc_ms_per_micro_step']:,.1f} | {s['median_micro_step_ms']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--layers", type=int, default=48, help="MoE layers (both models have 48)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per mode, alternating")
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="write the results here (and the .md beside it)")
    ap.add_argument("--report", type=Path, help="print the markdown of a results JSON")
    args = ap.parse_args()
    if args.report:
        sys.stdout.write(report(json.loads(args.report.read_text())))
        return 0
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    doc = {"command": " ".join(["python", "benchmarks/gc_pauses.py", *sys.argv[1:]]),
           "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device,
           "python": platform.python_version(), "torch": torch.__version__, "results": []}
    for family in args.families.split(","):
        doc["results"].append(measure(family, args.layers, args.steps, args.grad_accum, args.seq_len, args.device))
        print(report(doc).splitlines()[-1], flush=True)
        if args.json:
            args.json.write_text(json.dumps(doc, indent=1))
            args.json.with_suffix(".md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

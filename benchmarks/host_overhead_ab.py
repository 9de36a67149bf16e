"""A/B of the host time per layer between two source trees, finely interleaved: one long-lived process per tree
(each imports moefit from its tree and builds the model once), one micro-step each in turn, so that both see the
same load on a shared machine. Both measure with this directory's benchmarks/host_overhead.py (same model,
stubs and clock); a tree only needs its moefit/.

    git archive 33b29a8 | tar -x -C /tmp/before          # a tree of the code to compare against
    python benchmarks/host_overhead_ab.py --before /tmp/before --after . --families qwen3,scout --steps 100
    python benchmarks/host_overhead_ab.py --before /tmp/before --after . --device cuda --width real --layers 4 \\
        --seq-len 2048 --families qwen3

Prints, per family, the median host ms per MoE layer and pass of each tree and the fastest micro-step's total.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PASSES = ("forward", "recompute", "backward")


def worker(tree: str, family: str, device: str, width: str, layers: int, seq_len: int) -> int:
    import tempfile
    import time

    import torch

    import moefit.moe.grouped as grouped  # from PYTHONPATH (the tree), before the tool puts its own root first

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import host_overhead as h  # one measuring tool for both trees

    if not grouped.__file__.startswith(str(Path(tree).resolve())):
        raise SystemExit(f"moefit imported from {grouped.__file__}, not from {tree}")
    cpu = device == "cpu"
    grouped.GROUPED_ON_CPU = cpu
    torch.set_num_threads(1)
    clock = time.thread_time if cpu and hasattr(time, "thread_time") else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp, (h.stubbed_kernels() if cpu else h.contextlib.nullcontext()):
        model = h.build(family, layers=layers, width=width, device=device, dropout=0.05, tmp=Path(tmp))
        ids = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            h.micro_step(model, ids)
        measured = [i for i in h.moe_layer_indices(model) if i > 0]
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            t = h.time_steps(model, ids, 1, clock)
            print(json.dumps({p: statistics.mean(t[i][p][-1] for i in measured) * 1e3 for p in PASSES}),
                  flush=True)
    return 0


def compare(args, family: str) -> dict:
    trees = {"before": args.before, "after": args.after}
    procs = {}
    for name, tree in trees.items():
        env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()), OMP_WAIT_POLICY="PASSIVE")
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(Path(tree).resolve()), "--families", family, "--device",
             args.device, "--width", args.width, "--layers", str(args.layers), "--seq-len", str(args.seq_len)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        for proc in procs.values():
            if proc.stdout.readline().strip() != "ready":
                raise SystemExit("a worker failed to start (run it alone with --worker to see why)")
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for i in range(args.steps):
            for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                procs[name].stdin.write("step\n")
                procs[name].stdin.flush()
                runs[name].append(json.loads(procs[name].stdout.readline()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
                proc.wait()
    out = {"family": family, "steps": args.steps}
    for name, rows in runs.items():
        out[name] = {p: statistics.median(r[p] for r in rows) for p in PASSES}
        out[name]["total"] = sum(out[name][p] for p in PASSES)
        out[name]["fastest_total"] = min(sum(r[p] for p in PASSES) for r in rows)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="source tree A (a directory holding moefit/)")
    ap.add_argument("--after", help="source tree B")
    ap.add_argument("--families", default="qwen3,scout,gpt-oss,mixtral,glm")
    ap.add_argument("--steps", type=int, default=40, help="micro-steps per tree, alternated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.families, args.device, args.width, args.layers, args.seq_len)
    if not (args.before and args.after):
        ap.error("--before and --after are required")
    results = []
    for family in args.families.split(","):
        r = compare(args, family)
        results.append(r)
        b, a = r["before"], r["after"]
        print(f"{family}: host ms per layer fwd / rec / bwd {' / '.join(f'{b[p]:.2f}' for p in PASSES)} -> "
              f"{' / '.join(f'{a[p]:.2f}' for p in PASSES)}; total {b['total']:.2f} -> {a['total']:.2f} "
              f"({(a['total'] / b['total'] - 1) * 100:+.1f} %), fastest {b['fastest_total']:.2f} -> "
              f"{a['fastest_total']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

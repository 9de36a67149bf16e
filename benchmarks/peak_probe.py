"""What is alive at a training step's peak allocated memory, by the code that allocated it (one GPU).

    python benchmarks/peak_probe.py --model llama3.1-8b --seq-len 16384 --out DIR/on.json
    python benchmarks/peak_probe.py --model llama3.1-8b --seq-len 16384 --engine backward_graphs=false --out DIR/off.json
    python benchmarks/peak_probe.py --diff DIR/off.json DIR/on.json     # CPU: what the second holds more, by site

Builds the synthetic model (real shapes, real NF4 weights, LoRA as the seed recipe sets it at --rank) with torch's
allocator history recording every allocation and free with its Python stack, runs `moefit.bench.measure_training`
(warm-up + timed steps, as `moefit bench` does), then replays the history: the running allocated bytes, their peak,
and the blocks alive at that moment, grouped by the innermost moefit (else transformers / torch) frame that
allocated them. Written to --out as JSON (peak, torch's own max_memory_allocated beside it, the groups). The planner
counts tensors by name (moefit/plan/memory.py); this says which ones a measured peak holds, e.g. what engine.
backward_graphs adds to Llama 3.1 8B's peak beyond the plan (benchmarks/speed_targets.md, thirteenth session).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ALLOC, FREE = "alloc", ("free_requested", "free_completed")


def _site(frames: list[dict[str, Any]]) -> str:
    """The innermost frame of moefit's own code (else transformers', else torch's, else the innermost one)."""
    for marker in ("/moefit/", "/transformers/", "/torch/"):
        for fr in frames:
            name = str(fr.get("filename", ""))
            if marker in name and "/moefit/bench/" not in name:
                return f"{marker.strip('/')}/{name.rsplit(marker, 1)[-1]}:{fr.get('line')} {fr.get('name')}"
    return f"{frames[0].get('filename')}:{frames[0].get('line')}" if frames else "(no stack)"


def live_at_peak(events: list[dict[str, Any]], start: int = 0) -> tuple[int, int, dict[int, dict[str, Any]]]:
    """Replay one device's allocator trace: (peak allocated bytes, the event index it was reached at, the blocks
    alive then by address), the peak sought from event `start` on (what is alive from before still counts). An
    allocation counts until its free is requested (the allocator's allocated-bytes statistic drops there); traces
    that record only completed frees use those. Frees of blocks allocated before the recording started are ignored
    (their allocation was not seen)."""
    free_action = "free_requested" if any(e.get("action") == "free_requested" for e in events) else "free_completed"
    live: dict[int, dict[str, Any]] = {}
    now = peak = peak_at = 0
    best: dict[int, dict[str, Any]] = {}
    for i, e in enumerate(events):
        action = e.get("action")
        if action == ALLOC:
            live[e["addr"]] = e
            now += e["size"]
            if now > peak and i >= start:
                peak, peak_at, best = now, i, dict(live)
        elif action == free_action and e["addr"] in live:
            now -= live.pop(e["addr"])["size"]
    return peak, peak_at, best


def group_by_site(blocks: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The blocks grouped by allocation site, largest first: site, bytes, count."""
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for b in blocks.values():
        s = sums[_site(b.get("frames") or [])]
        s[0] += b["size"]
        s[1] += 1
    return [{"site": k, "bytes": v[0], "count": v[1]} for k, v in sorted(sums.items(), key=lambda kv: -kv[1][0])]


def diff(before: dict[str, Any], after: dict[str, Any], top: int = 25) -> list[str]:
    """Lines: what `after`'s peak holds more (or less) than `before`'s, by site, largest differences first."""
    a = {g["site"]: g["bytes"] for g in before["groups"]}
    b = {g["site"]: g["bytes"] for g in after["groups"]}
    rows = sorted(((b.get(k, 0) - a.get(k, 0), k) for k in set(a) | set(b)), key=lambda r: -abs(r[0]))
    gib = 2**30
    lines = [f"peak allocated {before['peak_bytes'] / gib:.3f} -> {after['peak_bytes'] / gib:.3f} GiB "
             f"({(after['peak_bytes'] - before['peak_bytes']) / gib:+.3f}); "
             f"at {before.get('peak_site', '?')} -> {after.get('peak_site', '?')}"]
    lines += [f"  {d / gib:+8.3f} GiB  {k}" for d, k in rows[:top] if d]
    return lines


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from moefit import engine_switches
    from moefit.bench import build_synthetic_model, measure_training
    from moefit.config import LoraConfig

    engine_switches.use(engine_switches.parse(args.engine))
    torch.cuda.memory._record_memory_history(max_entries=args.max_entries)
    model = build_synthetic_model(args.model, num_layers=args.layers,
                                  lora=LoraConfig(r=args.rank, alpha=2.0 * args.rank), device="cuda")
    start = 0
    for spec in args.before:  # earlier measurements in the same process, as plan_validation.py runs a group
        seq, batch, accum = (int(x) for x in spec.split(","))
        measure_training(model, seq_len=seq, batch=batch, grad_accum=accum, steps=1, warmup=1,
                         profile_kernels=args.profile_before)
    if args.before:
        start = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()])
    result = measure_training(model, seq_len=args.seq_len, batch=args.batch, grad_accum=args.grad_accum,
                              steps=args.steps, warmup=1, profile_kernels=False,
                              offload_checkpoints=args.offload_checkpoints)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, at, blocks = live_at_peak(events, start)
    dropped = len(events) >= args.max_entries
    return {"command": " ".join(["python", "benchmarks/peak_probe.py", *sys.argv[1:]]),
            "model": args.model, "seq_len": args.seq_len, "batch": args.batch, "grad_accum": args.grad_accum,
            "before": args.before, "offload_checkpoints": args.offload_checkpoints,
            "engine": engine_switches.current().__dict__, "events": len(events),
            "history_full": dropped,  # the ring buffer overflowed: the earliest allocations are not in the replay
            "peak_bytes": peak, "peak_site": _site(events[at].get("frames") or []) if events else None,
            "torch_peak_allocated_bytes": result.get("peak_allocated_bytes"),
            "graph_pool_bytes": result.get("graph_pool_bytes"), "step_s": result["step_s"],
            "groups": group_by_site(blocks)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, help="the first N decoder layers only (default: all)")
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--before", action="append", default=[], metavar="SEQ,BATCH,ACCUM",
                    help="measure these first in the same process (the peak is sought after them)")
    ap.add_argument("--offload-checkpoints", action="store_true")
    ap.add_argument("--profile-before", action="store_true",
                    help="each --before measurement with its profiled step (as plan_validation.py's loo set)")
    ap.add_argument("--max-entries", type=int, default=2_000_000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--diff", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.diff:
        before, after = (json.loads(p.read_text(encoding="utf-8")) for p in args.diff)
        print("\n".join(diff(before, after)))
        return 0
    if not args.out:
        ap.error("--out FILE is required to measure (or use --diff)")
    doc = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    gib = 2**30
    print(f"peak {doc['peak_bytes'] / gib:.3f} GiB (torch {doc['torch_peak_allocated_bytes'] / gib:.3f}) at "
          f"{doc['peak_site']}; {doc['events']} events{' (history full)' if doc['history_full'] else ''}")
    for g in doc["groups"][:15]:
        print(f"  {g['bytes'] / gib:8.3f} GiB  {g['count']:6}  {g['site']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

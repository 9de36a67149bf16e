"""Throughput (GB/s) and peak host memory of a merged export at Llama 4 Scout's widths: workers 1 vs N, GPU vs CPU.

One command on the GPU machine (about 2 minutes on a 16-core H200 host; the slowest run is cut at --budget-s):

    python benchmarks/export_speed.py

builds a 1-layer Scout-width checkpoint (benchmarks/width_checkpoint.py: hidden 5120, 16 routed experts of 8192
and a shared one, the shipped tokenizer's vocabulary; 4.4 GB of bf16, 97 % of it routed experts as in the real
model) and a moefit run with random LoRA (r 16) on attention, shared and routed experts, then exports it, each
export in a fresh child process (peak RSS = the child's ru_maxrss), in the default mode (the NF4 round trip
of the base the run trained against, as `moefit export RUN --merge` does):

    gpu-N-first  --device cuda, N workers, first on the machine: what the first export pays (the checkpoint
             just written, CUDA and its kernels loaded for the first time; until the sixteenth session the NF4 round
             trip also compiled Triton's decoder here, now it decodes with bitsandbytes)
    gpu-N    --device cuda, N workers (default: moefit's, one per CPU, at most 8), each copying through a
             page-locked host buffer of its own (the default)
    gpu-N-pageable  the same through fresh pageable tensors (`pinned=False`: the code before the sixteenth session)
    gpu-M    --device cuda, M workers, for each further value of --workers (e.g. --workers 8 16)
    gpu-1    --device cuda, 1 worker
    gpu-N-base  --device cuda, N workers, into the original bf16 weights (--base)
    cpu-N    --device cpu, N workers
    cpu-1    --device cpu, 1 worker (the code before parallel export ran this way)

and checks the outputs: N workers against 1 on the same device must be the same bytes; GPU against CPU, the
fraction of values that differ and by how much (the NF4 round trip and the LoRA matmul round in the last bit
differently on the two). Without CUDA only the CPU rows run. Each row: GB/s and seconds of the export call (not
the interpreter start), the same after `sync` (the bytes on disk), peak RSS and RSS above an import-only child,
and seconds by phase (read, merge, write: summed over the workers).

Writes one JSON record, appended to --record (default benchmarks/export_speed.json), and prints it.

    python benchmarks/export_speed.py --hidden 1024 --layers 2 --workdir /tmp/x   # a small synthetic checkpoint
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_memory import IMPORTS, ROOT, _commit, build_checkpoint, build_run, child_env, child_run  # noqa: E402


def build(workdir: Path, args: argparse.Namespace, cuda: bool) -> dict:
    """The base checkpoint and the run, unless --reuse finds them."""
    base, run = workdir / "base", workdir / "run"
    if args.reuse and (base / "config.json").is_file() and (run / "adapter_model.safetensors").is_file():
        return {"build_s": 0.0, "reused": True}
    shutil.rmtree(workdir, ignore_errors=True)
    t = time.time()
    if args.hidden:
        build_checkpoint(base, args.layers, args.hidden, experts=16, vocab=32000)
    else:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "width_checkpoint.py"), str(base), "--preset",
                        "llama4-scout", "--layers", str(args.layers), "--device", "cuda" if cuda else "cpu"],
                       check=True, cwd=ROOT, env=child_env())
    build_run(run, base, r=args.rank)
    return {"build_s": round(time.time() - t, 1), "reused": False}


EXPORT = ("import json, moefit.export; r = moefit.export.export({run!r}, {out!r}, merge=True, device={device!r}, "
          "workers={workers}{base}, pinned={pinned}); print('RESULT', json.dumps(dict(bytes=r.total_bytes, seconds=r.seconds, "
          "gb_per_s=r.gb_per_s, workers=r.workers, device=r.device, shards=r.shards, phases=r.phase_seconds)))")


def export_row(workdir: Path, name: str, device: str, workers: int, base: bool, timeout: float,
               pinned: bool = True) -> dict:
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    code = f"{IMPORTS}; " + EXPORT.format(
        run=str(workdir / "run"), out=str(out), device=device, workers=workers,
        base=f", base={str(workdir / 'base')!r}" if base else "", pinned=pinned)
    row: dict = {"run": name, "device": device, "workers": workers,
                 "mode": "--base (original weights)" if base else "default (NF4 round trip)"}
    if device == "cuda":
        row["host_buffers"] = "page-locked, one per worker" if pinned else "pageable, fresh per piece"
    try:
        peak, wall, text = child_run(code, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        shutil.rmtree(out, ignore_errors=True)
        return {**row, "timed_out_after_s": round(timeout, 1)}
    t = time.time()
    os.sync()
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    sync_s = time.time() - t
    return {**row, "device": result["device"], "bytes": result["bytes"], "shards": result["shards"],
            "gb_per_s": round(result["gb_per_s"], 3), "seconds": round(result["seconds"], 2),
            "gb_per_s_with_sync": round(result["bytes"] / 1e9 / (result["seconds"] + sync_s), 3),
            "sync_s": round(sync_s, 2), "child_wall_s": round(wall, 1), "peak_rss_bytes": peak,
            "phase_seconds": {k: round(v, 2) for k, v in result["phases"].items()}}


def compare(a: Path, b: Path) -> dict:
    """Same bytes? Otherwise how many values differ and by how much (largest |a-b|, and relative to the
    tensor's largest |a|)."""
    index = json.loads((a / "model.safetensors.index.json").read_text())
    if index != json.loads((b / "model.safetensors.index.json").read_text()):
        return {"identical": False, "same_index": False}
    if all(_same_bytes(a / f, b / f) for f in sorted(set(index["weight_map"].values()))):
        return {"identical": True}
    from safetensors import safe_open

    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = differing = 0
    max_abs = max_rel = 0.0
    for name, fname in index["weight_map"].items():
        with safe_open(str(a / fname), "pt") as fa, safe_open(str(b / fname), "pt") as fb:
            x, y = fa.get_tensor(name).to(device), fb.get_tensor(name).to(device)
        values += x.numel()
        if not x.is_floating_point():
            differing += int((x != y).sum())
            continue
        diff = (x.float() - y.float()).abs()
        differing += int((diff > 0).sum())
        top = float(diff.max()) if diff.numel() else 0.0
        max_abs = max(max_abs, top)
        scale = float(x.float().abs().max()) if x.numel() else 0.0
        max_rel = max(max_rel, top / scale if scale else 0.0)
    return {"identical": False, "same_index": True, "values": values, "differing_values": differing,
            "differing_fraction": differing / max(values, 1), "max_abs_diff": max_abs,
            "max_diff_relative_to_tensor_max": max_rel}


def _same_bytes(a: Path, b: Path, chunk: int = 64 * 2**20) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def baseline(device: str) -> int:
    """Peak RSS of a child that imports what the export imports (and starts CUDA, for a GPU row)."""
    extra = "; torch.zeros(1, device='cuda')" if device == "cuda" else ""
    peak, _, _ = child_run(IMPORTS + extra)
    return peak


def main() -> int:
    from moefit.export.safetensors_stream import default_workers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moefit-export-speed"))
    ap.add_argument("--layers", type=int, default=1, help="decoder layers (Scout-width: 4.4 GB each)")
    ap.add_argument("--hidden", type=int, default=0,
                    help="instead of Scout's widths, a synthetic Llama 4 of this hidden size (export_memory.py's)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the run (default 16)")
    ap.add_argument("--workers", type=int, nargs="+", default=[default_workers()],
                    help="N (default: moefit's default here); more values add a GPU row each (gpu-M)")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="time for building and the runs (the comparisons take a few seconds more); a run that "
                         "would pass it is cut (the last, cpu-1, is the slowest) and recorded as timed out")
    ap.add_argument("--no-first", action="store_true",
                    help="no gpu-N-first row (gpu-N then pays what a first export on the machine pays)")
    ap.add_argument("--reuse", action="store_true", help="reuse the checkpoint and run already in --workdir")
    ap.add_argument("--keep", action="store_true", help="leave the exports in --workdir")
    ap.add_argument("--record", type=Path, default=ROOT / "benchmarks" / "export_speed.json",
                    help="append the JSON record to this file")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the moefit command sets it (see README)
    start = time.time()
    cuda = torch.cuda.is_available()
    built = build(args.workdir, args, cuda)
    os.sync()  # the checkpoint's own bytes are not counted in the first export's sync
    n, *more = args.workers
    plan = [("gpu-N", "cuda", n, False, {}), ("gpu-N-pageable", "cuda", n, False, {"pinned": False}),
            ("gpu-1", "cuda", 1, False, {}), ("gpu-N-base", "cuda", n, True, {})] if cuda else []
    plan[2:2] = [(f"gpu-{m}", "cuda", m, False, {}) for m in more if cuda]
    if cuda and not args.no_first:  # what the first export on a machine pays, apart from the others
        plan.insert(0, ("gpu-N-first", "cuda", n, False, {}))
    plan += [("cpu-N", "cpu", n, False, {}), ("cpu-1", "cpu", 1, False, {})]
    baselines = {d: baseline(d) for d in sorted({x[1] for x in plan})}
    pairs = (("gpu-N", "gpu-1"), ("gpu-N", "gpu-N-pageable"), ("cpu-N", "cpu-1"), ("gpu-N", "cpu-N"))
    compared = {x for pair in pairs for x in pair}
    rows = []
    for name, device, workers, base, extra in plan:
        row = export_row(args.workdir, name, device, workers, base, timeout=args.budget_s - (time.time() - start),
                         **extra)
        if "peak_rss_bytes" in row:
            row["rss_above_baseline_bytes"] = row["peak_rss_bytes"] - baselines[device]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if name not in compared and not args.keep:
            shutil.rmtree(args.workdir / name, ignore_errors=True)
    checks = {}
    for x, y in pairs:
        if (args.workdir / x).is_dir() and (args.workdir / y).is_dir():
            checks[f"{x} vs {y}"] = compare(args.workdir / x, args.workdir / y)
    if not args.keep:
        for name, *_ in plan:
            shutil.rmtree(args.workdir / name, ignore_errors=True)
    size = next((r["bytes"] for r in rows if "bytes" in r), 0)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
                   + (f", {torch.cuda.get_device_name()}" if cuda else ""),
        "torch": torch.__version__, "code": _commit(),
        "checkpoint": {"what": f"synthetic Llama 4, hidden {args.hidden}" if args.hidden else "Llama 4 Scout widths",
                       "layers": args.layers, "bytes": size, "lora_rank": args.rank, **built},
        "baseline_rss_bytes": baselines, "results": rows, "same_output": checks,
        "total_s": round(time.time() - start, 1),
    }
    print(json.dumps(record, indent=2))
    if args.record:
        old = json.loads(args.record.read_text()) if args.record.is_file() else []
        args.record.write_text(json.dumps(old + [record], indent=2) + "\n")
    same = all(c.get("identical") for k, c in checks.items() if "gpu-N vs cpu" not in k)
    print("PASS" if same else "FAIL", "N workers write the same bytes as 1", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a training micro-step makes the host wait for the GPU: every synchronizing CUDA call of one optimizer step
(torch's sync debug mode), with the Python line that made it, per model family at real widths and a few layers.

    python benchmarks/sync_audit.py --out DIR [--models llama4-scout qwen3-30b-a3b ...] [--layers 2]
    # writes DIR/sync_audit.{json,md}

Why: at micro-batch 1 the host issues kernels about as fast as the GPU runs them, and a sync stops it from
queuing the next phase while the GPU runs this one. The records of the seventh session show host-bound steps of
Scout and Qwen3-30B growing with the GPU's share (1 x 512 -> 1 x 2048: +0.28 s per micro-step for +0.24 s of
kernels) where gpt-oss-20b's did not: host and GPU time adding up, as a sync per layer or phase would make them.
The step here is the trainer's: labels in host memory, gradient checkpointing, grad_accum micro-steps, the 8-bit
optimizer. Syncs inside autograd's C++ backward are reported at the `backward()` call.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ["llama4-scout", "qwen3-30b-a3b", "gpt-oss-20b", "mixtral-8x7b", "glm-4.5-air", "llama3.1-8b"]
ROOT = str(Path(__file__).resolve().parent.parent)


def _where() -> str:
    """The innermost frames of the stack that are moefit's (else the innermost), as file:line function."""
    frames = [f for f in traceback.extract_stack()
              if "sync_audit.py" not in f.filename and Path(f.filename).name != "warnings.py"]
    ours = [f for f in frames if f.filename.startswith(ROOT)]
    pick = (ours or frames)[-2:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(pick))


def audit(model_name: str, layers: int, seq_len: int, batch: int, grad_accum: int, device: str = "cuda") -> dict:
    from moefit.bench.measure import _make_optimizer
    from moefit.bench.synthetic import build_synthetic_model
    from moefit.config import LoraConfig

    model = build_synthetic_model(model_name, num_layers=layers, lora=LoraConfig(r=16), device=device)
    cuda = device == "cuda"
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(params, "adamw_8bit")
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step() -> None:
        for _ in range(grad_accum):
            ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
            out = model(ids.to(model.input_device, non_blocking=True), labels=ids)
            (out.loss / grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: first-call work (autotuning, allocations) is not the steady state
    if not cuda:  # a dry run of the script on the CPU: nothing syncs there
        step()
        return {"model": model_name, "layers": layers, "seq_len": seq_len, "batch": batch, "grad_accum": grad_accum,
                "syncs": 0, "syncs_per_micro_step": 0, "sites": {}, "device": device}
    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[_where()] += 1

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    torch.cuda.synchronize()
    return {"model": model_name, "layers": layers, "seq_len": seq_len, "batch": batch, "grad_accum": grad_accum,
            "syncs": sum(sites.values()), "syncs_per_micro_step": sum(sites.values()) / grad_accum,
            "sites": dict(sites.most_common())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (nothing syncs on the CPU)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sync_audit needs a CUDA device (--device cpu: a dry run)", file=sys.stderr)
        return 2
    from moefit.train.metrics import versions

    rows = []
    for name in args.models:
        try:
            rows.append(audit(name, args.layers, args.seq_len, args.batch, args.grad_accum, args.device))
        except Exception as e:  # a model that does not build here is recorded, the others audited
            rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1])[:400], flush=True)
        gc.collect()  # the model of this family goes before the next one's is built
        if args.device == "cuda":
            torch.cuda.empty_cache()
    env = {"command": "python benchmarks/sync_audit.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, **versions()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sync_audit.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    lines = [f"# Host syncs in one optimizer step ({args.layers} layers, {args.batch} x {args.seq_len}, grad_accum "
             f"{args.grad_accum})", "", f"- `{env['command']}`, {env['date']}, {env['device']}; torch "
             f"{env.get('torch')}, transformers {env.get('transformers')}, bitsandbytes {env.get('bitsandbytes')}",
             "", "| model | syncs per micro-step | where (count: moefit frame <- its caller) |", "|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed | {r['error'][:120]} |")
            continue
        where = "<br>".join(f"{n}: {s}" for s, n in list(r["sites"].items())[:8])
        lines.append(f"| {r['model']} | {r['syncs_per_micro_step']:g} | {where} |")
    (args.out / "sync_audit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

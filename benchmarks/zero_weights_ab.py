"""Does a step's speed depend on the frozen weights' values? The same model measured with its random NF4 weights
and with them decoding to 0 (as every synthetic model did from 2026-11-30 07:39 to 2026-12-02: fill_synthetic
zeroed the double quantization's second-level scales), alternated in one process.

Every moefit bench / plan_validation / families record of those days ran on zero frozen weights: the same kernels
and bytes, but tensor cores multiplying zeros draw less power, and a power-capped GPU may clock higher. This
measures by how much, so those records (and the planner constants fitted to them) can be read.

    python benchmarks/zero_weights_ab.py --out DIR [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [  # (name, model, layers, lora rank, expert rank, micro-batch, seq)
    ("scout-8L-1x2048", "llama4-scout", 8, 32, None, 1, 2048),
    ("llama3.1-8b-2x2048", "llama3.1-8b", None, 16, 0, 2, 2048),
]


def zero_second_level_scales(model) -> int:
    """What the old fill did to every NF4Weight: absmax2 and offset set to 0 (all decoded scales 0)."""
    from moefit.quant.nf4 import NF4Weight

    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NF4Weight):
                for name in ("absmax2", "offset"):
                    if hasattr(m, name):
                        getattr(m, name).zero_()
                if not hasattr(m, "absmax2") and m.absmax.is_floating_point():  # fp32 scales: zero them
                    m.absmax.zero_()
                n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=2, help="real / zero alternations per case")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from moefit.bench import build_synthetic_model, measure_training
    from moefit.config import LoraConfig
    from moefit.train.metrics import versions

    rows = []
    for name, model_name, layers, r, expert_r, batch, seq in CASES:
        lora = LoraConfig(r=r, alpha=2 * r, expert_r=expert_r, routed_experts=expert_r != 0,
                          targets=["q", "k", "v", "o", "gate", "up", "down"])
        # two models built alike: one keeps its weights, the other gets the old fill's zeros
        models = {"real": build_synthetic_model(model_name, num_layers=layers, lora=lora)}
        models["zero"] = build_synthetic_model(model_name, num_layers=layers, lora=lora)
        zeroed = zero_second_level_scales(models["zero"])
        for rnd in range(args.rounds):
            for weights in ("real", "zero"):
                m = models[weights]
                res = measure_training(m, seq_len=seq, batch=batch, steps=args.steps, warmup=1)
                row = {"case": name, "weights": weights, "round": rnd, "zeroed_stores": zeroed if weights == "zero"
                       else 0, **{k: res[k] for k in ("step_s", "tokens_per_s", "kernel_s", "gpu_busy_fraction",
                                                      "peak_allocated_bytes", "loss_first") if k in res}}
                rows.append(row)
                print(f"{name:22} {weights:5} round {rnd}  step {row['step_s']:.4f} s  {row['tokens_per_s']:8.0f} "
                      f"tok/s  kernels {row.get('kernel_s', float('nan')):.4f} s  busy "
                      f"{100 * row.get('gpu_busy_fraction', float('nan')):.0f} %  loss {row['loss_first']:.3f}",
                      flush=True)
        del models
        torch.cuda.empty_cache()
    summary = {}
    for name, *_ in CASES:
        k = {w: [r["kernel_s"] for r in rows if r["case"] == name and r["weights"] == w] for w in ("real", "zero")}
        s = {w: [r["step_s"] for r in rows if r["case"] == name and r["weights"] == w] for w in ("real", "zero")}
        summary[name] = {"kernel_s_real_over_zero": min(k["real"]) / min(k["zero"]),
                         "step_s_real_over_zero": min(s["real"]) / min(s["zero"])}
    out = {"command": " ".join(sys.argv), "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "versions": versions(), "rows": rows, "summary": summary}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "zero_weights_ab.json").write_text(json.dumps(out, indent=2) + "\n")
    print("\ncase                   real/zero kernels  real/zero step (best of each)")
    for name, v in summary.items():
        print(f"{name:22} {v['kernel_s_real_over_zero']:17.3f}  {v['step_s_real_over_zero']:14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Llama 4 Scout QLoRA on one H200: moefit (48 layers, synthetic NF4 weights) against the stock
transformers + PEFT + bitsandbytes stack (2 and 4 layers, per-layer slope to 48), seq 2048 and 4096, batch 1,
for the seed recipe (r=32 on q,k,v,o,gate,up,down incl. every routed expert) and attention + shared expert only.

On the GPU (one call):
    bash benchmarks/scout_qlora.sh            # runs plan_validation.py and stock_baseline.py, then this --report
Report from recorded JSON (CPU):
    python benchmarks/scout_qlora.py --report --moefit benchmarks/scout_qlora_moefit.json \
        --stock benchmarks/stock_baseline.json [--tflops 788] > benchmarks/scout_qlora.md
"""

from __future__ import annotations

import argparse
import json
import sys

GIB = 2**30
ACTIVE_PARAMS = 16.138e9  # Scout, active per token incl. lm_head (moefit.bench.active_params_per_token)
MOEFIT_ROWS = {("seed", 2048): "scout-r32-s2048-b1", ("seed", 4096): "scout-r32-s4096-b1",
               ("attn-shared", 2048): "scout-r32-no-expert-lora-s2048-b1",
               ("attn-shared", 4096): "scout-r32-no-expert-lora-s4096-b1"}
TARGETS = {"seed-2048-peak": 68.0, "attn-shared-4096-peak": 60.0, "seed-2048-tokens": 2500}


def report(moefit: dict, stock: dict, tflops: float) -> str:
    by_name = {r["name"]: r for r in moefit["results"] if "measured" in r}
    full = stock["full_layers"]
    ext = {(r["layout"], r["lora"], r["seq_len"]): r for r in stock["extrapolated"]}
    lines = ["# Llama 4 Scout QLoRA on one H200: moefit vs the stock stack", ""]
    lines += [f"- moefit: `{moefit['command']}` on {moefit['gpu']}, {moefit['date']}, versions {moefit['versions']}",
              f"- stock: `{stock['command']}` on {stock['device']}, {stock['date']}, versions {stock['versions']}",
              f"- FLOP ceiling: 6 x {ACTIVE_PARAMS / 1e9:.2f} B active params per token at {tflops:.0f} TFLOP/s "
              f"(bf16 GEMM measured on this workplace's H200) = {tflops * 1e12 / (6 * ACTIVE_PARAMS):,.0f} tokens/s",
              "- moefit: all 48 layers built in NF4 on the GPU; stock: measured at 2 and 4 layers, extrapolated "
              f"linearly to {full} (peak memory and step time)", "",
              "| LoRA | seq | stack | peak allocated GiB | peak reserved GiB | tokens/s | % of FLOP ceiling |",
              "|---|---|---|---|---|---|---|"]
    for lora in ("seed", "attn-shared"):
        for seq in (2048, 4096):
            m = by_name.get(MOEFIT_ROWS[(lora, seq)])
            if m is not None:
                meas = m["measured"]
                tps = seq / meas["step_s"]
                lines.append(f"| {lora} | {seq} | **moefit** (48 layers) | **{meas['peak_allocated_bytes'] / GIB:.1f}** "
                             f"| {meas['peak_reserved_bytes'] / GIB:.1f} | **{tps:,.0f}** "
                             f"| {100 * tps * 6 * ACTIVE_PARAMS / (tflops * 1e12):.1f} % |")
            for layout in ("per-expert", "fused"):
                r = ext.get((layout, lora, seq), {})
                a = r.get(f"peak_allocated_bytes_at_{full}")
                res = r.get(f"peak_reserved_bytes_at_{full}")
                tps = r.get(f"tokens_per_s_at_{full}")
                if a is None:
                    lines.append(f"| {lora} | {seq} | stock, {layout} | not measured | | | |")
                    continue
                lines.append(f"| {lora} | {seq} | stock, {layout} experts (extrapolated) | {a / GIB:.1f} | "
                             f"{res / GIB:.1f} | {tps:,.0f} | {100 * tps * 6 * ACTIVE_PARAMS / (tflops * 1e12):.1f} % |")
    seed = by_name.get(MOEFIT_ROWS[("seed", 2048)], {}).get("measured", {})
    attn = by_name.get(MOEFIT_ROWS[("attn-shared", 4096)], {}).get("measured", {})
    lines += ["", "## Targets (issue 4)", "", "| target | goal | measured | verdict |", "|---|---|---|---|"]
    if seed:
        p = seed["peak_allocated_bytes"] / GIB
        t = 2048 / seed["step_s"]
        lines.append(f"| seed recipe, seq 2048, peak | <= {TARGETS['seed-2048-peak']:.0f} GiB | {p:.1f} GiB | "
                     f"{'met' if p <= TARGETS['seed-2048-peak'] else 'missed'} |")
        goal = TARGETS["seed-2048-tokens"]
        verdict = "met" if t >= goal else f"missed by {goal - t:,.0f} tokens/s ({100 * (1 - t / goal):.0f} %)"
        lines.append(f"| seed recipe, seq 2048, speed | >= {goal:,} tokens/s | {t:,.0f} | {verdict} |")
    if attn:
        p = attn["peak_allocated_bytes"] / GIB
        lines.append(f"| attention + shared, seq 4096, peak | <= {TARGETS['attn-shared-4096-peak']:.0f} GiB | "
                     f"{p:.1f} GiB | {'met' if p <= TARGETS['attn-shared-4096-peak'] else 'missed'} |")
    return "\n".join(lines) + "\n"


def analysis() -> str:
    """The hand-written analysis of the recorded profile (kept in its own file, appended to the report)."""
    from pathlib import Path

    path = Path(__file__).with_name("scout_qlora_analysis.md")
    return "\n" + path.read_text() if path.is_file() else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", required=True)
    ap.add_argument("--moefit", default="benchmarks/scout_qlora_moefit.json")
    ap.add_argument("--stock", default="benchmarks/stock_baseline.json")
    ap.add_argument("--tflops", type=float, default=788.0, help="measured bf16 GEMM TFLOP/s of the GPU")
    args = ap.parse_args()
    with open(args.moefit) as f:
        moefit = json.load(f)
    with open(args.stock) as f:
        stock = json.load(f)
    sys.stdout.write(report(moefit, stock, args.tflops) + analysis())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Llama 4 Scout QLoRA on one H200: moefit (48 layers, synthetic NF4 weights) against the stock
transformers + PEFT + bitsandbytes stack (2 and 4 layers, per-layer slope to 48), seq 2048 and 4096, batch 1,
for the seed recipe (r=32 on q,k,v,o,gate,up,down incl. every routed expert) and attention + shared expert only.

On the GPU (one call):
    bash benchmarks/scout_qlora.sh            # plan_validation.py, stock_baseline.py, step_ab.sh, then this --report
Report from recorded JSON (CPU):
    python benchmarks/scout_qlora.py --report --moefit benchmarks/plan_validation.json \
        --stock benchmarks/stock_baseline.json --settings benchmarks/scout_qlora_settings.json \
        benchmarks/raw/step_ab_large_micro_batch_h200.json benchmarks/raw/step_ab_host_emb_nosync_h200.json \
        [--tflops 788] > benchmarks/scout_qlora.md
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
                tps = meas["tokens_per_s"]
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
        t = seed["tokens_per_s"]
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


def settings_report(settings: dict) -> str:
    """The seed recipe's LoRA run other ways (`moefit bench` JSON per setting, from benchmarks/step_ab.sh):
    the recipe's effective batch as micro-batch x grad_accum, the input embedding in host memory, the kept routed
    gate/up outputs. Each row: peak and speed against issue 4's seq-2048 targets."""
    lines = ["", "## The seed recipe run other ways (seq 2048, 48 layers)", "",
             "- `moefit bench` per setting (`benchmarks/step_ab.sh`); peak with the gradients of earlier "
             "micro-batches resident; tokens/s over whole optimizer steps (optimizer update included).", "",
             "| setting | micro-batch x grad_accum | embedding on host | keep routed gate/up | peak allocated GiB | "
             "peak reserved GiB | step s | tokens/s | GPU busy | <= 68 GiB and >= 2,500 tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in settings.items():
        for r in d["runs"]:
            p, t = r["peak_allocated_bytes"] / GIB, r["tokens_per_s"]
            both = p <= TARGETS["seed-2048-peak"] and t >= TARGETS["seed-2048-tokens"]
            busy = f"{100 * r['gpu_busy_fraction']:.0f} %" if r.get("gpu_busy_fraction") else "-"
            lines.append(f"| {name} | {r['batch']} x {r['grad_accum']} | {'yes' if d.get('embeddings_on_host') else 'no'}"
                         f" | {'yes' if d.get('keep_routed_gate_up') else 'no'} | {p:.2f} | "
                         f"{r['peak_reserved_bytes'] / GIB:.2f} | {r['step_s']:.3f} | {t:,.0f} | {busy} | "
                         f"{'both met' if both else 'no'} |")
    return "\n".join(lines) + "\n"


def analysis() -> str:
    """The hand-written analysis of the recorded profile (kept in its own file, appended to the report)."""
    from pathlib import Path

    path = Path(__file__).with_name("scout_qlora_analysis.md")
    return "\n" + path.read_text() if path.is_file() else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", action="store_true", required=True)
    ap.add_argument("--moefit", default="benchmarks/plan_validation.json")
    ap.add_argument("--stock", default="benchmarks/stock_baseline.json")
    ap.add_argument("--tflops", type=float, default=788.0, help="measured bf16 GEMM TFLOP/s of the GPU")
    ap.add_argument("--settings", nargs="+", default=[],
                    help="step_ab.json file(s): the seed recipe under other settings (moefit bench JSON)")
    args = ap.parse_args()
    with open(args.moefit) as f:
        moefit = json.load(f)
    with open(args.stock) as f:
        stock = json.load(f)
    extra, settings = "", {}
    for path in args.settings:
        with open(path) as f:
            settings.update(json.load(f))
    if settings:
        extra = settings_report(dict(sorted(settings.items(), key=lambda kv: (kv[1]["runs"][0]["batch"], kv[0]))))
    sys.stdout.write(report(moefit, stock, args.tflops) + extra + analysis())
    return 0


if __name__ == "__main__":
    sys.exit(main())

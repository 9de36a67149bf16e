#!/usr/bin/env bash
# Issue 4's benchmark on one H200: moefit at 48 layers (the four Scout rows: seed recipe and attention + shared
# LoRA, seq 2048 and 4096; benchmarks/plan_validation.py), the stock transformers+PEFT+bitsandbytes stack at 2 and
# 4 layers (benchmarks/stock_baseline.py), the seed recipe run other ways at seq 2048 (benchmarks/step_ab.sh),
# then the report.
#   bash benchmarks/scout_qlora.sh                 all three (~9 min; CONFIGS=all re-records the planner set too)
#   PARTS=settings bash benchmarks/scout_qlora.sh  only the seed-recipe settings (~4 min)
# Results under $OUT or ./bench-out. Recorded as benchmarks/plan_validation.json (moefit rows), stock_baseline.json,
# scout_qlora_settings.json and scout_qlora.md.
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
parts=${PARTS:-moefit,stock,settings}
. benchmarks/gpu_env.sh
if [[ $parts == *moefit* ]]; then
  python3 benchmarks/plan_validation.py --out "$out" --configs "${CONFIGS:-issue4}" > "$out/pv_log.txt" 2>&1
  tail -8 "$out/pv_log.txt"
fi
if [[ $parts == *stock* ]]; then
  python3 benchmarks/stock_baseline.py --out "$out" > "$out/stock_log.txt" 2>&1
  tail -4 "$out/stock_log.txt"
fi
if [[ $parts == *settings* ]]; then
  # The seed recipe's effective batch (8 sequences of 2048 per optimizer step) as the recipe runs it (1 x 8) and
  # as micro-batch 2 x grad_accum 4 (the same gradient: the loss is averaged over all label tokens of the step).
  bash benchmarks/step_ab.sh "2048" "seed-1x8::--grad-accum 8" "seed-1x8-host-emb::--grad-accum 8 --embeddings-on-host" \
    "seed-2x4::--batch 2 --grad-accum 4" "seed-2x4-host-emb::--batch 2 --grad-accum 4 --embeddings-on-host"
  mv "$out/step_ab.json" "$out/scout_qlora_settings.json"
fi
pv=$out/plan_validation.json; [[ -f $pv ]] || pv=benchmarks/plan_validation.json
stock=$out/stock_baseline.json; [[ -f $stock ]] || stock=benchmarks/stock_baseline.json
settings=$out/scout_qlora_settings.json; [[ -f $settings ]] || settings=benchmarks/scout_qlora_settings.json
python3 benchmarks/scout_qlora.py --report --moefit "$pv" --stock "$stock" --settings "$settings" \
  | tee "$out/scout_qlora.md"

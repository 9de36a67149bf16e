#!/usr/bin/env bash
# Issue 4's benchmark in one device call on one H200: moefit at 48 layers (the four Scout rows: seed recipe and
# attention + shared LoRA, seq 2048 and 4096) and the stock transformers+PEFT+bitsandbytes stack at 2 and 4 layers.
#   bash benchmarks/scout_qlora.sh        (on the GPU machine; results under $OUT or ./bench-out)
# Recorded as benchmarks/scout_qlora_moefit.json, stock_baseline.json and scout_qlora.md.
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
. benchmarks/gpu_env.sh
python3 benchmarks/plan_validation.py --out "$out" --configs issue4 > "$out/pv_log.txt" 2>&1
tail -8 "$out/pv_log.txt"
python3 benchmarks/stock_baseline.py --out "$out" > "$out/stock_log.txt" 2>&1
tail -4 "$out/stock_log.txt"
python3 benchmarks/scout_qlora.py --report --moefit "$out/plan_validation.json" --stock "$out/stock_baseline.json" \
  | tee "$out/scout_qlora.md"

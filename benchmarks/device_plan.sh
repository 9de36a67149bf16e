#!/usr/bin/env bash
# The next device calls, each one command that fits a 600 s call (the timeouts plus ~25 s of setup stay under it;
# at most 8 files come back from $OUT). Run on the GPU machine from the repo root:
#   bash benchmarks/device_plan.sh D    # nvidia-h200: GPU tests, export with a stream per worker, dense 8B A/B
#   bash benchmarks/device_plan.sh E    # nvidia-h200: Scout seed A/B (fp32 scales, grad_accum 1 vs 8) + stock, auto
# One GPU, one job at a time: host-bound steps measured next to another lane ran up to 2x slower
# (benchmarks/speed_targets.md), so nothing here runs in lanes. What each measures and why: the session note of
# 2026-11-30 (fourth session). Calls A-C of the third session's plan ran on 2026-11-30 (git history).
set -uo pipefail
out=${OUT:?set OUT}
. benchmarks/gpu_env.sh > "$out/setup.log" 2>&1 || { cat "$out/setup.log"; exit 1; }
case "${1:?D or E}" in
  D)  # 5 files: setup.log, gpu_tests.log, export_speed.json, fam/families.{json,md}
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_export_parallel.py tests/test_gpu.py > "$out/gpu_tests.log" 2>&1
    echo "gpu tests rc $?" >> "$out/setup.log"
    timeout 170 python3 benchmarks/export_speed.py --workers 8 16 --record "$out/export_speed.json" \
      >> "$out/setup.log" 2>&1
    echo "export rc $?" >> "$out/setup.log"
    timeout 250 python3 benchmarks/families.py --out "$out/fam" --models llama3.1-8b \
      --variants "scales:--fp32-linear-scales" "norms-unfused:--engine rms_norm=transformers" \
      >> "$out/setup.log" 2>&1
    echo "dense rc $?" >> "$out/setup.log"
    tail -3 "$out/gpu_tests.log"; grep -E '"gb_per_s"|"workers"' "$out/export_speed.json" | head -6
    grep -A8 "^| model | goal" "$out/fam/families.md"
    ;;
  E)  # 4 files: setup.log, step_ab.json, stock/stock_baseline.json, scout_auto_scales.json
    STEPS=2 OUT=$out timeout 330 bash benchmarks/step_ab.sh 2048 'default::--batch 1 --grad-accum 8' \
      'scales::--batch 1 --grad-accum 8 --fp32-linear-scales' 'ga1::--batch 1 --grad-accum 1' \
      'ga2::--batch 1 --grad-accum 2' >> "$out/setup.log" 2>&1
    timeout 110 python3 benchmarks/stock_baseline.py --out "$out/stock" --layers 2 4 --seq-len 2048 \
      --layouts per-expert --loras seed >> "$out/setup.log" 2>&1
    timeout 100 python3 -m moefit bench --model llama4-scout --seq-len 2048 --batch 1 --grad-accum 8 \
      --layout auto --memory-limit-gib 79.65 --fp32-linear-scales --steps 2 --warmup 1 --json \
      > "$out/scout_auto_scales.json" 2>> "$out/setup.log"
    echo "auto rc $?" >> "$out/setup.log"
    tail -12 "$out/setup.log"
    ;;
  *) echo "unknown call $1 (D or E)"; exit 2 ;;
esac

#!/usr/bin/env bash
# The next device calls, each one command that fits a 600 s call (the timeouts plus ~25 s of setup stay under it;
# at most 8 files come back from $OUT). Run on the GPU machine from the repo root:
#   bash benchmarks/device_plan.sh A    # nvidia-h200-x2, two lanes: the planner's loo set | Qwen3-30B + Scout auto
#   bash benchmarks/device_plan.sh B    # nvidia-h200-x2: Maverick's real path (issue 12) + Qwen3-235B EP2 (13)
#   bash benchmarks/device_plan.sh C    # nvidia-h200-x2, two lanes: export speed + dense 8B | Scout seed A/B + stock
# What each measures and why: the session note of 2026-11-30 (third session).
set -uo pipefail
out=${OUT:?set OUT}
. benchmarks/gpu_env.sh > "$out/setup.log" 2>&1 || { cat "$out/setup.log"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
FAST="--engine rms_norm=fused --fp32-linear-scales"
case "${1:?A, B or C}" in
  A)  # 7 files: pv/plan_validation.{json,md}, fam/families.{json,md}, scout_auto.json, lane0.log, lane1.log
    rm -f "$out/setup.log"
    bash benchmarks/lanes.sh \
      "timeout 540 python3 benchmarks/plan_validation.py --out $out/pv --configs loo --deadline 500" \
      "timeout 420 python3 benchmarks/families.py --out $out/fam --models qwen3-30b-a3b --variants \
         'auto24:--layout auto --memory-limit-gib 22.5' 'fast:--layout auto --memory-limit-gib 22.5 $FAST'; \
       timeout 110 python3 -m moefit bench --model llama4-scout --seq-len 2048 --batch 1 --grad-accum 8 \
         --layout auto --memory-limit-gib 79.65 --steps 2 --warmup 1 --json > $out/scout_auto.json"
    ;;
  B)  # 5 files: data_parallel_real.log, ep/expert_parallel.{json,md}, ep.log, setup.log
    SMOKE=0 PRESET=llama4-maverick TRAIN_ARGS="--expert-parallel 2" timeout 320 \
      bash benchmarks/data_parallel_real.sh > /dev/null 2>&1
    echo "real path rc $?" >> "$out/setup.log"
    rm -rf /tmp/moefit-dp-real
    timeout 220 python3 benchmarks/expert_parallel.py --out "$out/ep" --gpus 2 --configs qwen3 > "$out/ep.log" 2>&1
    echo "qwen3-235b rc $?" >> "$out/setup.log"
    grep -E "relative error|GB/s|RSS|exit" "$out/data_parallel_real.log"; tail -3 "$out/ep.log"
    ;;
  C)  # 7 files: export_speed.json, fam/families.{json,md}, step_ab.json, stock/*.json (1), lane0.log, lane1.log
    rm -f "$out/setup.log"
    bash benchmarks/lanes.sh \
      "timeout 200 python3 benchmarks/export_speed.py --workers 8 16 --record $out/export_speed.json; \
       timeout 330 python3 benchmarks/families.py --out $out/fam --models llama3.1-8b --variants 'fast:$FAST'" \
      "STEPS=2 OUT=$out timeout 330 bash benchmarks/step_ab.sh 2048 'default::--batch 1 --grad-accum 8' \
         'fast:rms_norm=fused:--batch 1 --grad-accum 8 --fp32-linear-scales'; \
       timeout 200 python3 benchmarks/stock_baseline.py --out $out/stock --layers 2 4 --seq-len 2048 \
         --layouts per-expert --loras seed"
    ;;
  *) echo "unknown call $1 (A, B or C)"; exit 2 ;;
esac

#!/usr/bin/env bash
# The next device calls, each one command that fits a 600 s call (the timeouts plus ~25 s of setup stay under it;
# at most 8 files come back from $OUT). Run on the GPU machine from the repo root:
#   bash benchmarks/device_plan.sh P    # nvidia-h200: are MoE accumulation steps slow, or the planner set's process?
#   bash benchmarks/device_plan.sh Q    # nvidia-h200: new GPU tests, NF4 decoder variants, Scout profile at 4 x 2048
#   DECODER=triton-load bash benchmarks/device_plan.sh R   # nvidia-h200: seed step, that decoder vs bitsandbytes
#   bash benchmarks/device_plan.sh S    # nvidia-h200-x2: Scout expert parallel vs data parallel (1 sync of 4 left)
# Order for a 30-minute budget (each call ~450-560 s with the machine's start): Q, then R with Q's fastest decoder
# (the seed and auto-layout speed targets hang on the NF4 decode), then P (the planner's method); S when a later
# budget allows.
# One GPU, one job at a time: host-bound steps measured next to another lane ran up to 2x slower
# (benchmarks/speed_targets.md), so nothing here runs in lanes. Why: benchmarks/speed_targets.md (fifth session).
# Calls D and E of the fourth session's plan ran on 2026-11-30 17:30 (git history).
set -uo pipefail
out=${OUT:?set OUT}
. benchmarks/gpu_env.sh > "$out/setup.log" 2>&1 || { cat "$out/setup.log"; exit 1; }
PAIRS="loo-scout-r32-s2048-b1-ga1 loo-scout-r32-s2048-b1-ga4 loo-gpt-oss-20b-r16-s512-b1-ga1 loo-gpt-oss-20b-r16-s512-b1-ga4"
case "${1:?P, Q, R, S or T}" in
  P)  # 5 files: setup.log, fresh/plan_validation.{json,md}, grouped/plan_validation.{json,md}
    # The same 4 configurations with 5 timed steps, each in a process of its own, then as the set runs them (one
    # process per model, one configuration after another): ga4 slower per micro-step only in the second?
    # shellcheck disable=SC2086
    timeout 270 python3 benchmarks/plan_validation.py --out "$out/fresh" --configs loo --fresh-process \
      --timed-steps 5 --only $PAIRS --deadline 255 >> "$out/setup.log" 2>&1
    echo "fresh rc $?" >> "$out/setup.log"
    # shellcheck disable=SC2086
    timeout 190 python3 benchmarks/plan_validation.py --out "$out/grouped" --configs loo --timed-steps 5 \
      --only $PAIRS --deadline 175 >> "$out/setup.log" 2>&1
    echo "grouped rc $?" >> "$out/setup.log"
    grep -h "^| loo" "$out/fresh/plan_validation.md" "$out/grouped/plan_validation.md" | cut -d'|' -f2,12-14
    python3 -c "import json, sys
for f in sys.argv[1:]:
    for r in json.load(open(f))['results']:
        m = r['measured']; print(f.split('/')[-2], r['name'], round(m['step_s'], 3),
                                 [round(x, 3) for x in m.get('micro_step_s', [])], round(m.get('optimizer_s', 0), 3))
" "$out/fresh/plan_validation.json" "$out/grouped/plan_validation.json"
    ;;
  Q)  # 6 files: setup.log, gpu_tests.log, dec/nf4_decode_variants.{json,md}, b4/profile{.json,_table.txt}
    mkdir -p "$out/b4" "$out/dec"
    # the GPU tests added since the last GPU run (micro-step spans of measure_training; the decoder's lookups)
    timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
      -k "gpu_busy or side_streams or triton_nf4" > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?" >> "$out/setup.log"
    # the NF4 decoder's lookups and launch shapes against bitsandbytes and the copy rate (one Scout bank)
    timeout 150 python3 benchmarks/nf4_decode_variants.py --out "$out/dec" >> "$out/setup.log" 2>&1
    echo "decode variants rc $?" >> "$out/setup.log"
    timeout 220 python3 benchmarks/profile_step.py --layers 4 --seq-len 2048 --batch 4 --out "$out/b4" \
      > "$out/b4.log" 2>&1; echo "b4 rc $?" >> "$out/setup.log"
    head -14 "$out/dec/nf4_decode_variants.md"; tail -9 "$out/b4.log"; rm -f "$out/b4.log"
    python3 - "$out/dec/nf4_decode_variants.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
bnb = next(r["ms"] for r in rows if r["decoder"] == "bitsandbytes")
auto = [r for r in rows if r["decoder"] == "triton" and r.get("block") is None and r.get("bit_identical") and "ms" in r]
best = min(auto, key=lambda r: r["ms"])
name = "triton" if best["lookup"] == "select" else f"triton-{best['lookup']}"
print(f"fastest engine decoder: {name} {best['ms']:.3f} ms against bitsandbytes {bnb:.3f} ms -> "
      f"next: DECODER={name} bash benchmarks/device_plan.sh R")
PY
    ;;
  R)  # after Q: the seed recipe (1 x 8) with Q's fastest lookup against bitsandbytes, same call (the engine's
      # decoder picks its launch shape by Triton's autotuning on the first call of each size)
    d=${DECODER:-triton-load}
    STEPS=2 timeout 540 bash benchmarks/step_ab.sh 2048 "bnb:nf4_decoder=bnb:--grad-accum 8" \
      "$d:nf4_decoder=$d:--grad-accum 8" > "$out/r.log" 2>&1; echo "R rc $?" >> "$out/setup.log"
    tail -20 "$out/r.log"
    ;;
  T)  # nvidia-h200, after Q and R (seventh session): the table-load decoder with its launch shape kept after the
      # first call, where the seed step is GPU-bound (the auto layout, 4 x 2) and where it is host-bound (1 x 8), each
      # against bitsandbytes in the same call; the decoder's host cost per call; the gather lookup's compile fix.
      # 4 files: setup.log, gpu_tests.log, dec/nf4_decode_variants.{json,md}, step_ab.json
    mkdir -p "$out/dec"
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "nf4" > "$out/gpu_tests.log" 2>&1
    echo "gpu tests rc $?" >> "$out/setup.log"; tail -2 "$out/gpu_tests.log"
    timeout 100 python3 benchmarks/nf4_decode_variants.py --out "$out/dec" > "$out/dec.log" 2>&1
    echo "decode variants rc $?" >> "$out/setup.log"; tail -9 "$out/dec.log"; rm -f "$out/dec.log"
    auto="--grad-accum 8 --layout auto --memory-limit-gib 79.65"
    STEPS=2 timeout 400 bash benchmarks/step_ab.sh 2048 "auto-load:nf4_decoder=triton-load:$auto" \
      "auto-bnb:nf4_decoder=bnb:$auto" "seed-load:nf4_decoder=triton-load:--grad-accum 8" \
      "seed-bnb:nf4_decoder=bnb:--grad-accum 8" > "$out/t.log" 2>&1; echo "T rc $?" >> "$out/setup.log"
    cat "$out/t.log"; rm -f "$out/t.log"
    ;;
  S)  # nvidia-h200-x2: Scout seed recipe expert-parallel (one host sync per MoE layer and micro-step now, four
      # before) against data parallel on the same 2 GPUs, same call (call 1 of benchmarks/expert_parallel.md: EP
      # 2,658 against DP 3,024 tokens/s, GPU busy 50 % against 71 %)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    timeout 540 python3 benchmarks/expert_parallel.py --out "$out/ep" --gpus 2 --configs scout > "$out/s.log" 2>&1
    echo "S rc $?" >> "$out/setup.log"; tail -12 "$out/s.log"
    ;;
  *) echo "unknown call $1 (P, Q, R or S)"; exit 2 ;;
esac

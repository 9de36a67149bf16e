#!/usr/bin/env bash
# The next device calls, each one command that fits a 600 s call (the timeouts plus ~25 s of setup stay under it;
# at most 8 files come back from $OUT). Run on the GPU machine from the repo root:
#   bash benchmarks/device_plan.sh A    # nvidia-h200: GPU tests, host-sync audit, issue 15's seed rows + stock
#   bash benchmarks/device_plan.sh B    # nvidia-h200: A with the no-sync GPU tests only, + Qwen3-30B vs stock
#                                       # (run on 2026-12-01 as CALL_S=590 bash benchmarks/device_plan.sh B)
#   bash benchmarks/device_plan.sh P    # nvidia-h200: grouped vs fresh processes; CUPTI torn down or not; no profiler
#   bash benchmarks/device_plan.sh G    # nvidia-h200: engine.gc_freeze on/off, lora_cast_cache: seed 1 x 8 twice each,
#                                       # Qwen3 1 x 2, GC pauses
#   bash benchmarks/device_plan.sh H    # nvidia-h200: engine.layer_graphs: GPU tests, the seed 1 x 8 with and without,
#                                       # Qwen3-30B 1 x 2 with and without
#   bash benchmarks/device_plan.sh I    # nvidia-h200: issue 15's seed rows with layer_graphs (default): the seed as
#                                       # written, the same before (graphs and cast cache off), auto, stock beside
#   bash benchmarks/device_plan.sh J    # nvidia-h200: layer_graphs on / off alternated: Llama 3.1 8B 1 x 2 twice each,
#                                       # the seed 1 x 8 once each
#   bash benchmarks/device_plan.sh L    # nvidia-h200: the planner's leave-one-out set (30 configurations, ~7.5 min)
#                                       # on the current engine (layer_graphs, lora_cast_cache on), for the refit
#   bash benchmarks/device_plan.sh T    # nvidia-h200: `moefit train` itself with layer_graphs on / off (tiny model,
#                                       # checkpointing on, packed data padded to max_length): same losses, report
#   bash benchmarks/device_plan.sh D    # nvidia-h200: Llama 3.1 8B's set rows grouped / fresh / moefit bench (host per launch)
#   bash benchmarks/device_plan.sh F    # nvidia-h200: issue 13's family rows on the current engine, stock beside
#   bash benchmarks/device_plan.sh S    # nvidia-h200-x2: Scout expert parallel vs data parallel (1 sync of 4 left)
#   bash benchmarks/device_plan.sh K    # nvidia-h200: issue 15's seed rows again (4 timed steps) with stock beside,
#                                       # and the kernels of one Scout layer's micro-step at 1 x 2048 (what is left)
#   bash benchmarks/device_plan.sh W    # nvidia-h200: engine.backward_graphs (GPU tests, the seed 1 x 8 with and
#                                       # without), stock beside
#   bash benchmarks/device_plan.sh X    # nvidia-h200: engine.backward_graphs on by default: GPU tests, the seed
#                                       # with it / with the backward eager / auto, `moefit train` on/off, stock beside
#   bash benchmarks/device_plan.sh Y    # nvidia-h200: the seed's layouts around auto's under 80 GB (8 x 1, 4 x 2 with
#                                       # the first pass replayed, 2 x 4 with both graphs), real weights
#   bash benchmarks/device_plan.sh O    # nvidia-h200: train.offload_checkpoints: its GPU test, auto under 80 GB (8 x 1
#                                       # offloaded) beside 8 x 1 on the device, stock beside
#   bash benchmarks/device_plan.sh Q    # nvidia-h200: offload GPU test, Llama 8B peak alone / after another
#                                       # measurement, the planner's offload set, the trainer with offloading
#   bash benchmarks/device_plan.sh R    # nvidia-h200: offloading's cost at short layers (Llama 8B eager, with / without),
#                                       # then the leave-one-out set on today's code
#   bash benchmarks/device_plan.sh N    # nvidia-h200: Llama 8B's peak by site after the loo group's other configurations
#   bash benchmarks/device_plan.sh E    # nvidia-h200: Llama 3.1 8B 1 x 2048 x 2 against the stock stack (dense target)
#   bash benchmarks/device_plan.sh Z    # nvidia-h200: the merged export (page-locked vs pageable host buffers), its GPU tests
#   bash benchmarks/device_plan.sh V    # nvidia-h200: the loo set's Llama 3.1 8B rows (or FRESH's groups), one
#                                       # process each (~340 s)
#   bash benchmarks/device_plan.sh M    # nvidia-h200: Llama 3.1 8B's peak allocated by allocation site, backward
#                                       # graphs on / off (benchmarks/peak_probe.py), what the planner misses;
#                                       # Scout at 8 x 1024 the same way
# Next session (30-minute budget; a call holds the machine ~100-130 s longer than its command runs): first Z
# (`CALL_S=300 bash benchmarks/device_plan.sh Z`: the export's 8 workers ran no faster than 1 in the fifteenth
# session; whether the Triton decoder's concurrent first compiles were why), then an eager Llama
# row in the loo set (the planner's eager host time is short by ~20 %, call R); the seed recipe with the backward
# eager (what data parallelism runs; planned +11.7 % slow since the fifteenth session's refit); S on x2 when it is
# lent; issue 16's production_scale.sh on x4 / x8. N (what a grouped process leaves in a later configuration's peak)
# is no longer needed for the planner: its memory is checked against each configuration run alone. V ran three
# times in the fifteenth session (Llama, then FRESH="loo-qwen3 loo-gpt-oss", then FRESH=loo-scout), M, O, Q, R and
# N (cut) in the fourteenth, W, X, L and Y in the thirteenth, K and W in the twelfth, L a fourth time in the
# eleventh, T and L three times in the tenth, H, I, F, J in the ninth, A, B, P, F in the eighth; what they measured
# is in benchmarks/speed_targets.md.
# One GPU, one job at a time: host-bound steps measured next to another lane ran up to 2x slower
# (benchmarks/speed_targets.md), so nothing here runs in lanes.
set -uo pipefail
out=${OUT:?set OUT}
. benchmarks/gpu_env.sh > "$out/setup.log" 2>&1 || { cat "$out/setup.log"; exit 1; }

# The stock stack's seed rows (2 and 4 layers, extrapolated to 48) when more than $1 s of the call are left (at most
# 110 s of it), then the call's last lines.
stock_if_time_left() {
  local left=$((${CALL_S:-600} - 15 - SECONDS))
  if [ "$left" -gt "$1" ]; then
    timeout $((left < 110 ? left : 110)) python3 benchmarks/stock_baseline.py --out "$out/stock" --layers 2 4 \
      --seq-len 2048 --layouts per-expert --loras seed >> "$out/setup.log" 2>&1; echo "stock rc $?" >> "$out/setup.log"
    rm -f "$out/stock/stock_baseline.md"
  fi
  tail -4 "$out/setup.log"
}
case "${1:?A, B, D, E, G, H, I, J, K, L, M, N, O, Q, R, T, P, F, S, V, W, X, Y or Z}" in
  X)  # 6 files: setup.log, gpu_tests.log, step_ab.json, report_{true,false}.json, stock/stock_baseline.json
    # engine.backward_graphs on by default (thirteenth session): the graphs' GPU tests with the gpt-oss mask fix,
    # the seed as written (default), the same with the backward eager, auto; `moefit train` (tiny, packed) with
    # and without (the trainer's path: same losses); the stock stack beside if time is left.
    timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py \
      -k "layer_graphs or failed_capture or never_syncs" > "$out/gpu_tests.log" 2>&1
    echo "gpu tests rc $?" >> "$out/setup.log"; grep -E "passed|failed|FAILED" "$out/gpu_tests.log"
    auto="--grad-accum 8 --layout auto --memory-limit-gib 79.65"
    STEPS=3 timeout 300 bash benchmarks/step_ab.sh 2048 "seed::--grad-accum 8" \
      "eager_backward:backward_graphs=false:--grad-accum 8" "auto::$auto" > "$out/x.log" 2>&1
    echo "seed rc $?" >> "$out/setup.log"; cat "$out/x.log"; rm -f "$out/x.log"
    for g in true false; do
      left=$((${CALL_S:-600} - 130 - SECONDS)); [ "$left" -gt 30 ] || break
      timeout $((left < 80 ? left : 80)) python3 -m moefit train --output-dir "/tmp/run_$g" --max-steps 30 \
        --set train.gradient_checkpointing=true --set engine.backward_graphs=$g > "/tmp/train_$g.log" 2>&1
      echo "train backward_graphs=$g rc $?" >> "$out/setup.log"; cp "/tmp/run_$g/report.json" "$out/report_$g.json"
      grep -i "padded\|graphs\|done:\|held-out" "/tmp/train_$g.log" | tail -4
    done
    stock_if_time_left 80
    ;;
  Y)  # 2 files: setup.log, step_ab.json
    # issue 15's auto target (>= 4,000 tok/s within 80 GB) with real weights: auto's 4 x 2 (host embedding, graphs
    # off) ran 3,791 in call X. The layouts around it under the same 79.65 GiB limit: 8 x 1 (host embedding,
    # graphs off; planned 78.9 GiB), 4 x 2 with the first pass replayed (planned 78.4), 2 x 4 with both graphs.
    lim="--memory-limit-gib 79.65 --embeddings-on-host"
    STEPS=3 timeout $((${CALL_S:-600} - 30)) bash benchmarks/step_ab.sh 2048 \
      "b8x1_nographs:layer_graphs=false:--batch 8 --grad-accum 1 $lim" \
      "b4x2_firstpass:backward_graphs=false:--batch 4 --grad-accum 2 $lim" \
      "b2x4_graphs::--batch 2 --grad-accum 4 $lim" > "$out/y.log" 2>&1
    echo "layouts rc $?" >> "$out/setup.log"; cat "$out/y.log"; rm -f "$out/y.log"
    ;;
  O)  # 4 files: setup.log, gpu_tests.log, step_ab.json, stock/stock_baseline.json
    # train.offload_checkpoints (fourteenth session): its GPU test (same gradients, less memory, no host sync), then
    # issue 15's auto target under 79.65 GiB: auto now picks 8 x 1 with the layers' saved inputs in host memory
    # (planned 74.2 GiB needed, 3.97 s); beside it the same 8 x 1 with them on the GPU (call Y: 4,070 tok/s at
    # 77.01 GiB reserved, planned 78.9 needed: over auto's 5 % margin), the stock stack if time is left.
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "offloaded" \
      > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?" >> "$out/setup.log"; grep -E "passed|failed" "$out/gpu_tests.log"
    lim="--memory-limit-gib 79.65"
    STEPS=3 timeout $((${CALL_S:-600} - 150 - SECONDS)) bash benchmarks/step_ab.sh 2048 \
      "auto::--grad-accum 8 --layout auto $lim" \
      "b8x1_ondevice:layer_graphs=false:--batch 8 --grad-accum 1 --embeddings-on-host $lim" > "$out/o.log" 2>&1
    echo "layouts rc $?" >> "$out/setup.log"; cat "$out/o.log"; rm -f "$out/o.log"
    python3 -c "import json; d=json.load(open('$out/step_ab.json'))['auto']; print('auto chose', d['layout'])"
    stock_if_time_left 60
    ;;
  Q)  # 8 files: setup.log, gpu_tests.log, peak/{alone,after}.json, offload/plan_validation.{json,md}, report_{off,pad}.json
    # train.offload_checkpoints' GPU test (mended after call O: the input copied before the no-sync check); Llama 3.1
    # 8B at 1 x 16384 alone and after 4 x 4096 in the same process (plan_validation's loo group measured it after;
    # the planner is 0.77 GiB under that, 0.14 under the probe alone at ga 2); the planner's offload set; the
    # trainer with offloading, and with the graphs and micro-batch 4 (an epoch's last batch padded to 4 rows).
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "offloaded" \
      > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?" >> "$out/setup.log"; grep -E "passed|failed" "$out/gpu_tests.log"
    mkdir -p "$out/peak"
    timeout 80 python3 benchmarks/peak_probe.py --model llama3.1-8b --seq-len 16384 --grad-accum 1 \
      --out "$out/peak/alone.json" > "$out/p1.log" 2>&1; echo "probe alone rc $?" >> "$out/setup.log"; head -8 "$out/p1.log"
    timeout 100 python3 benchmarks/peak_probe.py --model llama3.1-8b --seq-len 16384 --grad-accum 1 \
      --before 4096,4,1 --out "$out/peak/after.json" > "$out/p2.log" 2>&1; echo "probe after rc $?" >> "$out/setup.log"
    head -8 "$out/p2.log"; python3 benchmarks/peak_probe.py --diff "$out/peak/alone.json" "$out/peak/after.json" | head -12
    rm -f "$out"/p?.log
    timeout 200 python3 benchmarks/plan_validation.py --configs offload --out "$out/offload" --deadline 185 \
      >> "$out/setup.log" 2>&1; echo "offload set rc $?" >> "$out/setup.log"; tail -9 "$out/offload/plan_validation.md"
    timeout 45 python3 -m moefit train --output-dir /tmp/run_off --max-steps 20 \
      --set train.gradient_checkpointing=true --set train.offload_checkpoints=true > "$out/t1.log" 2>&1; echo "train offload rc $?" >> "$out/setup.log"
    grep -i "offload\|done:\|held-out" "$out/t1.log"; cp /tmp/run_off/report.json "$out/report_off.json"
    timeout 45 python3 -m moefit train --output-dir /tmp/run_pad --max-steps 40 --set train.batch_size=4 --set train.gradient_checkpointing=true \
      --set train.grad_accum=1 > "$out/t2.log" 2>&1; echo "train pad rc $?" >> "$out/setup.log"
    grep -i "epoch\|padded\|layer graphs\|done:" "$out/t2.log" | head -6; cp /tmp/run_pad/report.json "$out/report_pad.json"
    rm -f "$out"/t?.log
    ;;
  R)  # 5 files: setup.log, offload_ab.json, loo/plan_validation.{json,md}
    # What offloading costs where the copies are least hidden (Llama 3.1 8B, 1 x 512 / 2048: short layers, the
    # first passes eager either way), then the leave-one-out set again on today's code (its records were measured
    # before the thirteenth session's last changes; Llama 8B's peak probed now is 15.01 GiB where call L read 15.64).
    for o in plain offload; do
      flag=$([ "$o" = offload ] && echo --offload-checkpoints)
      timeout 60 python3 -m moefit bench --model llama3.1-8b --rank 16 --seq-len 512 2048 --steps 3 --json \
        --engine layer_graphs=false $flag > "$out/ab_$o.json" 2>> "$out/setup.log"; echo "bench $o rc $?" >> "$out/setup.log"
    done
    python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {p.stem[3:]: json.loads(p.read_text()) for p in sorted(out.glob("ab_*.json")) if p.stat().st_size}
(out / "offload_ab.json").write_text(json.dumps(merged, indent=1) + "\n")
for k, d in merged.items():
    for r in d["runs"]:
        print(f"{k:8} seq {r['seq_len']:5}  {r['step_s']:.4f} s  {r['tokens_per_s']:7.0f} tok/s  busy "
              f"{100 * r.get('gpu_busy_fraction', 0):.0f} %  {r['peak_allocated_bytes'] / 2**30:.2f} GiB")
PY
    rm -f "$out"/ab_*.json
    left=$((${CALL_S:-600} - 20 - SECONDS))
    timeout $left python3 benchmarks/plan_validation.py --configs loo --out "$out/loo" --deadline $((left - 15)) \
      >> "$out/setup.log" 2>&1; echo "loo rc $?" >> "$out/setup.log"; tail -4 "$out/loo/plan_validation.md"
    ;;
  N)  # 2 files: setup.log, peak/after_group.json
    # Llama 3.1 8B at 1 x 16384 after the ten configurations plan_validation's loo group measures before it, each
    # with its profiled step (call R read 15.64 GiB there; alone it peaks at 15.01, after one other at 15.08).
    mkdir -p "$out/peak"
    b=""; for x in 512,1,1 1024,1,1 512,1,4 2048,1,1 2048,1,8 2048,2,4 512,4,2 1024,8,2 512,8,1 4096,4,1; do b="$b --before $x"; done
    timeout $((${CALL_S:-600} - 20 - SECONDS)) python3 benchmarks/peak_probe.py --model llama3.1-8b --seq-len 16384 \
      --grad-accum 1 --steps 2 $b --profile-before --out "$out/peak/after_group.json" > "$out/p.log" 2>&1
    echo "probe rc $?" >> "$out/setup.log"; head -16 "$out/p.log"; rm -f "$out/p.log"
    ;;
  E)  # 3 files: setup.log, fam/families.{json,md}
    # Issue 15's dense target on the current engine (every layer pass replayed, real synthetic weights): Llama 3.1
    # 8B QLoRA r=16 at 1 x 2048 x 2, moefit against the stock stack in the same call (last measured in the ninth
    # session, on zero weights and without the backward graphs: 2.2x)
    timeout $((${CALL_S:-600} - 20 - SECONDS)) python3 benchmarks/families.py --out "$out/fam" --models llama3.1-8b \
      >> "$out/setup.log" 2>&1; echo "families rc $?" >> "$out/setup.log"
    grep -A4 "^| model | goal" "$out/fam/families.md"
    ;;
  Z)  # 4 files: setup.log, tests.log, export.log, export_speed.json
    # Issue 15's export target again. Sixteenth session, call 1 (0344ddb): gpu-N-first 0.54 GB/s, gpu-N (Triton
    # warm) 0.86, gpu-N-bnb 0.95, gpu-1 0.42, gpu-N-base 1.19: the merge phase of 8 threads summed to 6x one
    # thread's. Call 3: each worker copying through a reused page-locked buffer (moefit/export/host_staging.py),
    # gpu-N 1.45 against gpu-N-pageable 0.95 in the same call, bnb-decoded 1.76. Now the round trip decodes with
    # bitsandbytes (the same bits): gpu-N should read ~1.7. The export GPU tests first.
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_export_parallel.py tests/test_gpu.py -m gpu -k "export or nf4" > "$out/tests.log" 2>&1
    echo "export gpu tests rc $?" >> "$out/setup.log"; tail -2 "$out/tests.log"
    timeout $((${CALL_S:-600} - 20 - SECONDS)) python3 benchmarks/export_speed.py \
      --budget-s $((${CALL_S:-600} - 60 - SECONDS)) --record "$out/export_speed.json" > "$out/export.log" 2>&1
    echo "export rc $?" >> "$out/setup.log"; grep -E '^\{"run"' "$out/export.log" | cut -c1-240; tail -1 "$out/export.log"
    ;;
  V)  # 3 files: setup.log, fresh/plan_validation.{json,md}
    # The loo set's configurations of the groups named in FRESH (default its eleven Llama 3.1 8B ones, ~340 s
    # planned), each in a process of its own (--fresh-process): what a run of one configuration peaks at, against
    # the grouped calls L and R, where the ones measured after others read 0.3-0.8 GiB more (call V, fifteenth
    # session: Llama alone within 1.0 % of the plan on all eleven). FRESH="loo-qwen3 loo-gpt-oss" ~410 s,
    # FRESH=loo-scout ~560 s (plan_validation.py --configs loo --plan-only --fresh-process).
    names=$(FRESH="${FRESH:-loo-llama}" python3 -c "import os, sys; sys.path.insert(0, 'benchmarks')
import plan_validation as p
print(' '.join(r['name'] for r in p.configs('loo') if r['group'].startswith(tuple(os.environ['FRESH'].split()))))")
    left=$((${CALL_S:-600} - 20 - SECONDS))
    timeout $left python3 benchmarks/plan_validation.py --configs loo --only $names --fresh-process \
      --out "$out/fresh" --deadline $((left - 15)) >> "$out/setup.log" 2>&1; echo "fresh rc $?" >> "$out/setup.log"
    tail -16 "$out/fresh/plan_validation.md"
    ;;
  M)  # 5 files: setup.log, peak/{on,off,scout_b8}.json, peak/diff.txt
    # What Llama 3.1 8B's peak allocated holds with and without engine.backward_graphs (call L: 0.1-0.5 GiB more
    # with them, growing with the tokens, beyond what the planner counts), by allocation site; and Scout at 8 x 1024
    # (the planner over by 2.4 GiB, +3.3 %, where auto's 8 x 1 layouts live).
    mkdir -p "$out/peak"
    timeout 250 python3 benchmarks/peak_probe.py --model llama4-scout --seq-len 1024 --batch 8 --grad-accum 1 \
      --rank 32 --out "$out/peak/scout_b8.json" >> "$out/setup.log" 2>&1
    echo "probe scout b8 rc $?" >> "$out/setup.log"
    for g in true false; do
      name=$([ "$g" = true ] && echo on || echo off)
      timeout 150 python3 benchmarks/peak_probe.py --model llama3.1-8b --seq-len 16384 --grad-accum 2 \
        --engine backward_graphs=$g --out "$out/peak/$name.json" >> "$out/setup.log" 2>&1
      echo "probe backward_graphs=$g rc $?" >> "$out/setup.log"
    done
    python3 benchmarks/peak_probe.py --diff "$out/peak/off.json" "$out/peak/on.json" > "$out/peak/diff.txt" 2>&1
    cat "$out/peak/diff.txt"; tail -3 "$out/setup.log"
    ;;
  W)  # 4 files: setup.log, gpu_tests.log, step_ab.json, stock/stock_baseline.json
    # engine.backward_graphs (each layer's recomputation and backward replayed too). Run at 3ed0323 (twelfth
    # session) every backward capture failed and the fallback died; mended in 2a654c0. First the failed-capture
    # reset alone (a process of its own: a broken reset would fail every later test of its process), then the
    # graphs' tests (losses and gradients against eager, no host sync in a replayed micro-step), then the seed as
    # written with and without (real synthetic weights since 455ee13), the stock stack beside if time is left.
    # (The real-vs-zero weights A/B of the first run: python3 benchmarks/zero_weights_ab.py --out "$out/zw".)
    timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "failed_capture" \
      > "$out/gpu_tests.log" 2>&1; echo "reset test rc $?" >> "$out/setup.log"
    timeout 170 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "layer_graphs" \
      >> "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?" >> "$out/setup.log"; grep -E "passed|failed" "$out/gpu_tests.log"
    STEPS=3 timeout 250 bash benchmarks/step_ab.sh 2048 "seed::--grad-accum 8" \
      "bgraphs:backward_graphs=true:--grad-accum 8" > "$out/w.log" 2>&1
    echo "seed rc $?" >> "$out/setup.log"; cat "$out/w.log"; rm -f "$out/w.log"
    stock_if_time_left 90
    ;;
  K)  # 5 files: setup.log, prof/profile.{json,txt}, step_ab.json, stock/stock_baseline.json
    # The seed's kernels per decoder layer at its own layout (1 x 2048, the first pass replayed from its graph):
    # two depths (4 and 8 layers, one global-attention layer in four at both), their difference per layer.
    timeout 150 python3 benchmarks/profile_step.py --layers 4 8 --seq-len 2048 --batch 1 --out "$out/prof" \
      > "$out/prof.log" 2>&1; echo "profile rc $?" >> "$out/setup.log"; tail -14 "$out/prof.log"; rm -f "$out/prof.log"
    mv "$out/prof/profile_table.txt" "$out/prof/profile.txt" 2>/dev/null
    auto="--grad-accum 8 --layout auto --memory-limit-gib 79.65"
    STEPS=4 timeout 260 bash benchmarks/step_ab.sh 2048 "seed::--grad-accum 8" "auto::$auto" > "$out/k.log" 2>&1
    echo "seed rc $?" >> "$out/setup.log"; cat "$out/k.log"; rm -f "$out/k.log"
    left=$((${CALL_S:-600} - 20 - SECONDS))
    timeout $((left < 110 ? left : 110)) python3 benchmarks/stock_baseline.py --out "$out/stock" --layers 2 4 \
      --seq-len 2048 --layouts per-expert --loras seed >> "$out/setup.log" 2>&1; echo "stock rc $?" >> "$out/setup.log"
    rm -f "$out/stock/stock_baseline.md"; tail -4 "$out/setup.log"
    ;;
  L)  # 3 files: setup.log, loo/plan_validation.{json,md}
    timeout 560 python3 benchmarks/plan_validation.py --configs loo --out "$out/loo" --deadline 540 \
      >> "$out/setup.log" 2>&1; echo "loo rc $?" >> "$out/setup.log"; tail -35 "$out/loo/plan_validation.md"
    ;;
  T)  # 6 files: setup.log, gpu_tests.log, train_{true,false}.log, report_{true,false}.json
    # The trainer's own path with the graphs (ninth session measured them through moefit bench only): the packed
    # micro-batches padded to max_length, the graphs captured once, the same losses as without, and what ran how.
    # First the graphs' GPU tests as mended after call I (the eager side really eager, no-sync with graphs on/off).
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "layer_graphs or never_syncs" \
      > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?" >> "$out/setup.log"; tail -3 "$out/gpu_tests.log"
    for g in true false; do
      timeout 150 python3 -m moefit train --output-dir "/tmp/run_$g" --max-steps 30 \
        --set train.gradient_checkpointing=true --set engine.layer_graphs=$g > "$out/train_$g.log" 2>&1
      echo "train layer_graphs=$g rc $?" >> "$out/setup.log"; cp "/tmp/run_$g/report.json" "$out/report_$g.json"
      grep -i "padded\|layer graphs\|done:\|held-out" "$out/train_$g.log"
    done
    ;;
  J)  # 3 files: setup.log, dense_ab.json, step_ab.json
    # Does replaying the first pass pay on a dense model too (call 3 of the ninth session: Llama 3.1 8B 1 x 2 at
    # 5,864 tok/s with it, 6,617 the day before without, on another host)? Alternated in one call, then the seed.
    dense="--model llama3.1-8b --seq-len 2048 --grad-accum 2 --rank 16 --expert-rank 0 --targets q,k,v,o,gate,up,down"
    for run in on1 off1 on2 off2; do
      flag=""; [ "${run:0:3}" = off ] && flag="--engine layer_graphs=false"
      # shellcheck disable=SC2086
      timeout 100 python3 -m moefit bench $dense $flag --steps 3 --json > "$out/dense_$run.json" 2>> "$out/setup.log"
      echo "dense $run rc $?" >> "$out/setup.log"
    done
    python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); merged = {}
for f in sorted(out.glob("dense_*.json")):
    try:
        merged[f.stem] = json.loads(f.read_text())
    except json.JSONDecodeError:
        continue
    r = merged[f.stem]["runs"][0]
    print(f.stem, round(r["step_s"], 3), round(r["tokens_per_s"]), [round(x, 3) for x in r.get("micro_step_s", [])],
          round(r.get("gpu_busy_fraction", 0), 2), r.get("layer_graphs"))
    f.unlink()
(out / "dense_ab.json").write_text(json.dumps(merged, indent=2) + "\n")
PY
    STEPS=2 timeout 230 bash benchmarks/step_ab.sh 2048 "seed::--grad-accum 8" \
      "before:layer_graphs=false,lora_cast_cache=false:--grad-accum 8" > "$out/j.log" 2>&1
    echo "seed rc $?" >> "$out/setup.log"; cat "$out/j.log"; rm -f "$out/j.log"; tail -3 "$out/setup.log"
    ;;
  I)  # 4 files: setup.log, gpu_tests.log, step_ab.json, stock/stock_baseline.json
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "layer_graphs or never_syncs" \
      > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?" >> "$out/setup.log"; tail -3 "$out/gpu_tests.log"
    auto="--grad-accum 8 --layout auto --memory-limit-gib 79.65"
    STEPS=2 timeout 330 bash benchmarks/step_ab.sh 2048 "seed::--grad-accum 8" \
      "before:layer_graphs=false,lora_cast_cache=false:--grad-accum 8" "auto::$auto" > "$out/i.log" 2>&1
    echo "seed rc $?" >> "$out/setup.log"; cat "$out/i.log"; rm -f "$out/i.log"
    timeout 110 python3 benchmarks/stock_baseline.py --out "$out/stock" --layers 2 4 --seq-len 2048 \
      --layouts per-expert --loras seed >> "$out/setup.log" 2>&1; echo "stock rc $?" >> "$out/setup.log"
    rm -f "$out/stock/stock_baseline.md"; tail -4 "$out/setup.log"
    ;;
  H)  # 5 files: setup.log, gpu_tests.log, step_ab.json, fam/families.{json,md}
    # engine.layer_graphs (moefit/models/layer_graphs.py): each checkpointed layer's first pass replayed from a
    # CUDA graph. Its GPU tests (losses bit for bit, gradients, no sync in a replayed micro-step), then the seed
    # recipe as written with and without it (and with lora_cast_cache, which then only serves the recomputation),
    # then Qwen3-30B's host-bound 1 x 2 with and without it if the call has time left.
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -k "layer_graphs or never_syncs" \
      > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?" >> "$out/setup.log"; tail -3 "$out/gpu_tests.log"
    STEPS=2 timeout 330 bash benchmarks/step_ab.sh 2048 "seed::--grad-accum 8" "graphs:layer_graphs=true:--grad-accum 8" \
      "graphs_casts:layer_graphs=true,lora_cast_cache=true:--grad-accum 8" > "$out/h.log" 2>&1
    echo "seed rc $?" >> "$out/setup.log"; cat "$out/h.log"; rm -f "$out/h.log"
    left=$((${CALL_S:-600} - 30 - SECONDS))
    if [ "$left" -gt 120 ]; then
      timeout "$left" python3 benchmarks/families.py --out "$out/fam" --models qwen3-30b-a3b --no-stock \
        --variants "graphs:--engine layer_graphs=true" >> "$out/setup.log" 2>&1
      echo "families rc $?" >> "$out/setup.log"; grep -A3 "^| model | variant" "$out/fam/families.md"
    fi
    tail -4 "$out/setup.log"
    ;;
  A|B)  # A: 7 files: setup.log, gpu_tests.log, sync/sync_audit.{json,md}, step_ab.json, stock/stock_baseline.json
        # B: the same + fam/families.{json,md}
    # The GPU tests (the decoder's engine path, the loss without a sync), where the host still waits for the GPU
    # in a step (per family), then issue 15's acceptance rows in one call: the seed recipe as written and its auto
    # layout with the default engine (labels and position ids stay on the host), and the stock stack beside them.
    # B (after the packed-rows check moved to the host, host_positions): only the no-sync GPU tests, and Qwen3-30B
    # against stock (micro-batch 1 and the 24 GB auto layout) if the call has time left.
    tests=(); [ "$1" = B ] && tests=(-k "sync or host")
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py "${tests[@]}" > "$out/gpu_tests.log" 2>&1
    echo "gpu tests rc $?" >> "$out/setup.log"; tail -3 "$out/gpu_tests.log"
    timeout 120 python3 benchmarks/sync_audit.py --out "$out/sync" --models llama4-scout qwen3-30b-a3b gpt-oss-20b \
      llama3.1-8b > "$out/sync.log" 2>&1; echo "sync audit rc $?" >> "$out/setup.log"
    tail -6 "$out/sync.log"; rm -f "$out/sync.log"
    auto="--grad-accum 8 --layout auto --memory-limit-gib 79.65"
    STEPS=2 timeout 200 bash benchmarks/step_ab.sh 2048 "seed::--grad-accum 8" "auto::$auto" > "$out/a.log" 2>&1
    echo "seed rc $?" >> "$out/setup.log"; cat "$out/a.log"; rm -f "$out/a.log"
    timeout 110 python3 benchmarks/stock_baseline.py --out "$out/stock" --layers 2 4 --seq-len 2048 \
      --layouts per-expert --loras seed >> "$out/setup.log" 2>&1; echo "stock rc $?" >> "$out/setup.log"
    rm -f "$out/stock/stock_baseline.md"; tail -3 "$out/setup.log"
    left=$((${CALL_S:-600} - 60 - SECONDS))
    if [ "$1" = B ] && [ "$left" -gt 100 ]; then
      timeout "$left" python3 benchmarks/families.py --out "$out/fam" --models qwen3-30b-a3b \
        --variants "auto24:--layout auto --memory-limit-gib 22.5" >> "$out/setup.log" 2>&1
      echo "families rc $?" >> "$out/setup.log"; grep -A3 "^| model | goal" "$out/fam/families.md"
    fi
    ;;
  P)  # 5 files: setup.log, {grouped,cupti,noprof,fresh}/plan_validation.json
    # The same Scout 1 x 2048 micro-step ran 0.81 s in a fresh `moefit bench` process (call U) and 1.09 s in the
    # planner set's grouped process (call V), after other configurations and their profiled steps. Kineto leaves
    # CUPTI attached after a profile unless TEARDOWN_CUPTI=1 (pytorch/pytorch#144455), which measure_training now
    # sets: grouped as the set runs them (teardown on), grouped with CUPTI left attached (TEARDOWN_CUPTI=0, as call
    # V ran), grouped with no profiled step, and each in a fresh process; 3 timed steps each.
    PAIRS="loo-scout-r32-s512-b1-ga1 loo-scout-r32-s2048-b1-ga1 loo-scout-r32-s2048-b1-ga4 loo-gpt-oss-20b-r16-s512-b1-ga1 loo-gpt-oss-20b-r16-s512-b1-ga4"
    FRESH="loo-scout-r32-s2048-b1-ga1 loo-scout-r32-s2048-b1-ga4 loo-gpt-oss-20b-r16-s512-b1-ga1 loo-gpt-oss-20b-r16-s512-b1-ga4"
    pv="python3 benchmarks/plan_validation.py --configs loo --timed-steps 3"
    # shellcheck disable=SC2086
    timeout 130 $pv --out "$out/grouped" --only $PAIRS --deadline 120 >> "$out/setup.log" 2>&1
    echo "grouped rc $?" >> "$out/setup.log"
    # shellcheck disable=SC2086
    TEARDOWN_CUPTI=0 timeout 130 $pv --out "$out/cupti" --only $PAIRS --deadline 120 >> "$out/setup.log" 2>&1
    echo "cupti rc $?" >> "$out/setup.log"
    # shellcheck disable=SC2086
    timeout 130 $pv --out "$out/noprof" --no-profile --only $PAIRS --deadline 120 >> "$out/setup.log" 2>&1
    echo "noprof rc $?" >> "$out/setup.log"
    # shellcheck disable=SC2086
    timeout 150 $pv --out "$out/fresh" --fresh-process --only $FRESH --deadline 140 >> "$out/setup.log" 2>&1
    echo "fresh rc $?" >> "$out/setup.log"
    rm -f "$out"/*/plan_validation.md
    python3 -c "import json, sys
for f in sys.argv[1:]:
    try:
        rows = json.load(open(f))['results']
    except OSError:
        continue
    for r in rows:
        m = r['measured']; print(f.split('/')[-2], r['name'], round(m['step_s'], 3),
                                 [round(x, 3) for x in m.get('micro_step_s', [])], round(m.get('optimizer_s', 0), 3))
" "$out/grouped/plan_validation.json" "$out/cupti/plan_validation.json" "$out/noprof/plan_validation.json" \
      "$out/fresh/plan_validation.json"
    ;;
  G)  # 5 files: setup.log, step_ab.json, fam/families.{json,md}, gc/gc_pauses.json
    # engine.gc_freeze (moefit/host_gc.py): the seed step 1 x 8 with the model frozen (default) and not,
    # alternating twice in one call (the host's pace moves the step by +-15 % between runs), Qwen3-30B's host-bound
    # 1 x 2 the same way, and the collector's pauses on this host (benchmarks/gc_pauses.py, CUDA, tiny widths).
    # engine.lora_cast_cache (opt-in, moefit/lora_copies.py) beside them: 28 launches less per Scout layer and
    # micro-step for 224 MB.
    STEPS=2 timeout 330 bash benchmarks/step_ab.sh 2048 "freeze::--grad-accum 8" \
      "nofreeze:gc_freeze=false:--grad-accum 8" "casts:lora_cast_cache=true:--grad-accum 8" \
      "freeze2::--grad-accum 8" "nofreeze2:gc_freeze=false:--grad-accum 8" > "$out/g.log" 2>&1
    echo "seed rc $?" >> "$out/setup.log"; cat "$out/g.log"; rm -f "$out/g.log"
    left=$((${CALL_S:-600} - 40 - SECONDS))
    timeout $((left > 190 ? 150 : left - 40)) python3 benchmarks/families.py --out "$out/fam" --models qwen3-30b-a3b \
      --no-stock --variants "nofreeze:--engine gc_freeze=false" "casts:--engine lora_cast_cache=true" \
      >> "$out/setup.log" 2>&1
    echo "families rc $?" >> "$out/setup.log"; grep -A3 "^| model | variant" "$out/fam/families.md"
    mkdir -p "$out/gc"; left=$((${CALL_S:-600} - 20 - SECONDS))
    timeout "$left" python3 benchmarks/gc_pauses.py --device cuda --steps 2 --json "$out/gc/gc_pauses.json" \
      >> "$out/setup.log" 2>&1; echo "gc pauses rc $?" >> "$out/setup.log"; rm -f "$out/gc/gc_pauses.md"
    tail -8 "$out/setup.log"
    ;;
  D)  # 4 files: setup.log, {grouped,fresh}/plan_validation.json, bench8b.json
    # Llama 3.1 8B's 1 x 2048 micro-step took 0.685 s in the planner set's group (call V, 70 us of host per launch)
    # and 0.29 s in families.py's `moefit bench` (call F, 30 us) with the same kernels (0.224 s, ~9,850
    # launches): the 8B rows of the set grouped and fresh, and the bench beside them, one host, one call.
    R8="loo-llama3.1-8b-r16-s512-b1-ga1 loo-llama3.1-8b-r16-s2048-b1-ga1 loo-llama3.1-8b-r16-s2048-b1-ga8"
    pv="python3 benchmarks/plan_validation.py --configs loo --timed-steps 3"
    # shellcheck disable=SC2086
    timeout 150 $pv --out "$out/grouped" --only $R8 --deadline 140 >> "$out/setup.log" 2>&1
    echo "grouped rc $?" >> "$out/setup.log"
    # shellcheck disable=SC2086
    timeout 170 $pv --out "$out/fresh" --fresh-process --only $R8 --deadline 160 >> "$out/setup.log" 2>&1
    echo "fresh rc $?" >> "$out/setup.log"
    timeout 120 python3 -m moefit bench --model llama3.1-8b --seq-len 2048 --grad-accum 2 --rank 16 --expert-rank 0 \
      --targets q,k,v,o,gate,up,down --json > "$out/bench8b.json" 2>> "$out/setup.log"
    echo "bench rc $?" >> "$out/setup.log"; rm -f "$out"/*/plan_validation.md
    grep -h "^| loo-llama" "$out"/*/plan_validation_loo.md 2>/dev/null | cut -c1-60; tail -4 "$out/setup.log"
    ;;
  F)  # 3 files: setup.log, fam/families.{json,md}
    # Issue 13's rows measured on an earlier engine (bitsandbytes decoding) plan 18-27 % fast with the current
    # constants: the four one-GPU families that fit a quick call measured again, stock beside each
    timeout 540 python3 benchmarks/families.py --out "$out/fam" --models qwen3-30b-a3b gpt-oss-20b mixtral-8x7b \
      llama3.1-8b >> "$out/setup.log" 2>&1; echo "families rc $?" >> "$out/setup.log"
    grep -A8 "^| model | goal" "$out/fam/families.md"
    ;;
  S)  # nvidia-h200-x2: Scout seed recipe expert-parallel (one host sync per MoE layer and micro-step now, four
      # before) against data parallel on the same 2 GPUs, same call (call 1 of benchmarks/expert_parallel.md: EP
      # 2,658 against DP 3,024 tokens/s, GPU busy 50 % against 71 %)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    timeout 540 python3 benchmarks/expert_parallel.py --out "$out/ep" --gpus 2 --configs scout > "$out/s.log" 2>&1
    echo "S rc $?" >> "$out/setup.log"; tail -12 "$out/s.log"
    ;;
  *) echo "unknown call $1 (A, B, D, G, H, I, J, L, T, P, F or S)"; exit 2 ;;
esac

#!/usr/bin/env bash
# One device call (~7 min on one H200) after an engine change: GPU tests, the planner's validation set re-recorded
# (peaks with gradient accumulation), the input embedding in host memory with and without the kept routed gate/up
# outputs at seq 2048, and where a 4-layer step's kernel time goes (by category and by operator + shapes).
#   bash benchmarks/engine_ab.sh        (results under $OUT or ./bench-out; at most 8 files)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
. benchmarks/gpu_env.sh
python3 -m pytest -o addopts="" -q -p no:cacheprovider tests/test_gpu.py > "$out/log.txt" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$out/log.txt" | head -12
python3 benchmarks/plan_validation.py --out "$out" --configs all >> "$out/log.txt" 2>&1
grep -E "^\| scout|^\| llama|max \|error|acceptance" "$out/plan_validation.md"
bash benchmarks/step_ab.sh "2048" "host-emb::--embeddings-on-host --grad-accum 2" \
  "host-emb-keep::--embeddings-on-host --keep-routed-gate-up --grad-accum 2"
python3 benchmarks/profile_step.py --layers 4 --seq-len 2048 --out "$out" >> "$out/log.txt" 2>&1
python3 -c "import json; d = json.load(open('$out/profile.json')); print(json.dumps(d['kernel_categories']))"

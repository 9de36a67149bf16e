#!/usr/bin/env bash
# A/B of the NF4 decoder on full-depth Scout (seed recipe): bitsandbytes' kernel vs moefit's Triton kernel.
#   bash benchmarks/decoder_ab.sh   (on the GPU machine; JSON under $OUT or ./bench-out)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
. benchmarks/gpu_env.sh
python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | grep -E "^E |passed|failed|^\.+|s\.*" | head -5
for dec in bnb triton; do
  MOEFIT_NF4_DECODER=$dec python3 -m moefit bench --model llama4-scout --seq-len 2048 4096 --steps 3 --json \
    > "$out/bench_decoder_$dec.json" 2> "$out/bench_decoder_$dec.err"
  python3 - "$out/bench_decoder_$dec.json" "$dec" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(sys.argv[2], r["seq_len"], f"{r['peak_allocated_bytes'] / 2**30:.2f} GiB", f"{r['step_s']:.3f} s",
          f"{r['tokens_per_s']:.0f} tok/s")
PY
done

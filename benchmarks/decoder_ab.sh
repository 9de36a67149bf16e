#!/usr/bin/env bash
# A/B of the NF4 decoder on full-depth Scout (seed recipe): bitsandbytes' kernel vs moefit's Triton kernel.
#   bash benchmarks/decoder_ab.sh   (on the GPU machine; JSON under $OUT or ./bench-out)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
. benchmarks/gpu_env.sh
python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | grep -E "^E |passed|failed|^\.+|s\.*" | head -5
bash benchmarks/step_ab.sh "2048 4096" "decoder-bnb:nf4_decoder=bnb" "decoder-triton:nf4_decoder=triton"

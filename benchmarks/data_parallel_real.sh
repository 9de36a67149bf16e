#!/usr/bin/env bash
# The real (not synthetic) path on 2 GPUs: a Scout-width checkpoint with 2 layers written by transformers, then
# moefit train --gpus 2 --smoke, a run killed (kill -9 of one worker) after its first checkpoint, --resume on 2 GPUs,
# moefit export --merge, and the merged model loaded by transformers and compared with moefit's forward.
#   bash benchmarks/data_parallel_real.sh            (on a host with >= 2 GPUs; writes $OUT/data_parallel_real.log)
#   MODEL_DIR=moefit/assets/tiny DEVICE=cpu bash benchmarks/data_parallel_real.sh   (the same steps on CPU, tiny)
#   PRESET=llama4-maverick TRAIN_ARGS="--expert-parallel 2" bash benchmarks/data_parallel_real.sh
#       (expert parallel: a Maverick-width checkpoint, 128 experts in the MoE layer; each GPU reads its 64)
#   EXPORT_WORKERS="16" ...  exports once more with 16 workers (speed; the first export uses moefit's default)
#   SMOKE=0 ...  skips the --smoke run (each load of a 33 GB Maverick-width checkpoint costs time)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
work=${WORK:-/tmp/moefit-dp-real}; rm -rf "$work"; mkdir -p "$work"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
log="$out/data_parallel_real.log"
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }
step() { say "$*"; "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }

device=${DEVICE:-cuda}
model=${MODEL_DIR:-$work/model}
[ -n "${MODEL_DIR:-}" ] || step python3 benchmarks/width_checkpoint.py "$model" --preset "${PRESET:-llama4-scout}" \
  --layers 2 --device cuda || exit 1
extra=${TRAIN_ARGS:-}
cat > "$work/run.yaml" <<YAML
model: $model
lora: {r: 16, alpha: 32, dropout: 0.0}
train: {max_length: 512, batch_size: 1, grad_accum: 2, max_steps: 6, lr: 1.0e-3, warmup_steps: 1,
        save_every: 2, eval_every: 3, eval_batches: 4, log_every: 1}
smoke: {steps: 8}
YAML
if [ "${SMOKE:-1}" = 1 ]; then
  step python3 -m moefit train "$work/run.yaml" --gpus 2 $extra --smoke --output-dir "$work/smoke"; echo "smoke exit $?" | tee -a "$log"
fi

say "full run, killed (kill -9 of rank 1) once checkpoint step-2 is complete"
python3 -m moefit train "$work/run.yaml" --gpus 2 $extra --output-dir "$work/run" >> "$log" 2>&1 &
launcher=$!
for _ in $(seq 600); do [ -f "$work/run/checkpoints/step-2/complete" ] && break; sleep 0.5; done
victim=$(for p in $(pgrep -f "moefit train"); do tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx RANK=1 && echo $p; done | head -1)
say "killing rank 1 (pid $victim)"; kill -9 "$victim"
wait "$launcher"; echo "killed run: launcher exit $?" | tee -a "$log"
step python3 -m moefit train --resume "$work/run" --gpus 2; echo "resume exit $?" | tee -a "$log"
peak_rss='import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode
print(f"peak RSS of the export: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.2f} GiB"); sys.exit(rc)'
step python3 -c "$peak_rss" python3 -m moefit export "$work/run" --merge --out "$work/merged"; echo "export exit $?" | tee -a "$log"
for n in ${EXPORT_WORKERS:-}; do  # the same export again with n workers (speed only), e.g. EXPORT_WORKERS="16"
  step python3 -c "$peak_rss" python3 -m moefit export "$work/run" --merge --out "$work/merged-$n" --workers "$n"
  rm -rf "$work/merged-$n"
done
step python3 benchmarks/merged_logits_check.py "$work/run" "$model" "$work/merged" --device "$device" --tokens 256
say "done"

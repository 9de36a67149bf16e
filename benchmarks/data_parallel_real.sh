#!/usr/bin/env bash
# The real (not synthetic) path on 2 GPUs: a Scout-width checkpoint with 2 layers written by transformers, then
# moefit train --gpus 2 --smoke, a run killed (kill -9 of one worker) after its first checkpoint, --resume on 2 GPUs,
# moefit export --merge, and the merged model loaded by transformers and compared with moefit's forward.
#   bash benchmarks/data_parallel_real.sh            (on a host with >= 2 GPUs; writes $OUT/data_parallel_real.log)
#   MODEL_DIR=moefit/assets/tiny DEVICE=cpu bash benchmarks/data_parallel_real.sh   (the same steps on CPU, tiny)
#   PRESET=llama4-maverick TRAIN_ARGS="--expert-parallel 2" bash benchmarks/data_parallel_real.sh
#       (expert parallel: a Maverick-width checkpoint, 128 experts in the MoE layer; each GPU reads its 64)
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
step python3 -m moefit export "$work/run" --merge --out "$work/merged"; echo "export exit $?" | tee -a "$log"
step python3 - "$work" "$model" "$device" <<'PY'
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
import moefit
from moefit.lora import load_adapter
work, base, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
hf = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.bfloat16).to(device).eval()
print("transformers loaded", type(hf).__name__, "layers", hf.config.num_hidden_layers)
ids = torch.randint(10, hf.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
model = moefit.load_model(base, quantization="nf4", device=device)
load_adapter(model, work / "run")
with torch.no_grad():
    got = hf(ids).logits.float()
    want = model(ids, return_logits=True).logits.float()
rel = ((got - want).norm() / want.norm()).item()
print(f"merged (transformers, bf16) vs moefit (NF4 + adapter) logits: relative error {rel:.4f}; "
      f"greedy tokens equal: {(got.argmax(-1) == want.argmax(-1)).float().mean().item():.3f}")
PY
say "done"

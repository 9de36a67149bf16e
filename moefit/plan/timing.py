"""Step time from counted FLOPs and bytes, divided by the GPU's peak rates times the engine's efficiency.

Per micro-step (T = batch x seq tokens):
- matmul FLOPs = 6 x active params x T: forward 2, recompute 2, backward (input gradients only: the base is
  frozen) 2; LoRA adds 8 x its active params x T (its weight gradients too);
- attention FLOPs: 4 x head_dim x heads x (query, key) pairs per layer for the forward (QK^T and PV), x 4.5
  for forward + recompute + the flash-attention backward (2.5 x forward);
- bytes = the NF4 dequantization traffic: each quantized weight is read (0.5 B + constants), written as bf16
  and read back by the GEMM (2 x 2 B), `dequant_passes` times per micro-step; bf16 weights read once per pass.
Per optimizer step: grad_accum micro-steps, the 8-bit AdamW update (read/write of params, grads, states) and,
on several GPUs, the ring all-reduce of the LoRA gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .gpus import Gpu
from .memory import RunShape, lora_tensors
from .model_facts import ModelFacts

ATTN_PASSES = 1 + 1 + 2.5  # forward, recompute, flash-attention backward


@dataclass
class StepTime:
    micro_step_s: float
    step_s: float
    tokens_per_s: float
    flops_per_micro_step: float
    bytes_per_micro_step: float
    compute_s: float
    memory_s: float
    overhead_s: float
    optimizer_s: float
    allreduce_s: float


def _attention_pairs(seq: int, span: int | None) -> float:
    """(query, key) pairs a causal attention computes over `seq` tokens, with an optional window / chunk."""
    if span is None or span >= seq:
        return seq * (seq + 1) / 2
    full, rest = divmod(seq, span)  # Llama 4 style chunks; a sliding window costs about the same
    return full * span * (span + 1) / 2 + rest * (rest + 1) / 2


def lora_active_params(f: ModelFacts, shape: RunShape) -> float:
    total = 0.0
    for (i, ts) in lora_tensors(f, shape):
        la = f.layers[i]
        n = sum(ts)
        if la.moe and shape.expert_rank and f.num_experts:
            # routed-expert LoRA tensors run only for the top_k experts a token is routed to
            re = shape.expert_rank
            ei, h, t = f.expert_intermediate, f.hidden, shape.targets
            routed = sum(f.num_experts * re * (h + ei) for x in ("gate", "up", "down") if x in t)
            n = n - routed + routed * f.top_k / f.num_experts
        total += n
    return total


def micro_step_flops(f: ModelFacts, shape: RunShape) -> float:
    T = shape.tokens
    dense = 6.0 * f.active_params_per_token() * T + 8.0 * lora_active_params(f, shape) * T
    attn = sum(4.0 * f.head_dim * f.heads * _attention_pairs(shape.seq_len, la.attention_span) * shape.batch
               for la in f.layers)
    return dense + ATTN_PASSES * attn


def micro_step_bytes(f: ModelFacts, shape: RunShape, calib: dict[str, Any], weight_bytes: dict[str, int]) -> float:
    passes = calib["time"]["dequant_passes"]
    g = f.groups()
    quantized = sum(g[k] for k in ("attention", "routed_experts", "shared_experts", "dense_mlp"))
    nf4 = sum(v for k, v in weight_bytes.items() if k.startswith("weights_") and k != "weights_bf16")
    nf4 += weight_bytes.get("quant_constants", 0)
    if shape.quant.weights == "nf4":
        per_pass = nf4 + 2 * 2 * quantized
    else:
        per_pass = 2 * quantized
    head = g["lm_head"] or g["embed_tokens"]
    return passes * (per_pass + 2 * head)


def step_time(f: ModelFacts, shape: RunShape, gpu: Gpu, calib: dict[str, Any], weight_bytes: dict[str, int],
              num_gpus: int = 1) -> StepTime | None:
    """None when the GPU's peak rates are unknown (a GPU outside the catalogue)."""
    if not gpu.bf16_tflops or not gpu.bandwidth_gbs:
        return None
    ct = calib["time"]
    flops = micro_step_flops(f, shape)
    nbytes = micro_step_bytes(f, shape, calib, weight_bytes)
    compute = flops / (gpu.bf16_tflops * 1e12 * ct["gemm_efficiency"])
    memory = nbytes / (gpu.bandwidth_gbs * 1e9 * ct["bandwidth_efficiency"])
    overhead = 3 * f.num_layers * ct["per_layer_pass_overhead_s"]
    micro = compute + memory + overhead
    param_bytes = 4 if shape.lora.dtype == "float32" else 2
    n_train = sum(sum(ts) for _, ts in lora_tensors(f, shape))
    state = 2 if shape.optimizer != "adamw" else 2 * 2 * param_bytes
    opt_bytes = n_train * (3 * param_bytes + 2 * state)  # read param+grad, write param, read+write states
    optimizer = opt_bytes / (gpu.bandwidth_gbs * 1e9 * ct["bandwidth_efficiency"])
    allreduce = 0.0
    if num_gpus > 1 and gpu.interconnect_gbs:
        allreduce = 2 * (num_gpus - 1) / num_gpus * n_train * param_bytes / (gpu.interconnect_gbs * 1e9)
    step = shape.grad_accum * micro + optimizer + allreduce
    tokens = shape.tokens * shape.grad_accum * num_gpus
    return StepTime(micro, step, tokens / step, flops, nbytes, compute, memory, overhead, optimizer, allreduce)

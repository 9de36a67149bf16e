"""Step time from counted FLOPs, bytes and kernel-issuing host time, with constants fitted on the GPU.

A micro-step has two clocks: the GPU's kernels and the host thread that issues them (Python, autograd, one launch
per kernel; ~700 kernels per MoE layer per pass). The host runs ahead of the GPU (no sync inside a step), so a
micro-step takes about the longer of the two, not their sum: at micro-batch 1 the host sets the pace (GPU busy
43-90 %), at large micro-batches the GPU does. The two combine as (gpu^p + host^p)^(1/p), p = `overlap_exponent`
(1: never overlapped, the sum; large: the maximum), fitted: the phases of a layer alternate between kernels too
short to cover their launch and GEMMs that cover many, so the overlap is partial.

GPU time, each term a counted quantity over a rate (calibration.json "time"):
- matmuls: 2 x active params x T per pass of the frozen base (forward, recompute under gradient checkpointing,
  backward for input gradients only; `weight_passes` counts what the recomputation skips) incl. the chunked
  loss's 3 lm_head GEMMs, + 8 x active LoRA params x T, at `gemm_efficiency` x the GPU's dense bf16 peak;
- attention, causal flash kernel (no explicit mask): 4 x head_dim x heads x causal (query, key) pairs per layer,
  x 4.5 for forward + recompute + the flash backward, at `attention_efficiency` x peak;
- attention with an explicit mask (a Llama 4 chunked layer whose chunk is <= the sequence: transformers then builds
  a mask and SDPA falls back from flash to the memory-efficient kernel, which computes the whole S x S rectangle):
  the same FLOPs over S^2 pairs, at `masked_attention_efficiency` x peak;
- the routed experts' grouped GEMMs read their whole bf16 bank every pass, however few tokens each expert gets:
  where that read (2 B per routed weight of this GPU, at the measured copy rate `bandwidth_efficiency`) takes
  longer than their FLOPs, the difference adds (a roofline per grouped GEMM, `expert_read_excess`; Scout at 2,048
  tokens, 128 rows per expert, is read-bound);
- NF4 dequantization: every quantized weight read (0.5 B + constants) and written as bf16 (2 B), once per pass
  of its matmul (`weight_passes`), at `dequant_bandwidth_efficiency` x the GPU's memory bandwidth;
- elementwise work on activations (norms, rotary, routing permutes, LoRA dropout, casts, the loss's softmax): the
  bytes of every tensor a layer saves for its backward (memory.layer_working_set), x 4 for forward, recomputation
  and backward, + the loss's 22 bytes per logit, at `activation_bandwidth_efficiency` x bandwidth;
- per decoder layer and pass, `gpu_layer_pass_s`: the floor of its hundreds of small kernels; a MoE layer's
  routing, permutes and per-expert launches add `gpu_moe_layer_pass_s` to it.
Host time: per decoder layer and pass (forward, recompute, backward) `moe_layer_pass_s` for a MoE layer,
`dense_layer_pass_s` for a dense one, plus `expert_lora_layer_pass_s` where the routed experts carry LoRA, x the
family's `host_family_scale` (1 for those measured as the reference); + `host_micro_step_s` per micro-step (the
embedding, the loss and the step's bookkeeping: not scaled by the family). These
are seconds of host time on the validation machine, not scaled by the GPU. The fitted GPU terms of a family
are likewise x its `gpu_family_scale` (its kernels against the counted rates: expert GEMMs of other shapes).
Per optimizer step: grad_accum micro-steps; the optimizer update (read/write of params, grads, states at
`bandwidth_efficiency`) + `optimizer_tensor_s` of host time per LoRA tensor (one launch each); on several GPUs
the ring all-reduce of the LoRA gradients at `allreduce_bus_efficiency` x the interconnect (after the last
backward, not overlapped with it). A calibration without the newer keys plans as the earlier additive model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..models.families import family_for
from .gpus import Gpu
from .memory import RunShape, layer_working_set, local_experts, lora_tensors
from .model_facts import Layer, ModelFacts

ATTN_PASSES = 1 + 1 + 2.5  # forward, recompute, flash-attention backward
GPU_TERMS = ("matmul", "attention", "masked_attention", "dequant", "activation", "gpu_layer_passes",
             "gpu_moe_layer_passes")
HOST_TERMS = ("moe_layer_passes", "dense_layer_passes", "expert_lora_layer_passes", "micro_steps")
TIME_TERMS = GPU_TERMS + HOST_TERMS
LOSS_BYTES_PER_LOGIT = 8 + 8 + 6  # chunked loss: forward, its recomputation (fp32 logits + temporary), backward


@dataclass
class StepTime:
    micro_step_s: float
    step_s: float
    tokens_per_s: float
    flops_per_micro_step: float
    bytes_per_micro_step: float
    compute_s: float  # matmuls + attention
    memory_s: float  # NF4 dequantization
    overhead_s: float  # host time of a micro-step (per layer pass and per micro-step)
    optimizer_s: float
    allreduce_s: float
    alltoall_s: float = 0.0  # expert parallelism: routed rows to their experts' GPUs and back, per optimizer step
    gpu_s: float = 0.0  # a micro-step's GPU time (compute, dequantization, activations, small-kernel floor)
    activation_s: float = 0.0  # elementwise work on activations
    replayed_s: float = 0.0  # of gpu_s, the passes replayed from CUDA graphs (replayed_work): host work covers none


def _attention_pairs(seq: int, span: int | None) -> float:
    """(query, key) pairs a causal attention computes over `seq` tokens, with an optional window / chunk."""
    if span is None or span >= seq:
        return seq * (seq + 1) / 2
    full, rest = divmod(seq, span)  # Llama 4 style chunks; a sliding window costs about the same
    return full * span * (span + 1) / 2 + rest * (rest + 1) / 2


def masked_attention(la: Layer, seq: int) -> bool:
    """transformers passes SDPA an explicit mask (no flash kernel) for a local layer once seq >= its span
    (masking_utils._ignore_causal_mask_sdpa); otherwise is_causal=True and flash runs."""
    return la.attention_span is not None and seq >= la.attention_span


def lora_active_params(f: ModelFacts, shape: RunShape) -> float:
    """LoRA parameters one token passes through (per token, the same with or without expert parallelism)."""
    total = 0.0
    shape = dataclasses.replace(shape, expert_parallel=1)
    for (i, ts) in lora_tensors(f, shape):
        la = f.layers[i]
        n = sum(ts)
        if la.moe and shape.expert_rank and f.num_experts:
            # routed-expert LoRA tensors run only for the top_k experts a token is routed to
            routed = f.num_experts * _lora_per_expert(f, shape)
            n = n - routed + routed * f.top_k / f.num_experts
        total += n
    return total


def weight_passes(f: ModelFacts, shape: RunShape) -> dict[str, float]:
    """Per weight group, how many times a micro-step runs its frozen matmul (and, for NF4, decodes it): forward,
    backward (input gradient) and, with checkpointing, the recomputation, less what the engine skips there:
    the routed and shared experts' down projections where the MoE output only feeds the residual sum, and the
    routed gate/up whose first-pass outputs are kept (keep_routed_gate_up). Averaged over each group's
    projections (gate, up, down each a third of an MLP's parameters)."""
    if not shape.gradient_checkpointing:
        return dict.fromkeys(("attention", "routed_experts", "shared_experts", "dense_mlp", "router", "lm_head"), 2.0)
    moe = getattr(family_for(f.family), "moe", None)  # the engine skips only what the family spec allows
    skip_down = bool(moe and moe.output_feeds_residual)
    skip_routed_down = skip_down and moe.scale_inputs  # output-scaled experts: backward reads the output (d/dw)
    routed_recompute = (0 if shape.keep_routed_gate_up else 2) + (0 if skip_routed_down else 1)  # of gate, up, down
    shared_recompute = 2 + (0 if skip_down else 1)
    return {"attention": 3.0, "routed_experts": 2 + routed_recompute / 3, "shared_experts": 2 + shared_recompute / 3,
            "dense_mlp": 3.0, "router": 3.0, "lm_head": 3.0}  # lm_head: the chunked loss's 3 GEMMs


def _frozen_params(f: ModelFacts, passes: dict[str, float], lm_head: bool = True) -> float:
    """Frozen-base parameters a token passes through, each weight group x its passes (`weight_passes`)."""
    g = f.groups()
    routed_active = g["routed_experts"] * f.top_k / f.num_experts if f.num_experts else 0
    head = (g["lm_head"] or g["embed_tokens"]) if lm_head else 0
    return (passes["attention"] * g["attention"] + passes["routed_experts"] * routed_active
            + passes["shared_experts"] * g["shared_experts"] + passes["dense_mlp"] * g["dense_mlp"]
            + passes["router"] * g["router"] + passes["lm_head"] * head)


def _attention_flops(f: ModelFacts, shape: RunShape, passes: float) -> tuple[float, float]:
    """(causal flash, explicitly masked) attention FLOPs of `passes` forward-equivalents over every layer."""
    attn = masked = 0.0
    for la in f.layers:
        per_pair = passes * 4.0 * f.head_dim * f.heads * shape.batch
        if masked_attention(la, shape.seq_len):
            masked += per_pair * shape.seq_len * shape.seq_len
        else:
            attn += per_pair * _attention_pairs(shape.seq_len, la.attention_span)
    return attn, masked


def _dequant_bytes(f: ModelFacts, shape: RunShape, weight_bytes: dict[str, int], passes: dict[str, float]) -> float:
    """NF4 (+ its constants) read and bf16 written, once per pass of each quantized group's matmul."""
    if shape.quant.weights != "nf4":
        return 0.0  # bf16 weights are used as they are
    g, consts = f.groups(), weight_bytes.get("quant_constants", 0)
    quantized = sum(g[k] for k in ("attention", "routed_experts", "shared_experts", "dense_mlp"))
    total = 0.0
    for k in ("attention", "routed_experts", "shared_experts", "dense_mlp"):
        if g[k]:  # NF4 + its share of the constants read, bf16 written
            stored = weight_bytes.get(f"weights_{k}", 0) + consts * g[k] / quantized
            written = g[k] / (shape.expert_parallel if k == "routed_experts" else 1)  # the GPU's own experts
            total += passes[k] * (stored + 2 * written)
    return total


def time_work(f: ModelFacts, shape: RunShape, weight_bytes: dict[str, int]) -> dict[str, float]:
    """The work of one micro-step, per term of the model (TIME_TERMS): FLOPs, bytes or layer passes."""
    T = shape.tokens
    recompute = 1 if shape.gradient_checkpointing else 0  # forward passes repeated in the backward
    passes = 2 + recompute  # forward, recompute, backward
    wp = weight_passes(f, shape)
    matmul = 2.0 * _frozen_params(f, wp) * T + (6.0 + 2 * recompute) * lora_active_params(f, shape) * T
    attn, masked = _attention_flops(f, shape, ATTN_PASSES - 1 + recompute)
    expert_lora = f.moe_layers if (shape.expert_rank and f.num_experts and
                                   {"gate", "up", "down"} & shape.targets) else 0
    # engine.layer_graphs: the first pass is one replay per layer, its host time gone (models.layer_graphs); with
    # engine.backward_graphs the recomputation and backward too
    host_passes = 0 if shape.replays_backward else passes - 1 if shape.replays_first_pass else passes
    routed_flops, routed_read = _routed_bank(f, shape, wp["routed_experts"])
    return {"matmul": matmul, "attention": attn, "masked_attention": masked,
            "routed_matmul": routed_flops, "expert_read": routed_read,
            "dequant": _dequant_bytes(f, shape, weight_bytes, wp),
            "activation": activation_bytes(f, shape), "gpu_layer_passes": passes * f.num_layers,
            "gpu_moe_layer_passes": passes * f.moe_layers, "moe_layer_passes": host_passes * f.moe_layers,
            "dense_layer_passes": host_passes * (f.num_layers - f.moe_layers),
            "expert_lora_layer_passes": host_passes * expert_lora, "micro_steps": 1.0}


def _routed_bank(f: ModelFacts, shape: RunShape, passes: float) -> tuple[float, float]:
    """(FLOPs, bytes read) of the routed experts' frozen grouped GEMMs over `passes` passes: each pass reads the
    whole bf16 bank of this GPU's experts (2 bytes a weight), however few tokens each expert gets (included in the
    matmul term's FLOPs; the bytes count only where they take longer: expert_read_excess)."""
    if not f.num_experts:
        return 0.0, 0.0
    routed = f.groups()["routed_experts"]
    flops = 2.0 * passes * routed * f.top_k / f.num_experts * shape.tokens
    return flops, passes * 2.0 * routed / shape.expert_parallel


def expert_read_excess(work: dict[str, float], matmul_s_per_flop: float, gpu: Gpu, ct: dict[str, Any]) -> float:
    """Seconds the routed experts' grouped GEMMs spend reading their bf16 banks beyond what their FLOPs take (a
    roofline per grouped GEMM: with few tokens per expert, as Scout's 128 rows per expert at 2,048 tokens, the
    GEMM streams the bank at the memory's rate; benchmarks/speed_targets.md, the twelfth session's profile), at the
    copy rate `bandwidth_efficiency`."""
    read = work.get("expert_read", 0.0) / (gpu.bandwidth_gbs * 1e9 * ct["bandwidth_efficiency"])
    return max(0.0, read - work.get("routed_matmul", 0.0) * matmul_s_per_flop)


def replayed_work(f: ModelFacts, shape: RunShape, weight_bytes: dict[str, int],
                  work: dict[str, float]) -> dict[str, float]:
    """The GPU work (GPU_TERMS) of the decoder layers' passes replayed from CUDA graphs: the first pass
    (engine.layer_graphs), with engine.backward_graphs the recomputation and backward too; else nothing. The host
    queues those replays in moments and goes on, but it can run ahead of the GPU only by the launch queue's depth
    (about a layer's kernels): their GPU time is not covered by host work and adds to the rest of the micro-step
    (micro_step_seconds). What stays eager with both: the embedding and the chunked loss. `work`: the micro-step's
    (time_work), of which the replays are all but the loss with engine.backward_graphs."""
    if not shape.replays_first_pass:
        return dict.fromkeys(GPU_TERMS, 0.0)
    if shape.replays_backward:
        wp = weight_passes(f, shape)
        head = f.groups()["lm_head"] or f.groups()["embed_tokens"]
        return {"matmul": work["matmul"] - 2.0 * wp["lm_head"] * head * shape.tokens,
                "routed_matmul": work["routed_matmul"], "expert_read": work["expert_read"],
                "attention": work["attention"], "masked_attention": work["masked_attention"],
                "dequant": work["dequant"], "activation": activation_bytes(f, shape, loss=False),
                "gpu_layer_passes": work["gpu_layer_passes"], "gpu_moe_layer_passes": work["gpu_moe_layer_passes"]}
    once = dict.fromkeys(weight_passes(f, shape), 1.0)
    attn, masked = _attention_flops(f, shape, 1.0)
    routed_flops, routed_read = _routed_bank(f, shape, 1.0)
    return {"matmul": 2.0 * _frozen_params(f, once, lm_head=False) * shape.tokens
            + 2.0 * lora_active_params(f, shape) * shape.tokens,
            "routed_matmul": routed_flops, "expert_read": routed_read,
            "attention": attn, "masked_attention": masked, "dequant": _dequant_bytes(f, shape, weight_bytes, once),
            "activation": activation_bytes(f, shape, passes=1, loss=False), "gpu_layer_passes": f.num_layers,
            "gpu_moe_layer_passes": f.moe_layers}


def activation_bytes(f: ModelFacts, shape: RunShape, passes: int | None = None, loss: bool = True) -> float:
    """Bytes of elementwise traffic on activations in one micro-step: what each layer saves for its backward (the
    tensors its norms, rotary, routing, LoRA dropout and casts write) x `passes` (default: forward, recomputation,
    a backward that reads and writes each), + the chunked loss's fp32 logits (`loss`)."""
    if passes is None:
        passes = 4 if shape.gradient_checkpointing else 3
    saved = {la: sum(layer_working_set(f, la, shape)[0].values()) for la in set(f.layers)}
    return passes * sum(saved[la] for la in f.layers) + (LOSS_BYTES_PER_LOGIT * shape.tokens * f.vocab if loss else 0)


def dequant_efficiency(ct: dict[str, Any], nf4_decoder: str | None = None) -> float:
    """The NF4 decoder's rate as a fraction of the memory bandwidth: `dequant_bandwidth_efficiency` is one number
    (an older calibration) or one per engine.nf4_decoder, each measured (benchmarks/nf4_decode_variants.md)."""
    eff = ct["dequant_bandwidth_efficiency"]
    if not isinstance(eff, dict):
        return eff
    from ..config import EngineConfig

    return eff.get(nf4_decoder or EngineConfig.nf4_decoder, eff[EngineConfig.nf4_decoder])


def seconds_per_unit(gpu: Gpu, ct: dict[str, Any], family: str | None = None,
                     nf4_decoder: str | None = None) -> dict[str, float]:
    """Seconds per unit of each TIME_TERMS work on this GPU with these constants (a constant missing from an
    older calibration turns its term off); NF4 decoded by `nf4_decoder` (default: the engine's default)."""
    peak, bw = gpu.bf16_tflops * 1e12, gpu.bandwidth_gbs * 1e9
    host = ct.get("host_family_scale", {}).get(family, 1.0)
    dev = ct.get("gpu_family_scale", {}).get(family, 1.0)  # the family's kernels against the counted rates
    act = ct.get("activation_bandwidth_efficiency")
    return {"matmul": dev / (peak * ct["gemm_efficiency"]),
            "attention": dev / (peak * ct["attention_efficiency"]),
            "masked_attention": dev / (peak * ct["masked_attention_efficiency"]),
            "dequant": 1 / (bw * dequant_efficiency(ct, nf4_decoder)),
            "activation": dev / (bw * act) if act else 0.0,
            "gpu_layer_passes": dev * ct.get("gpu_layer_pass_s", 0.0),
            "gpu_moe_layer_passes": dev * ct.get("gpu_moe_layer_pass_s", 0.0),
            "moe_layer_passes": host * ct["moe_layer_pass_s"], "dense_layer_passes": host * ct["dense_layer_pass_s"],
            "expert_lora_layer_passes": host * ct["expert_lora_layer_pass_s"],
            "micro_steps": ct.get("host_micro_step_s", 0.0)}  # (the embedding, the loss: not the family's layers)


def overlap(gpu_s, host_s, p: float):
    """Wall time of work the host issues while the GPU runs it: (gpu^p + host^p)^(1/p); p = 1 is the sum (no
    overlap), a large p the longer of the two. Seconds, or arrays of them (the fit evaluates many records)."""
    return (gpu_s**p + host_s**p) ** (1 / p)


def micro_step_seconds(sec: dict[str, float], ct: dict[str, Any], expert_parallel: int = 1,
                       replayed_s: float = 0.0, extra_gpu_s: float = 0.0) -> tuple[float, float, float]:
    """(wall, GPU, host) seconds of one micro-step from the seconds of each TIME_TERMS term; `replayed_s` of the
    GPU's are passes replayed from CUDA graphs (replayed_work), which host work does not cover. Under expert parallelism
    the host reads every MoE layer's row counts before its all-to-all (a sync per layer and pass), so it cannot
    run ahead of the GPU by more than a layer: the two overlap less (`overlap_exponent_expert_parallel`)."""
    gpu_s = sum(sec[k] for k in GPU_TERMS) + extra_gpu_s  # (extra: expert_read_excess, of it `replayed_s` too)
    host_s = sum(sec[k] for k in HOST_TERMS)
    p = ct.get("overlap_exponent", 1.0)
    if expert_parallel > 1:
        p = ct.get("overlap_exponent_expert_parallel", p)
    return replayed_s + overlap(gpu_s - replayed_s, host_s, p), gpu_s, host_s


def optimizer_seconds(f: ModelFacts, shape: RunShape, gpu: Gpu, ct: dict[str, Any]) -> tuple[float, float]:
    """(LoRA parameter count, seconds of one optimizer update: a bandwidth-bound read/write of every state, and
    the host's launches, one per LoRA tensor)."""
    param_bytes = 4 if shape.lora.dtype == "float32" else 2
    tensors = [n for _, ts in lora_tensors(f, shape) for n in ts]
    n_train = sum(tensors)
    state = 2 if shape.optimizer != "adamw" else 2 * 2 * param_bytes
    opt_bytes = n_train * (3 * param_bytes + 2 * state)  # read param+grad, write param, read+write states
    host = len(tensors) * ct.get("optimizer_tensor_s", 0.0)  # one launch per tensor, whatever the family
    return n_train, opt_bytes / (gpu.bandwidth_gbs * 1e9 * ct["bandwidth_efficiency"]) + host


def allreduce_seconds(nbytes: float, num_gpus: int, gpu: Gpu, ct: dict[str, Any]) -> float:
    """A ring all-reduce of `nbytes` over `num_gpus` GPUs: each sends and receives 2 (N-1)/N of it at the bus
    bandwidth NCCL reaches on this interconnect."""
    if num_gpus <= 1 or not gpu.interconnect_gbs:
        return 0.0
    return 2 * (num_gpus - 1) / num_gpus * nbytes / (gpu.interconnect_gbs * 1e9 * ct["allreduce_bus_efficiency"])


def _lora_per_expert(f: ModelFacts, shape: RunShape) -> int:
    """LoRA parameters of one routed expert in one MoE layer (A and B of each targeted projection)."""
    re = shape.expert_rank
    return sum(re * (f.hidden + f.expert_intermediate) for x in ("gate", "up", "down") if x in shape.targets)


def routed_lora_params(f: ModelFacts, shape: RunShape) -> int:
    """Routed-expert LoRA parameters one GPU holds (its share of the experts under expert parallelism)."""
    if not (shape.expert_rank and f.num_experts):
        return 0
    return f.moe_layers * local_experts(f, shape.expert_parallel) * _lora_per_expert(f, shape)


def alltoall_seconds(f: ModelFacts, shape: RunShape, gpu: Gpu, ct: dict[str, Any]) -> float:
    """One micro-step's all-to-all traffic under expert parallelism: every MoE layer sends its T x top_k routed rows
    (bf16, hidden wide) to their experts' GPUs and takes them back, in the forward, the recomputation and the
    backward; (N-1)/N of the rows leave the GPU. The host's wait for each layer's row counts is in
    micro_step_seconds (less overlap of host and GPU)."""
    n = shape.expert_parallel
    if n <= 1 or not f.num_experts or not gpu.interconnect_gbs:
        return 0.0
    passes = 3 if shape.gradient_checkpointing else 2
    nbytes = f.moe_layers * passes * 2 * shape.tokens * f.top_k * f.hidden * 2 * (n - 1) / n
    return nbytes / (gpu.interconnect_gbs * 1e9 * ct["alltoall_bus_efficiency"])


def step_time(f: ModelFacts, shape: RunShape, gpu: Gpu, calib: dict[str, Any], weight_bytes: dict[str, int],
              num_gpus: int = 1) -> StepTime | None:
    """None when the GPU's peak rates are unknown (a GPU outside the catalogue)."""
    if not gpu.bf16_tflops or not gpu.bandwidth_gbs:
        return None
    ct = calib["time"]
    work = time_work(f, shape, weight_bytes)
    unit = seconds_per_unit(gpu, ct, f.family, shape.nf4_decoder)
    sec = {k: work[k] * unit[k] for k in TIME_TERMS}
    first = replayed_work(f, shape, weight_bytes, work)
    read_excess = expert_read_excess(work, unit["matmul"], gpu, ct)
    replayed_s = sum(first[k] * unit[k] for k in GPU_TERMS) + expert_read_excess(first, unit["matmul"], gpu, ct)
    compute = sec["matmul"] + sec["attention"] + sec["masked_attention"]
    micro, gpu_s, overhead = micro_step_seconds(sec, ct, shape.expert_parallel, replayed_s, read_excess)
    n_train, optimizer = optimizer_seconds(f, shape, gpu, ct)
    param_bytes = 4 if shape.lora.dtype == "float32" else 2
    # Replicated LoRA is summed over every GPU; routed-expert LoRA (one GPU's share) over the GPUs holding the
    # same experts only: none to sum with a single replica.
    routed = routed_lora_params(f, shape)
    replicas = num_gpus // max(shape.expert_parallel, 1)
    allreduce = allreduce_seconds((n_train - routed) * param_bytes, num_gpus, gpu, ct) + \
        allreduce_seconds(routed * param_bytes, replicas, gpu, ct)
    alltoall = shape.grad_accum * alltoall_seconds(f, shape, gpu, ct)
    step = shape.grad_accum * micro + optimizer + allreduce + alltoall
    tokens = shape.tokens * shape.grad_accum * num_gpus
    flops = work["matmul"] + work["attention"] + work["masked_attention"]
    return StepTime(micro, step, tokens / step, flops, work["dequant"], compute, sec["dequant"], overhead,
                    optimizer, allreduce, alltoall, gpu_s, sec["activation"], replayed_s)

"""Peak GPU memory of one moefit training step, counted tensor by tensor from the model's shapes.

The model mirrors how the engine stores and computes (DESIGN.md, "Engine principles"):
- frozen weights in NF4 (bitsandbytes `quantize_4bit`, blocksize 64, optional double quantization), routed
  experts quantized expert by expert; embeddings, lm_head, norms, router (and biases) in bf16;
- LoRA A/B on the adapted linears; on routed experts A [E, in, r_e], B [E, r_e, out] per projection;
- gradient checkpointing per decoder layer (one bf16 [B, S, H] saved per layer), the backward recomputing one
  layer at a time (its working set is `layer_working_set`), a chunked cross-entropy over lm_head.
The peak is the largest of the loss phase and the backward of each layer, walking the layers from the last to
the first as the backward does (checkpoints are freed and LoRA gradients appear as it goes).
On several GPUs in data parallel each GPU holds all of this (the whole model, its share of the sequences); the
LoRA gradients are views of flat buffers allocated before training, all-reduced once per optimizer step
(moefit.parallel.data_parallel), and NCCL holds buffers outside the allocator.
Empirical constants (allocator reserve, CUDA context, per-layer overheads) come from calibration.json.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import EngineConfig, LoraConfig, QuantConfig, normalize_targets
from ..lora_scale import exact_scale
from ..loss_chunk import loss_chunk_tokens
from .model_facts import Layer, ModelFacts

BF16 = 2
FP32 = 4
ALLOC_ROUND = 512  # the CUDA caching allocator rounds every block to 512 bytes
LARGE_SEGMENT_ROUND = 2 << 20  # blocks >= 10 MiB get their own segment, rounded up to 2 MiB
LARGE_BLOCK = 10 << 20
OFFLOADED_ON_DEVICE = 2  # train.offload_checkpoints: saved layer inputs on the GPU at once (models.offload)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' optimizer state in fp32
BNB_OPTIM_BLOCK = 256  # 8-bit optimizer state: one fp32 absmax per 256 values
NF4_CODE_BYTES = 16 * FP32  # per NF4 module: the 16-value NF4 code
NF4_CODE2_BYTES = 256 * FP32  # per NF4 module with double quant: the 8-bit dynamic map of the absmax


def _r(n: int) -> int:
    """Bytes the caching allocator hands out for an n-byte tensor."""
    return -(-n // ALLOC_ROUND) * ALLOC_ROUND if n else 0


def _segment_waste(n: int) -> int:
    """Reserved-but-unallocated bytes when an n-byte persistent tensor gets its own segment."""
    return (-(-n // LARGE_SEGMENT_ROUND) * LARGE_SEGMENT_ROUND - _r(n)) if n >= LARGE_BLOCK else 0


@dataclass(frozen=True)
class RunShape:
    """The settings of a run that decide its memory and time."""

    seq_len: int
    batch: int = 1
    grad_accum: int = 1
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: str = "adamw_8bit"
    gradient_checkpointing: bool = True
    keep_routed_gate_up: bool = False  # TrainConfig.keep_routed_gate_up
    offload_checkpoints: bool = False  # TrainConfig.offload_checkpoints: the layers' saved inputs in host memory
    num_gpus: int = 1  # GPUs of the run (data-parallel replicas x expert_parallel)
    expert_parallel: int = 1  # GPUs sharing each MoE layer's routed experts (parallel.expert)
    nf4_decoder: str = EngineConfig.nf4_decoder  # engine.nf4_decoder: who decodes NF4, at which rate (timing.py)
    lora_cast_cache: bool = EngineConfig.lora_cast_cache  # engine.lora_cast_cache: bf16 LoRA copies held
    layer_graphs: bool = EngineConfig.layer_graphs  # engine.layer_graphs: first passes replayed from CUDA graphs
    backward_graphs: bool = EngineConfig.backward_graphs  # engine.backward_graphs: recomputation + backward too

    @property
    def replays_first_pass(self) -> bool:
        """engine.layer_graphs in effect: checkpointed layers whose experts stay on their GPU (expert parallelism
        runs them eagerly) and whose saved inputs stay there too (train.offload_checkpoints runs them eagerly)."""
        return self.layer_graphs and self.gradient_checkpointing and self.expert_parallel == 1 \
            and not self.offload_checkpoints

    @property
    def replays_backward(self) -> bool:
        """engine.backward_graphs in effect: the first pass replayed (data parallelism keeps both: the ranks'
        gradients are summed after the step's last backward, parallel.data_parallel)."""
        return self.replays_first_pass and self.backward_graphs

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch

    @property
    def targets(self) -> set[str]:
        return {t.removesuffix("_proj") for t in normalize_targets(self.lora.targets)}

    @property
    def expert_rank(self) -> int:
        if not self.lora.routed_experts:
            return 0
        return self.lora.r if self.lora.expert_r is None else self.lora.expert_r


@dataclass
class Component:
    key: str
    label: str
    bytes: int
    kind: str  # "weights" | "trainable" | "activations" | "overhead"
    detail: str = ""


@dataclass
class MemoryEstimate:
    components: list[Component]
    peak_allocated: int  # what torch.cuda.max_memory_allocated() should read
    peak_reserved: int  # what torch.cuda.max_memory_reserved() should read
    total: int  # peak_reserved + CUDA context: what the GPU must hold
    peak_phase: str  # where the peak happens
    trainable_params: int
    transient: int = 0  # the eager allocator's short-lived bytes at the peak, which its dynamic reserve scales with
    # of `total`, blocks the caching allocator keeps cached but frees and retries with before it runs out of memory
    # (engine.backward_graphs: the capture stream's warm-up blocks): counted where they sit, not against a fit
    releasable: int = 0

    @property
    def needed(self) -> int:
        """What the GPU must hold: `total` less what the allocator gives back on demand."""
        return self.total - self.releasable

    def by_key(self) -> dict[str, int]:
        return {c.key: c.bytes for c in self.components}


# ---------------------------------------------------------------------------------------------- weights

def nf4_bytes(slice_numel: int, slices: int, quant: QuantConfig, linear: bool = False) -> tuple[int, int]:
    """(packed data, quantization constants) bytes of one NF4 module holding `slices` slices of `slice_numel`;
    `linear`: a linear (not routed experts), whose scales `fp32_linear_scales` keeps in fp32."""
    nblocks = math.ceil(slice_numel / quant.blocksize)
    packed = _r(slices * slice_numel // 2)
    if quant.double_quant and linear and quant.fp32_linear_scales:
        consts = _r(slices * nblocks * FP32) + _r(NF4_CODE_BYTES) + _r(NF4_CODE2_BYTES)
    elif quant.double_quant:
        consts = (_r(slices * nblocks) + _r(slices * math.ceil(nblocks / 256) * FP32) + _r(slices * FP32)
                  + _r(NF4_CODE_BYTES) + _r(NF4_CODE2_BYTES))
    else:
        consts = _r(slices * nblocks * FP32) + _r(NF4_CODE_BYTES)
    return packed, consts


def local_experts(f: ModelFacts, expert_parallel: int = 1) -> int:
    """Routed experts per MoE layer that one GPU holds."""
    return f.num_experts // max(expert_parallel, 1)


def _quantized_modules(f: ModelFacts, expert_parallel: int = 1) -> dict[str, list[tuple[int, int]]]:
    """Per group, the NF4 modules as (slice numel, slices) that one GPU holds: what the engine quantizes, module by
    module (under expert parallelism, its slice of the routed experts)."""
    h, mods = f.hidden, {"attention": [], "routed_experts": [], "shared_experts": [], "dense_mlp": []}
    for la in f.layers:
        mods["attention"] += [(h * f.q_dim, 1), (h * f.kv_dim, 1), (h * f.kv_dim, 1), (f.q_dim * h, 1)]
        if la.moe:
            mods["routed_experts"] += [(f.expert_intermediate * h, local_experts(f, expert_parallel))] * 3
            if f.shared_intermediate:
                mods["shared_experts"] += [(h * f.shared_intermediate, 1)] * 3
        else:
            mods["dense_mlp"] += [(h * la.dense_intermediate, 1)] * 3
    return mods


def weight_components(f: ModelFacts, quant: QuantConfig, expert_parallel: int = 1) -> tuple[list[Component], int]:
    """Frozen weights by group, and the allocator's segment rounding on them (reserved, not allocated)."""
    comps, waste = [], 0
    keep = set(quant.keep_unquantized)
    groups = f.groups()
    labels = {"attention": "attention q/k/v/o", "routed_experts": "routed experts",
              "shared_experts": "shared experts", "dense_mlp": "dense MLP"}
    consts_total = 0
    fmt = "NF4" if quant.weights == "nf4" else "bf16"
    for group, modules in _quantized_modules(f, expert_parallel).items():
        if not modules:
            continue
        data = 0
        for numel, slices in modules:
            if quant.weights == "nf4":
                packed, consts = nf4_bytes(numel, slices, quant, linear=group != "routed_experts")
            else:
                packed, consts = _r(numel * slices * BF16), 0
            data += packed
            consts_total += consts
            waste += _segment_waste(packed)
        share = f", 1/{expert_parallel} of {groups[group] / 1e9:.2f} B on this GPU" \
            if group == "routed_experts" and expert_parallel > 1 else ""
        held = groups[group] / (expert_parallel if group == "routed_experts" else 1)
        comps.append(Component(f"weights_{group}", f"{fmt} weights: {labels[group]}", data, "weights",
                               f"{held / 1e9:.2f} B params{share}"))
    if consts_total:
        per = "double-quantized" if quant.double_quant else "fp32"
        if quant.double_quant and quant.fp32_linear_scales:
            per = "fp32 for the linears, double-quantized for the routed experts"
        comps.append(Component("quant_constants", "quantization constants", consts_total, "weights",
                               f"absmax per {quant.blocksize} values, {per}"))
    # Embeddings and lm_head: bf16 unless the user removed them from keep_unquantized.
    bf16_total, parts = 0, []
    hosted = quant.embeddings_on_host and groups["embed_tokens"] > 0  # in host memory: no GPU memory
    for key in ("embed_tokens", "lm_head"):
        n = groups[key]
        if not n or (key == "embed_tokens" and hosted):
            continue
        if key in keep or quant.weights == "none":
            bf16_total += _r(n * BF16)
            waste += _segment_waste(n * BF16)
            parts.append(key)
        else:
            packed, consts = nf4_bytes(n, 1, quant, linear=True)
            comps.append(Component(f"weights_{key}", f"NF4 weights: {key}", packed + consts, "weights"))
    small = groups["norms"] + groups["router"] + groups["biases_and_extras"]
    n_small_tensors = 2 * f.num_layers + 1 + f.moe_layers + (f.num_layers * 4 if small > groups["norms"] else 0)
    bf16_total += small * BF16 + n_small_tensors * ALLOC_ROUND // 2  # many tiny tensors: half a block each
    detail = " + ".join(parts + ["norms", "router"] + (["biases"] if groups["biases_and_extras"] else []))
    if hosted:
        detail += "; embed_tokens in host memory"
    comps.append(Component("weights_bf16", "bf16 embeddings / lm_head / norms / router", bf16_total, "weights",
                           detail))
    return comps, waste


# ---------------------------------------------------------------------------------------------- LoRA

def lora_tensors(f: ModelFacts, shape: RunShape) -> list[tuple[int, list[int]]]:
    """Per decoder layer, the element counts of its LoRA tensors (each A and B separately)."""
    return [(i, _layer_lora(f, la, shape)) for i, la in enumerate(f.layers)]


def _layer_lora(f: ModelFacts, la: Layer, shape: RunShape) -> list[int]:
    """Numels of the layer's LoRA tensors: the adapted linears' (attention, shared expert or dense MLP), then
    the routed experts' banks."""
    return _linear_lora(f, la, shape) + _expert_lora(f, la, shape)


def _linear_lora(f: ModelFacts, la: Layer, shape: RunShape) -> list[int]:
    t, h, r = shape.targets, f.hidden, shape.lora.r
    ts: list[int] = []
    dims = {"q": (h, f.q_dim), "k": (h, f.kv_dim), "v": (h, f.kv_dim), "o": (f.q_dim, h)}
    for name, (i_dim, o_dim) in dims.items():
        if name in t:
            ts += [r * i_dim, o_dim * r]
    inter = f.shared_intermediate if la.moe else la.dense_intermediate
    mlp = {"gate": (h, inter), "up": (h, inter), "down": (inter, h)}
    if inter:
        for name, (i_dim, o_dim) in mlp.items():
            if name in t:
                ts += [r * i_dim, o_dim * r]
    return ts


def _expert_lora(f: ModelFacts, la: Layer, shape: RunShape) -> list[int]:
    t, h, re = shape.targets, f.hidden, shape.expert_rank
    ts: list[int] = []
    if la.moe and re:
        ei = f.expert_intermediate
        emlp = {"gate": (h, ei), "up": (h, ei), "down": (ei, h)}
        for name, (i_dim, o_dim) in emlp.items():
            if name in t:
                e_here = local_experts(f, shape.expert_parallel)  # one GPU's share under expert parallelism
                ts += [e_here * i_dim * re, e_here * re * o_dim]
    return ts


def _optimizer_state_bytes(numel: int, optimizer: str, param_bytes: int) -> int:
    if optimizer == "adamw":
        return 2 * _r(numel * param_bytes)
    if numel < BNB_MIN_8BIT_SIZE:  # bitsandbytes: 32-bit state for small tensors
        return 2 * _r(numel * FP32)
    blocks = math.ceil(numel / BNB_OPTIM_BLOCK)
    return 2 * _r(numel) + 2 * _r(blocks * FP32)


# ---------------------------------------------------------------------------------------------- activations

def layer_working_set(f: ModelFacts, la: Layer, shape: RunShape) -> tuple[dict[str, int], dict[str, int], int]:
    """(saved, transient phases, attention-only saved bytes) of ONE layer recomputed in the backward.

    `saved` names every tensor autograd keeps from the recomputed forward of the layer (moefit.models.layers,
    moefit.moe: frozen NF4 matmuls save nothing, LoRA saves its input and x@A, norms save an fp32 copy of their
    input). `transient` holds, per backward phase, what that phase adds on top (gradients, the dequantized
    weights of ONE projection of the layer); the MLP / experts phase runs with every saved tensor alive, the
    attention phase after the MLP's saved tensors are freed.
    """
    T, h, B = shape.tokens, f.hidden, shape.batch
    r, re, t = shape.lora.r, shape.expert_rank, shape.targets
    drop = shape.lora.dropout > 0  # nn.Dropout before each LoRA A: a bool mask and a bf16 copy per target

    def lora_inputs(n_targets: int, rows: int, width: int) -> int:
        """LoRA saves its (dropped-out) input; without dropout the targets share the one input tensor."""
        if not n_targets:
            return 0
        return n_targets * (_r(rows * width) + _r(rows * width * BF16)) if drop else _r(rows * width * BF16)

    attn_t = [x for x in ("q", "k", "v") if x in t]
    s: dict[str, int] = {
        "input_norm fp32 copy [T,H]": _r(T * h * FP32) + _r(T * FP32),
        "lora q/k/v inputs [T,H]": lora_inputs(len(attn_t), T, h),
        "lora x@A [T,r] (q,k,v,o)": sum(1 for x in ("q", "k", "v", "o") if x in t) * _r(T * r * BF16),
    }
    if la.rope_fp32:
        s["rope fp32 q, k [T,q+kv]"] = _r(T * f.q_dim * FP32) + _r(T * f.kv_dim * FP32)
    if la.qk_norm:
        s["qk-norm fp32 q, k [T,q+kv]"] = _r(T * f.q_dim * FP32) + _r(T * f.kv_dim * FP32)
    s["sdpa q, k, v [T,q+2kv]"] = _r(T * f.q_dim * BF16) + 2 * _r(T * f.kv_dim * BF16)
    s["sdpa out [T,q] + logsumexp"] = _r(T * f.q_dim * BF16) + _r(B * f.heads * shape.seq_len * FP32)
    s["lora o input [T,q]"] = lora_inputs(1 if "o" in t else 0, T, f.q_dim) if drop or "o" not in t else \
        _r(T * f.q_dim * BF16)
    s["post_norm fp32 copy [T,H]"] = _r(T * h * FP32) + _r(T * FP32)
    attn_saved = sum(s.values())

    mlp_t = [x for x in ("gate", "up") if x in t]
    inter = f.shared_intermediate if la.moe else la.dense_intermediate
    mlp_phase = 0
    if inter:
        tag = "shared expert" if la.moe else "mlp"
        s[f"{tag} lora gate/up inputs [T,H]"] = lora_inputs(len(mlp_t), T, h)
        s[f"{tag} gate, up, act [T,3I]"] = 3 * _r(T * inter * BF16)
        s[f"{tag} lora down input [T,I]"] = lora_inputs(1 if "down" in t else 0, T, inter)
        s[f"{tag} lora x@A [T,r]"] = sum(1 for x in ("gate", "up", "down") if x in t) * _r(T * r * BF16)
        mlp_phase = _r(inter * h * BF16) + 3 * _r(T * inter * BF16) + 2 * _r(T * h * BF16)
    phases: dict[str, int] = {}
    if la.moe:
        E, k, ei = f.num_experts, f.top_k, f.expert_intermediate
        Tk = T * k
        s["router logits [T,E] + top-k"] = _r(T * E * BF16) + 2 * _r(T * k * FP32) + 4 * _r(Tk * 8)
        s["routed tokens [T*k,H] (+ scaled copy)"] = 2 * _r(Tk * h * BF16)
        if re:
            s["experts lora gate/up inputs [T*k,H]"] = lora_inputs(len(mlp_t), Tk, h) - \
                (0 if drop else _r(Tk * h * BF16))  # without dropout: the scaled copy above
            s["experts lora down input [T*k,I]"] = lora_inputs(1 if "down" in t else 0, Tk, ei) if drop else 0
            s["experts lora x@A [T*k,r_e]"] = sum(1 for x in ("gate", "up", "down") if x in t) * _r(Tk * re * BF16)
        s["experts gate, up, act [T*k,3I]"] = 3 * _r(Tk * ei * BF16) + _r(Tk * ei * BF16)
        if shape.expert_parallel > 1:  # rows received from the other GPUs and their regrouped copy
            s["all-to-all received rows [T*k,H] x2"] = 2 * _r(Tk * h * BF16)
        phases["routed experts backward"] = (_r(local_experts(f, shape.expert_parallel) * ei * h * BF16) + 3 * _r(Tk * ei * BF16)
                                             + 2 * _r(Tk * h * BF16) + 2 * _r(T * h * BF16))
    if mlp_phase:
        phases["shared expert / MLP backward"] = mlp_phase
    # LoRA weights are cast to the compute dtype for each use; autograd keeps those copies until the backward.
    if shape.lora.dtype != "bfloat16":
        s["lora weights, bf16 copies (this layer)"] = sum(_r(n * BF16) for n in _layer_lora(f, la, shape))
    phases["attention backward"] = (3 * _r(T * (f.q_dim + 2 * f.kv_dim) * BF16) // 2 + _r(T * f.q_dim * FP32)
                                    + 2 * _r(T * h * BF16) + _r(max(f.q_dim, f.kv_dim) * h * BF16))
    return s, phases, attn_saved


def loss_working_set(f: ModelFacts, shape: RunShape) -> dict[str, int]:
    """The chunked cross-entropy over lm_head (moefit.models.loss): never the full [T, V] logits.

    Its forward is the larger of its two phases: per chunk the fp32 logits and logsumexp's fp32 temporary
    (8 B per logit); the backward holds the fp32 softmax gradient and its bf16 cast (6 B per logit).
    """
    T, h, V = shape.tokens, f.hidden, f.vocab
    c = min(loss_chunk_tokens(V), T)
    return {
        "final norm fp32 copy [T,H]": _r(T * h * FP32) + _r(T * FP32),
        "last hidden state [T,H]": _r(T * h * BF16),
        "shifted, masked hidden [T,H]": _r(T * h * BF16),
        "per-token logsumexp, labels": _r(T * FP32) + 2 * _r(T * 8),
        "logits chunk fp32 [C,V]": _r(c * V * FP32),
        "logsumexp temporary fp32 [C,V]": _r(c * V * FP32),
    }


# ---------------------------------------------------------------------------------------------- the estimate

_STATIC: dict[tuple, tuple] = {}


def _static_parts(f: ModelFacts, shape: RunShape) -> tuple:
    """Weights, LoRA, gradients and optimizer state: independent of sequence length and batch, so computed
    once per (model, quantization, LoRA, optimizer) while the planner searches shapes."""
    key = (f, repr(shape.quant), repr(shape.lora), shape.optimizer, shape.expert_parallel, shape.lora_cast_cache)
    if key in _STATIC:
        return _STATIC[key]
    comps, persistent_waste = weight_components(f, shape.quant, shape.expert_parallel)
    param_bytes = FP32 if shape.lora.dtype == "float32" else BF16
    distinct = {la: _layer_lora(f, la, shape) for la in set(f.layers)}  # layers repeat: count each kind once

    def per_kind(fn) -> dict[Layer, int]:
        return {la: sum(fn(n) for n in ts) for la, ts in distinct.items()}

    trainable = sum(per_kind(lambda n: n)[la] for la in f.layers)
    grad_kind = per_kind(lambda n: _r(n * param_bytes))
    grad_by_layer = [grad_kind[la] for la in f.layers]
    opt_kind = per_kind(lambda n: _optimizer_state_bytes(n, shape.optimizer, param_bytes))
    optim = sum(opt_kind[la] for la in f.layers)
    waste_kind = per_kind(lambda n: _segment_waste(n * param_bytes))
    persistent_waste += sum(waste_kind[la] for la in f.layers)
    dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(shape.lora.dtype, shape.lora.dtype)
    rank = f"r={shape.lora.r}" + (f", experts r={shape.expert_rank}" if f.num_experts else "")
    comps.append(Component("lora_params", "LoRA parameters", sum(grad_by_layer), "trainable",
                           f"{trainable / 1e6:.1f} M params, {dtype}, {rank}"))
    comps.append(Component("lora_grads", "LoRA gradients", sum(grad_by_layer), "trainable", dtype))
    opt_label = {"adamw": "AdamW fp32 m, v"}.get(shape.optimizer, "8-bit AdamW (bitsandbytes)")
    comps.append(Component("optimizer_state", "optimizer state", optim, "trainable", opt_label))
    if shape.lora_cast_cache:  # moefit/lora_copies.py: the bf16 copies held from step to step
        # fp32 LoRA: A and B copied; bf16 LoRA: only B, and only where the scale is folded into its copy (2^k)
        folded = exact_scale(shape.lora.alpha / shape.lora.r)
        kept = {la: sum(_r(n * BF16) for i, n in enumerate(_linear_lora(f, la, shape))
                        if param_bytes != BF16 or (i % 2 and folded)) for la in distinct}
        if any(kept.values()):
            comps.append(Component("lora_copies", "LoRA bf16 copies (lora_cast_cache)",
                                   sum(kept[la] for la in f.layers), "trainable",
                                   "attention / shared-expert / dense LoRA, cast once per step"))
    _STATIC[key] = (comps, persistent_waste, trainable, grad_by_layer)
    return _STATIC[key]


def pinned_block_bytes(nbytes: int) -> int:
    """What torch's pinned-memory allocator takes for a tensor of `nbytes`: its blocks are rounded up to a power of
    two (CachingHostAllocator, by default), so a 160 MiB layer input holds 256 MiB."""
    return 1 << max(0, nbytes - 1).bit_length()


def offloaded_host_bytes(f: ModelFacts, shape: RunShape) -> int:
    """Pinned host memory the offloaded checkpoints hold (train.offload_checkpoints): one [B, S, H] per layer, each
    in a block of its own (pinned_block_bytes; models.offload counts the trainer's check the same way)."""
    return f.num_layers * pinned_block_bytes(shape.tokens * f.hidden * BF16)


def layer_graph_pool_bytes(f: ModelFacts, shape: RunShape, backward_working_set: int = 0) -> int:
    """The CUDA graphs' own memory (models.layer_graphs): the largest layer's first-pass temporaries, held in
    their pool apart from the eager allocator's for the run (a first pass saves nothing, so at its peak it holds
    one decoded weight, an MoE layer's whole routed bank, and the few activations around it). One input shape per
    run: the trainer pads every micro-batch to max_length and an epoch's last one to batch_size rows
    (data.dataset.iterate_batches), and builds every mask the packed way (host_positions.as_packed).
    With engine.backward_graphs (shape.replays_backward) the recomputations and backwards share that pool: it
    holds the larger of the two, `backward_working_set` being the largest layer's recompute working set."""
    if not shape.replays_first_pass:
        return 0
    T, h = shape.tokens, f.hidden
    peaks = [_r(max(f.q_dim, f.kv_dim) * h * BF16) + 2 * _r(T * (f.q_dim + 2 * f.kv_dim) * BF16)]
    if f.num_experts:
        Tk, ei = T * f.top_k, f.expert_intermediate
        peaks.append(_r(local_experts(f, shape.expert_parallel) * ei * h * BF16) + 3 * _r(Tk * ei * BF16)
                     + 2 * _r(Tk * h * BF16))
    for inter in {f.shared_intermediate, *(la.dense_intermediate for la in f.layers)} - {0, None}:
        peaks.append(_r(inter * h * BF16) + 3 * _r(T * inter * BF16) + 2 * _r(T * h * BF16))
    if shape.replays_backward:
        peaks.append(backward_working_set)
    return max(peaks)


def estimate_memory(f: ModelFacts, shape: RunShape, calib: dict[str, Any]) -> MemoryEstimate:
    cm = calib["memory"]
    static, persistent_waste, trainable, grad_by_layer = _static_parts(f, shape)
    comps = [dataclasses.replace(c) for c in static]

    # Activations: checkpoints (one [B,S,H] per layer) + rotary tables shared by all layers.
    T, h, L = shape.tokens, f.hidden, f.num_layers
    ws_kind = {la: layer_working_set(f, la, shape) for la in set(f.layers)}
    ws = [ws_kind[la] for la in f.layers]
    if shape.gradient_checkpointing:
        # offloaded (models.offload), the rest in host memory: on the GPU, the input being copied out beside the
        # layer running in the forward, the one loaded and the next one fetched in the backward
        on_device = min(L, OFFLOADED_ON_DEVICE) if shape.offload_checkpoints else L
        ckpt = [int(cm["activation_scale"] * _r(T * h * BF16))] * on_device + [0] * (L - on_device)
    else:  # every layer keeps everything it saves
        ckpt = [_r(T * h * BF16) + sum(s.values()) for s, _, _ in ws]
    rotary = 2 * _r(T * f.head_dim * BF16)
    scale = cm["working_set_scale"]
    # The routed experts' frozen gate/up outputs kept from each MoE layer's first pass for its recomputation
    # (moe.recompute): alive from the forward until that layer's backward.
    kept_layer = 2 * _r(T * f.top_k * f.expert_intermediate * BF16) \
        if shape.gradient_checkpointing and shape.keep_routed_gate_up and f.num_experts else 0
    kept = [kept_layer if la.moe else 0 for la in f.layers]
    # engine.layer_graphs: each layer's output is its graph's static output and the first layer's input a static
    # copy (models.layer_graphs), alive from capture to the end of the run: the checkpoints are not freed as the
    # backward goes down the layers.
    graph_inputs = _r(T * h * BF16) if shape.replays_first_pass else 0

    ws_cache: dict[int, int] = {}

    def layer_ws(i: int) -> int:
        key = id(ws[i])
        if key not in ws_cache:
            ws_cache[key] = _layer_ws(ws[i])
        return ws_cache[key]

    def _layer_ws(w: tuple) -> int:
        s, phases, attn_saved = w
        if not shape.gradient_checkpointing:  # saved tensors are already counted as activations
            return int(scale * max(phases.values()))
        # MLP / experts phases run while the whole layer's saved tensors are alive; attention after the MLP's
        # saved tensors are freed.
        alive = {k: (attn_saved if k == "attention backward" else sum(s.values())) + v for k, v in phases.items()}
        return int(scale * max(alive.values()))

    loss = loss_working_set(f, shape)
    loss_b = sum(loss.values())
    data_parallel = shape.num_gpus > 1
    # Under data parallelism the gradients are views of flat buffers allocated before training, zeroed in place:
    # they exist from the start (parallel.data_parallel).
    resident_grads = shape.grad_accum > 1 or not cm["grads_freed_each_step"] or data_parallel
    base = sum(c.bytes for c in comps if c.key != "lora_grads") + cm["extra_allocated_bytes"]
    # name, total, grads, ckpts, working set, kept, the backward graphs' buffers
    phases: list[tuple[str, int, int, int, int, int, int]] = []
    g_all = sum(grad_by_layer)
    g0 = g_all if resident_grads else 0
    # engine.backward_graphs: the gradient buffers the replays write (models.layer_graphs: the layers' shared input /
    # output gradient and one set of LoRA gradients per kind of layer), alive from the first capture on; while a
    # layer's backward is captured (the run's first micro-step, right after its eager backward) the eager input
    # gradient is alive beside them. Replayed, a layer's recompute working set is the graphs' pool's, not allocated.
    bufs = _r(T * h * BF16) + sum(dict(zip(f.layers, grad_by_layer, strict=True)).values()) \
        if shape.replays_backward else 0
    optim_state = next(c.bytes for c in comps if c.key == "optimizer_state")
    # while a layer's backward is captured: the replays' buffers and the eager input gradient
    captured = bufs + _r(T * h * BF16) if shape.replays_backward else 0
    phases.append(("loss (lm_head chunks)", base + g0 + sum(ckpt) + graph_inputs + sum(kept) + rotary + loss_b
                   + bufs, g0, sum(ckpt) + graph_inputs, loss_b, sum(kept), bufs))
    grads_so_far = 0
    ckpt_prefix, acc = [], 0
    for c_i in ckpt:
        acc += c_i
        ckpt_prefix.append(acc)
    kept_below = sum(kept)
    held = ckpt_prefix[-1] + graph_inputs  # with the layer graphs: every checkpoint, through the whole backward
    for i in range(L - 1, -1, -1):
        grads_so_far += grad_by_layer[i]
        kept_below -= kept[i]  # layer i's own kept outputs are consumed by its recomputation
        g = g_all if resident_grads else grads_so_far
        c = held if shape.replays_first_pass else ckpt_prefix[i]
        w = layer_ws(i)
        if shape.replays_backward:
            # The run's first micro-step runs each layer's backward eagerly and then captures it: before any
            # optimizer step (no optimizer state yet), the gradients growing as the backward goes down.
            g_first = g_all if data_parallel else grads_so_far  # (data parallel: the buffers exist from the start)
            phases.append((f"backward (first, captured) of layer {i}",
                           base - optim_state + g_first + c + kept_below + rotary + w + captured, g_first, c,
                           w, kept_below, captured))
            phases.append((f"backward (replayed) of layer {i}", base + g + c + kept_below + rotary + bufs, g, c, 0,
                           kept_below, bufs))
        else:
            phases.append((f"backward of layer {i}", base + g + c + kept_below + rotary + w, g, c, w, kept_below, 0))
    name, peak, g_at, c_at, w_at, k_at, b_at = max(phases, key=lambda p: p[1])

    # The breakdown shows each component as it stands at the peak.
    first_step = name.startswith("backward (first, captured)")  # before any optimizer step: no state yet
    for c in comps:
        if c.key == "optimizer_state" and first_step:
            c.bytes, c.detail = 0, c.detail + "; not yet allocated at the peak (the run's first micro-step)"
        if c.key == "lora_grads":
            c.detail += f"; {g_at / max(g_all, 1):.0%} of them exist at the peak" if g_all else ""
            c.bytes = g_at
    comps.append(Component("checkpoints", "saved activations (checkpoints)", c_at + rotary, "activations",
                           (f"one bf16 [{shape.batch}x{shape.seq_len}x{h}] per layer"
                            + (", the layer graphs' outputs: all alive" if shape.replays_first_pass else "")
                            + (f"; in host memory (train.offload_checkpoints): {OFFLOADED_ON_DEVICE} on the GPU, "
                               f"{offloaded_host_bytes(f, shape) / 2**30:.1f} GiB pinned on the host"
                               if shape.offload_checkpoints else ""))
                           if shape.gradient_checkpointing else "no checkpointing: every layer's activations"))
    if b_at:
        comps.append(Component("graph_grad_buffers", "backward graphs' gradient buffers", b_at, "activations",
                               "the layers' shared input/output gradient and LoRA gradients (backward_graphs)"))
    if kept_layer:
        comps.append(Component("kept_gate_up", "kept routed gate/up outputs", k_at, "activations",
                               f"{kept_layer / 2**20:.0f} MiB per MoE layer, for the layers not yet recomputed"))
    if name.startswith("backward"):
        idx = int(name.rsplit(" ", 1)[1])
        sv, ph, att = ws[idx]
        top = max(ph, key=lambda k: ph[k] + (att if k == "attention backward" else sum(sv.values())))
        comps.append(Component("layer_working_set", "largest layer's recompute working set", w_at, "activations",
                               f"layer {idx} ({'MoE' if f.layers[idx].moe else 'dense'}), peak in {top}"))
        comps.append(Component("loss_chunk", "loss / logits chunk", 0, "activations",
                               f"{loss_b / 2**30:.2f} GiB when live, not at the peak"))
    else:
        comps.append(Component("layer_working_set", "largest layer's recompute working set", 0, "activations",
                               "not live at the peak"))
        comps.append(Component("loss_chunk", "loss / logits chunk", w_at, "activations",
                               f"{min(loss_chunk_tokens(f.vocab), T)} tokens x {f.vocab} vocab, fp32 + grad"))
    peak_alloc = peak
    transient = (c_at if not shape.replays_first_pass else 0) + k_at + rotary + w_at  # (graph outputs: their pool)
    reserve = int(cm["allocator_dynamic_reserve_fraction"] * transient) + cm["allocator_fixed_reserve_bytes"] \
        + persistent_waste
    if cm["extra_allocated_bytes"]:
        comps.append(Component("extra_allocated", "unnamed allocations (fitted)", cm["extra_allocated_bytes"],
                               "overhead", "calibration.json: extra_allocated_bytes"))
    comps.append(Component("allocator_reserve", "allocator reserve / fragmentation", reserve, "overhead",
                           f"{cm['allocator_dynamic_reserve_fraction']:.0%} of transient + segment rounding"))
    backward_ws = max(layer_ws(i) for i in range(L)) if shape.replays_backward else 0
    pool = layer_graph_pool_bytes(f, shape, backward_ws)
    if pool:
        held = "first-pass temporaries" if not backward_ws else "first-pass or recompute + backward temporaries"
        comps.append(Component("layer_graph_pool", "CUDA graphs' memory (layer_graphs)", pool, "overhead",
                               f"one layer's {held}"))
        reserve += pool
    if backward_ws:  # each backward capture's warm-up runs on the capture stream: its blocks stay cached there
        comps.append(Component("capture_stream_cache", "capture stream's cache (backward_graphs)",
                               backward_ws, "overhead", "a backward capture's warm-up, cached on its stream; "
                               "freed by the allocator on demand, not counted against a fit"))
        reserve += backward_ws
    ctx = cm["cuda_context_bytes"]
    comps.append(Component("cuda_context", "CUDA context", ctx, "overhead", "outside the caching allocator"))
    if data_parallel:
        nccl = cm["nccl_buffers_bytes"]
        comps.append(Component("nccl_buffers", "NCCL buffers (data parallel)", nccl, "overhead",
                               f"{shape.num_gpus} GPUs; outside the caching allocator"))
        ctx += nccl
    return MemoryEstimate(comps, peak_alloc, peak_alloc + reserve, peak_alloc + reserve + ctx, name, trainable,
                          transient, backward_ws)

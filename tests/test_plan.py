"""The planner: parameter counts from config.json, byte counts against bitsandbytes, fit / suggestion logic."""

from __future__ import annotations

import dataclasses
import math

import pytest

from moefit.config import LoraConfig, QuantConfig, RunConfig, config_from_dict
from moefit.errors import ConfigError
from moefit.plan import check_fits, estimate_memory, get_gpu, load_model_facts, plan
from moefit.plan.calibration import load_calibration
from moefit.plan.memory import RunShape, _optimizer_state_bytes, nf4_bytes
from moefit.plan.model_facts import facts_from_config

GIB = 2**30

# Totals computed with transformers on the meta device (presets/SOURCES.md).
KNOWN_TOTALS = {
    "llama4-scout": 107.77e9, "llama4-maverick": 400.71e9, "mixtral-8x7b": 46.70e9, "qwen3-30b-a3b": 30.53e9,
    "llama3.1-8b": 8.03e9, "llama3.1-70b": 70.55e9, "gpt-oss-20b": 20.91e9, "qwen3-235b-a22b": 235.09e9,
    "gpt-oss-120b": 116.83e9, "mixtral-8x22b": 140.62e9, "glm-4.5-air": 106.85e9, "deepseek-v3": 671.03e9,
}
# What each model card publishes (presets/SOURCES.md); the Llama 4 cards count the multimodal model.
CARD_TOTALS = {
    "llama4-scout": 109e9, "llama4-maverick": 400e9, "mixtral-8x7b": 46.7e9, "mixtral-8x22b": 141e9,
    "qwen3-30b-a3b": 30.5e9, "qwen3-235b-a22b": 235e9, "gpt-oss-20b": 21e9, "gpt-oss-120b": 117e9,
    "glm-4.5-air": 106e9, "deepseek-v3": 671e9, "llama3.1-8b": 8e9, "llama3.1-70b": 70e9,
}


@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_parameter_totals_match_transformers(name):
    total = load_model_facts(name).total_params()
    assert abs(total - KNOWN_TOTALS[name]) / KNOWN_TOTALS[name] <= 0.001


def _vision_params(name: str) -> int:
    """Parameters of the vision tower and projector of a multimodal preset (transformers, meta device)."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from moefit.plan.model_facts import resolve_config_path

    path = resolve_config_path(name)
    if "vision_config" not in json.loads(path.read_text()):
        return 0
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))
    return sum(p.numel() for n, p in model.named_parameters() if "vision" in n or "projector" in n)


def test_every_preset_has_a_card_count():
    from moefit.plan.model_facts import PRESETS

    assert set(PRESETS) == set(CARD_TOTALS) == set(KNOWN_TOTALS)


@pytest.mark.parametrize("name", sorted(CARD_TOTALS))
def test_parameter_totals_match_model_cards(name):
    total = load_model_facts(name).total_params() + _vision_params(name)
    assert abs(total - CARD_TOTALS[name]) / CARD_TOTALS[name] <= 0.01


def test_scout_groups_and_active_params():
    f = load_model_facts("llama4-scout")
    g = f.groups()
    assert round(g["routed_experts"] / 1e9, 2) == 96.64
    assert round(g["shared_experts"] / 1e9, 2) == 6.04
    assert round(g["attention"] / 1e9, 2) == 3.02
    assert round((g["embed_tokens"] + g["lm_head"]) / 1e9, 2) == 2.07
    assert round(f.active_params_per_token() / 1e9, 1) == 16.1


def test_maverick_interleaves_moe_and_dense_layers():
    f = load_model_facts("llama4-maverick")
    assert f.moe_layers == 24 and f.num_layers == 48
    assert [la.moe for la in f.layers[:4]] == [False, True, False, True]
    assert f.layers[0].dense_intermediate == 16384


def test_scout_nf4_weight_floor():
    """DESIGN.md: 50.8 GiB NF4 (attention + experts) + 3.9 GiB bf16 = 54.6 GiB."""
    m = estimate_memory(load_model_facts("llama4-scout"), RunShape(seq_len=2048), load_calibration())
    w = {c.key: c.bytes for c in m.components if c.kind == "weights"}
    nf4 = sum(v for k, v in w.items() if k != "weights_bf16")
    assert round(nf4 / GIB, 1) == 50.8
    assert round(w["weights_bf16"] / GIB, 1) == 3.9
    assert round(sum(w.values()) / GIB, 1) == 54.6


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_match_bitsandbytes(double_quant):
    torch = pytest.importorskip("torch")
    import bitsandbytes.functional as bnbF

    w = torch.randn(256, 512, dtype=torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    real_consts = state.absmax.numel() * state.absmax.element_size()
    if double_quant:
        real_consts += state.state2.absmax.numel() * 4 + 4  # absmax2 + the offset
    p, c = nf4_bytes(w.numel(), 1, QuantConfig(double_quant=double_quant))
    assert p == packed.numel() * packed.element_size()
    code_bytes = 64 + (1024 if double_quant else 0)  # the NF4 code (+ the 8-bit map) the module keeps
    # nf4_bytes rounds each buffer to the allocator's 512 B blocks: real bytes <= planned <= real + 512 per buffer
    assert real_consts + code_bytes <= c <= real_consts + code_bytes + 512 * 5


def test_optimizer_state_bytes_match_bitsandbytes_adamw8bit():
    torch = pytest.importorskip("torch")
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(n)) for n in (128, 65536)]  # < 4096 stays fp32, else 8-bit
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    real = sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
               if torch.is_tensor(t) and k not in ("qmap1", "qmap2"))
    planned = sum(_optimizer_state_bytes(p.numel(), "adamw_8bit", 4) for p in params)
    assert planned == real


def test_memory_grows_with_sequence_and_expert_rank():
    f, c = load_model_facts("llama4-scout"), load_calibration()
    totals = [estimate_memory(f, RunShape(seq_len=s), c).total for s in (1024, 2048, 4096, 8192)]
    assert totals == sorted(totals) and totals[-1] > totals[0]
    r0 = estimate_memory(f, RunShape(seq_len=2048, lora=LoraConfig(expert_r=0)), c)
    r32 = estimate_memory(f, RunShape(seq_len=2048, lora=LoraConfig(expert_r=32)), c)
    assert r0.trainable_params < r32.trainable_params / 5  # routed experts hold ~90 % of the LoRA parameters
    assert r0.total < r32.total - 7 * GIB


def test_kept_routed_gate_up_outputs_are_counted_until_each_layer_is_recomputed():
    """With gradient accumulation (gradients resident) the kept outputs of every MoE layer but the one being
    recomputed add to the peak; the planner counts tokens x top_k x intermediate x 2 x 2 bytes per layer."""
    f, c = load_model_facts("llama4-scout"), load_calibration()
    on = estimate_memory(f, RunShape(seq_len=2048, grad_accum=8, keep_routed_gate_up=True), c)
    off = estimate_memory(f, RunShape(seq_len=2048, grad_accum=8), c)
    per_layer = 2 * 2048 * f.top_k * f.expert_intermediate * 2
    kept = on.by_key()["kept_gate_up"]
    assert kept % per_layer == 0 and f.moe_layers - 3 <= kept // per_layer <= f.moe_layers
    assert 0.9 * kept < on.peak_allocated - off.peak_allocated <= kept
    assert "kept_gate_up" not in off.by_key()


def test_no_logits_tensor_of_the_full_vocabulary():
    """The loss chunk is bounded whatever the sequence length: the engine's chunk for this vocabulary
    (moefit.loss_chunk: 320 tokens of Scout's 202,048-entry vocabulary, 1,024 of a 32k one)."""
    from moefit.loss_chunk import loss_chunk_tokens
    from moefit.plan.memory import loss_working_set

    f = load_model_facts("llama4-scout")

    a = loss_working_set(f, RunShape(seq_len=4096))
    b = loss_working_set(f, RunShape(seq_len=16384))
    assert loss_chunk_tokens(f.vocab) == 320 and loss_chunk_tokens(32000) == 1024
    assert a["logits chunk fp32 [C,V]"] == b["logits chunk fp32 [C,V]"] == 320 * f.vocab * 4


def test_plan_api_fits_and_costs():
    p = plan(model="llama4-scout", gpus=["h100-80gb", "rtx4090"], steps=100)
    h100, rtx = p.fit_for("h100-80gb"), p.fit_for("rtx4090")
    assert h100.fits and not rtx.fits and not p.fits
    assert h100.margin_bytes == get_gpu("h100-80gb").memory_bytes - p.memory.needed  # (less blocks freed on demand)
    assert h100.run_hours == pytest.approx(100 * h100.step.step_s / 3600)
    assert h100.cost_usd == pytest.approx(h100.run_hours * 2.69)
    assert h100.max_seq_len >= 2048 and h100.max_batch >= 1
    assert "rtx4090" not in p.suggestion or "RTX" in p.suggestion
    d = p.to_dict()
    assert d["memory"]["total_bytes"] == p.memory.total
    assert sum(c["bytes"] for c in d["memory"]["components"]) == p.memory.total


def test_components_sum_to_total():
    for name in ("llama3.1-8b", "mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b", "llama4-maverick"):
        p = plan(model=name, gpus=["h200"], search=False)
        assert sum(c.bytes for c in p.memory.components) == p.memory.total, name


def test_max_seq_len_is_the_boundary():
    p = plan(model="llama4-scout", gpus=["h100-80gb"])
    m = p.fit_for("h100-80gb").max_seq_len
    assert plan(model="llama4-scout", gpus=["h100-80gb"], seq_len=m, search=False).fits
    assert not plan(model="llama4-scout", gpus=["h100-80gb"], seq_len=m + 256, search=False).fits


def test_check_fits_refuses_with_a_suggestion():
    cfg = RunConfig(model="llama4-scout")
    cfg.train.max_length = 8192
    p = check_fits(cfg, "h100-80gb", gpu_memory_bytes=70 * GIB)
    assert not p.fits
    assert "expert_r" in p.suggestion or "max_length" in p.suggestion
    assert check_fits(cfg, "h200").fits


def test_run_length_from_epochs_and_tokens():
    p = plan(model="llama3.1-8b", gpus=["h100-80gb"], seq_len=2048, batch=2, grad_accum=4, epochs=2,
             tokens=10_000_000, search=False)
    assert p.steps == math.ceil(2 * 10_000_000 / (2048 * 2 * 4))
    assert plan(model="llama3.1-8b", gpus=["h100-80gb"], search=False).steps is None


def test_bad_model_and_gpu_are_named():
    with pytest.raises(ConfigError, match="h100-80gbx"):
        plan(model="llama4-scout", gpus=["h100-80gbx"])
    with pytest.raises(ConfigError, match="model_type"):
        facts_from_config({"model_type": "bert", "hidden_size": 8}, source="x.json")
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        facts_from_config({"model_type": "llama", "hidden_size": 8}, source="x.json")


def test_faster_layout_keeps_the_sequences_per_step_and_fits():
    """The seed recipe (1 x 8 sequences of 2048) on an 80 GB card: the planner finds a faster layout of the same
    optimizer step (bigger micro-batch, fewer accumulation steps) that still fits with margin, and says so."""
    from moefit.plan.planner import FASTER_MAX_TOKENS, _Planner

    cfg = config_from_dict({"model": "llama4-scout", "train": {"max_length": 2048, "batch_size": 1, "grad_accum": 8}})
    p = plan(cfg, gpus=["h100-80gb"])
    fit = p.gpus[0]
    planner = _Planner(cfg, load_calibration())
    shape, step, mem = planner.faster_shape(fit)
    assert shape.batch * shape.grad_accum == 8 and shape.batch > 1 and shape.batch * 2048 <= FASTER_MAX_TOKENS
    assert step.step_s < 0.95 * fit.step.step_s
    assert mem.needed <= fit.gpu.memory_bytes - min(fit.margin_bytes, 0.05 * fit.gpu.memory_bytes)
    assert p.faster and f"train.batch_size {shape.batch}" in p.faster and "faster: " in p.render()
    tight = plan(cfg, gpus=["a100-40gb"])  # does not fit at all: nothing to make faster
    assert tight.faster is None


def test_offloaded_checkpoints_are_counted_and_chosen_where_they_make_a_faster_layout_fit():
    """train.offload_checkpoints: two saved layer inputs on the GPU instead of one per layer, the layer graphs out of
    the plan (they hold every output on the GPU); at 80 GB the seed's faster layout is 8 x 1 with them (8 x 1 keeping
    the inputs on the GPU is over auto's margin), and a Scout row too long for an H100 is told it fits with them."""
    import dataclasses

    from moefit.plan.memory import OFFLOADED_ON_DEVICE
    from moefit.plan.planner import _Planner

    cfg = config_from_dict({"model": "llama4-scout", "train": {"max_length": 2048, "batch_size": 8, "grad_accum": 1}})
    planner = _Planner(cfg, load_calibration())
    kept = dataclasses.replace(planner.shape, layer_graphs=False)
    offloaded = dataclasses.replace(kept, offload_checkpoints=True)
    assert offloaded.replays_first_pass is False and dataclasses.replace(offloaded, layer_graphs=True) \
        .replays_first_pass is False
    one = 8 * 2048 * planner.facts.hidden * 2
    by_kept, by_off = planner.memory(kept).by_key(), planner.memory(offloaded).by_key()
    assert by_off["checkpoints"] < by_kept["checkpoints"] and by_off["checkpoints"] <= OFFLOADED_ON_DEVICE * one * 1.1
    assert planner.memory(offloaded).needed < planner.memory(kept).needed - 3 * 2**30

    seed = config_from_dict({"model": "llama4-scout", "train": {"max_length": 2048, "batch_size": 1, "grad_accum": 8}})
    p = plan(seed, gpus=["h100-80gb"])
    assert "train.offload_checkpoints true" in p.faster and "train.batch_size 8" in p.faster
    assert p.faster_settings["train.offload_checkpoints"] is True
    long = config_from_dict({"model": "llama4-scout", "train": {"max_length": 16384, "batch_size": 1, "grad_accum": 1}})
    q = plan(long, gpus=["h100-80gb"])
    assert not q.gpus[0].fits and "train.offload_checkpoints true fits" in q.render()


def test_weight_passes_follow_what_the_recomputation_skips():
    """Per weight group, the frozen matmul passes of a checkpointed micro-step: forward + backward always, and in
    the recomputation everything but Llama 4's routed / shared down projections and, when kept, the routed gate/up;
    without checkpointing, 2. The planned step follows: keeping the outputs is planned faster, by the GPU time it
    saves (>= 5 % of a micro-step's kernels); at micro-batch 1 the host's share is unchanged and sets most of the
    pace, so the step gains less."""
    from moefit.plan.timing import weight_passes

    scout, dense = load_model_facts("llama4-scout"), load_model_facts("llama3.1-8b")
    wp = weight_passes(scout, RunShape(seq_len=2048))
    assert wp["attention"] == 3 and wp["routed_experts"] == pytest.approx(2 + 2 / 3)
    assert wp["shared_experts"] == pytest.approx(2 + 2 / 3)
    kept = weight_passes(scout, RunShape(seq_len=2048, keep_routed_gate_up=True))
    assert kept["routed_experts"] == 2 and kept["shared_experts"] == wp["shared_experts"]
    assert weight_passes(dense, RunShape(seq_len=2048))["dense_mlp"] == 3
    assert set(weight_passes(scout, RunShape(seq_len=2048, gradient_checkpointing=False)).values()) == {2.0}
    base = plan(model="llama4-scout", gpus=["h200"], search=False).gpus[0].step
    cfg = config_from_dict({"model": "llama4-scout", "train": {"keep_routed_gate_up": True}})
    kept = plan(cfg, gpus=["h200"], search=False).gpus[0].step
    assert kept.gpu_s < 0.95 * base.gpu_s and kept.overhead_s == base.overhead_s and kept.step_s < base.step_s


def test_step_time_overlaps_host_and_gpu_time():
    """A micro-step takes about the longer of the GPU's kernels and the host's issuing of them: (g^p + h^p)^(1/p),
    the sum at p = 1, the maximum as p grows; the GPU time of a first pass replayed from CUDA graphs adds apart
    (the host queues it at once and cannot bank it: the launch queue holds about a layer's kernels); a calibration
    without the overlap constants plans the sum, as the earlier additive model did."""
    import copy

    from moefit.plan.calibration import load_calibration
    from moefit.plan.gpus import get_gpu
    from moefit.plan.memory import RunShape, estimate_memory
    from moefit.plan.timing import GPU_TERMS, HOST_TERMS, overlap, seconds_per_unit, step_time, time_work

    assert overlap(3.0, 4.0, 1.0) == 7.0 and overlap(3.0, 4.0, 2.0) == pytest.approx(5.0)
    assert overlap(3.0, 4.0, 64.0) == pytest.approx(4.0, rel=1e-2)
    f, gpu = load_model_facts("llama3.1-8b"), get_gpu("h200")
    shape = RunShape(seq_len=512, batch=1, grad_accum=4, backward_graphs=False)
    cal = copy.deepcopy(load_calibration())
    by = estimate_memory(f, shape, cal).by_key()
    st = step_time(f, shape, gpu, cal, by)
    assert shape.replays_first_pass and 0.15 * st.gpu_s < st.replayed_s < 0.4 * st.gpu_s  # (the loss is eager)
    p = cal["time"]["overlap_exponent"]
    assert st.step_s == pytest.approx(4 * (st.replayed_s + overlap(st.gpu_s - st.replayed_s, st.overhead_s, p))
                                      + st.optimizer_s)
    assert max(st.gpu_s, st.overhead_s) < st.micro_step_s < st.gpu_s + st.overhead_s
    # engine.backward_graphs: every layer pass replayed (only the embedding and the loss stay eager), no layer pass
    # costs host time: what is left of the host is its per-micro-step work
    both = step_time(f, dataclasses.replace(shape, backward_graphs=True), gpu, cal, by)
    assert both.gpu_s == pytest.approx(st.gpu_s) and 0.9 * both.gpu_s < both.replayed_s < both.gpu_s
    assert both.overhead_s == pytest.approx(cal["time"]["host_micro_step_s"]) and both.overhead_s < st.overhead_s
    assert both.step_s == pytest.approx(
        4 * (both.replayed_s + overlap(both.gpu_s - both.replayed_s, both.overhead_s, p)) + both.optimizer_s)
    assert dataclasses.replace(shape, backward_graphs=True, num_gpus=2).replays_backward  # data parallel too
    assert not dataclasses.replace(shape, backward_graphs=True, expert_parallel=2).replays_backward  # EP: eager
    eager = step_time(f, dataclasses.replace(shape, layer_graphs=False), gpu, cal, by)
    assert eager.replayed_s == 0 and eager.step_s == pytest.approx(
        4 * overlap(eager.gpu_s, eager.overhead_s, p) + eager.optimizer_s)
    for key in ("overlap_exponent", "activation_bandwidth_efficiency", "gpu_layer_pass_s", "host_micro_step_s",
                "optimizer_tensor_s"):
        del cal["time"][key]
    old = step_time(f, shape, gpu, cal, by)
    unit, work = seconds_per_unit(gpu, cal["time"]), time_work(f, shape, by)
    assert old.micro_step_s == pytest.approx(sum(work[k] * unit[k] for k in GPU_TERMS + HOST_TERMS))


def test_a_plan_says_when_its_step_time_depends_on_the_host_cpu():
    """Micro-batch 1 of a small dense model with its recomputation and backward issued by the host: the host's
    share is large, so the plan says the CPU sets part of the pace (measured 1.55x apart between two H200
    machines); replayed from graphs (engine.backward_graphs, the default) or at micro-batch 8 the GPU's work
    dominates: no such line."""
    from moefit.config import RunConfig
    from moefit.plan import plan

    eager = RunConfig()
    eager.engine.backward_graphs = False
    small = plan(eager, model="llama3.1-8b", gpus=["h200"], search=False, seq_len=2048, batch=1, grad_accum=2)
    assert small.to_dict()["gpus"][0]["host_bound"] is True
    assert "host share large on H200 141GB SXM" in small.render()
    replayed = plan(model="llama3.1-8b", gpus=["h200"], search=False, seq_len=2048, batch=1, grad_accum=2)
    assert replayed.to_dict()["gpus"][0]["host_bound"] is False
    big = plan(model="llama3.1-8b", gpus=["h200"], search=False, seq_len=2048, batch=8, grad_accum=1)
    assert big.to_dict()["gpus"][0]["host_bound"] is False and "host share large" not in big.render()


def test_plan_times_the_nf4_decoder_the_run_config_chooses():
    """engine.nf4_decoder sets the dequantization rate (calibration `dequant_bandwidth_efficiency`, one measured
    rate per decoder): the default Triton decoder's step is planned shorter than bitsandbytes', by the counted
    decode bytes over the two rates, and nothing else changes."""
    from moefit.plan.timing import dequant_efficiency

    seed = {"model": "llama4-scout", "train": {"max_length": 2048, "batch_size": 1, "grad_accum": 8}}
    fast = plan(config_from_dict(seed), gpus=["h200"], search=False).gpus[0]
    slow = plan(config_from_dict({**seed, "engine": {"nf4_decoder": "bnb"}}), gpus=["h200"], search=False).gpus[0]
    ct = load_calibration()["time"]
    assert dequant_efficiency(ct) == dequant_efficiency(ct, "triton-load") > 2 * dequant_efficiency(ct, "bnb")
    assert slow.step.memory_s > 2 * fast.step.memory_s and slow.step.step_s > fast.step.step_s
    assert slow.step.compute_s == fast.step.compute_s and slow.total_bytes == fast.total_bytes
    assert dequant_efficiency({"dequant_bandwidth_efficiency": 0.5}, "bnb") == 0.5  # an older calibration


def test_a_fit_counts_what_the_allocator_cannot_give_back():
    """With engine.backward_graphs each backward capture's warm-up leaves its blocks cached on the capture stream
    (one recompute working set): reserved, so in TOTAL as the GPU shows it, but freed by the allocator before it
    runs out of memory, so a fit and its margin count `needed` (TOTAL less them); without the graphs both agree."""
    from moefit.plan.memory import RunShape, estimate_memory

    f, c = load_model_facts("llama4-scout"), load_calibration()
    graphs = estimate_memory(f, RunShape(seq_len=2048, grad_accum=8), c)
    eager = estimate_memory(f, RunShape(seq_len=2048, grad_accum=8, backward_graphs=False), c)
    cache = graphs.by_key()["capture_stream_cache"]
    assert cache == graphs.releasable > 0 and graphs.needed == graphs.total - cache
    assert eager.releasable == 0 and eager.needed == eager.total and "capture_stream_cache" not in eager.by_key()
    assert sum(x.bytes for x in graphs.components) == graphs.total

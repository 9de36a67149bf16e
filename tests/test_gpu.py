"""CUDA paths: grouped GEMM vs the per-expert loop, one-call NF4 dequantization, a training step. Skipped without
a GPU (CI has none; these run on the H200 through benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def _engine(monkeypatch, **settings):
    """Engine settings (config `engine:`) for the rest of one test."""
    import dataclasses

    from moefit import engine_switches

    monkeypatch.setattr(engine_switches, "_current", dataclasses.replace(engine_switches.current(), **settings))


def test_nf4_one_call_dequant_equals_per_expert_on_cuda():
    from moefit.quant.nf4 import NF4Weight

    w = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    q = NF4Weight(tuple(w.shape), dtype=torch.bfloat16, device="cuda").quantize_(w)
    assert torch.equal(q.dequantize(), q._dequantize_by_state(None, torch.bfloat16))
    assert torch.equal(q.dequantize(expert=2), q._dequantize_by_state(2, torch.bfloat16))


@pytest.mark.parametrize("scales_fp32", [False, True])
def test_nf4_quantize_on_side_streams_in_threads_equals_the_default_stream(scales_fp32):
    """bitsandbytes' quantize kernels take no stream (they run on the legacy default stream): quantized from
    threads that each run on a stream of their own (as the export's workers do), right after the weight is made on
    that stream, the bytes equal a quantization on the default stream. Without the ordering in NF4Weight.quantize_
    an 8-thread export wrote garbage (85 % of its values differed)."""
    import threading

    from moefit.quant.nf4 import NF4Weight

    shape = (2048, 4096)

    def make(seed: int) -> torch.Tensor:
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(shape, device="cuda", generator=g)
        for _ in range(4):  # slow work queued on the stream just before the quantization reads the weight
            x = torch.tanh(x @ x.new_ones(shape[1], shape[1]) / shape[1]) + x
        return x.to(torch.bfloat16)

    def quantized(seed: int) -> NF4Weight:
        return NF4Weight(shape, dtype=torch.bfloat16, device="cuda", scales_fp32=scales_fp32).quantize_(make(seed))

    want = {seed: quantized(seed).dequantize().cpu() for seed in range(8)}
    got: dict[int, torch.Tensor] = {}

    def worker(seeds: list[int]) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            for seed in seeds:
                got[seed] = quantized(seed).dequantize().cpu()

    threads = [threading.Thread(target=worker, args=([i, i + 4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(want)
    for seed in want:
        assert torch.equal(got[seed], want[seed]), seed


def test_nf4_decode_in_runs_writes_into_one_output_on_cuda(monkeypatch):
    """A bank decoded in runs of experts (bitsandbytes' 32-bit indexing) goes straight into its output: equal to
    one call, and no second copy of a run is ever allocated."""
    from moefit.quant import nf4

    w = nf4.NF4Weight((8, 256, 512), blocksize=64, device="cuda")
    w.quantize_(torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16))
    whole = w.dequantize()
    monkeypatch.setattr(nf4, "MAX_DECODE_NUMEL", 4 * 256 * 512)  # runs of four experts
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runs = w.dequantize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.equal(runs, whole)
    assert extra < whole.numel() * whole.element_size() * 1.25, extra  # the output (+ fp32 scales), no run copy


def test_triton_nf4_decoder_equals_bitsandbytes():
    from moefit.kernels import triton_nf4
    from moefit.quant.nf4 import NF4Weight

    pytest.importorskip("triton")
    w = torch.randn(3, 384, 1024, device="cuda", dtype=torch.bfloat16)
    q = NF4Weight(tuple(w.shape), dtype=torch.bfloat16, device="cuda").quantize_(w)
    absmax = q.absmax_fp32(slice(None))
    ref = torch.ops.bitsandbytes.dequantize_4bit.default(q.packed.reshape(-1, 1), absmax.reshape(-1), q.blocksize,
                                                         "nf4", list(w.shape), torch.bfloat16)
    for lookup in triton_nf4.LOOKUPS:
        ours = triton_nf4.decode(q.packed, absmax, q.code, q.blocksize, list(w.shape), torch.bfloat16, lookup=lookup)
        assert torch.equal(ours, ref), lookup
        # the double-quantized scales decoded inside the kernel (fp fusion off: multiply and add round apart)
        ours = triton_nf4.decode(q.packed, q.absmax, q.code, q.blocksize, list(w.shape), torch.bfloat16,
                                 lookup=lookup, double_quant=(q.absmax2, q.offset, q.code2))
        assert torch.equal(ours, ref), ("double quant", lookup)


@pytest.mark.parametrize("decoder", ["triton", "triton-load", "triton-gather"])
def test_nf4_weight_decodes_through_the_triton_engine_path_as_bitsandbytes(monkeypatch, decoder):
    """NF4Weight.dequantize as the engine calls it (whole bank, one expert, into an output, another dtype) under
    each Triton decoder: the same bits as under bitsandbytes."""
    pytest.importorskip("triton")
    from moefit.quant.nf4 import NF4Weight

    q = NF4Weight((4, 136, 1024), dtype=torch.bfloat16, device="cuda").quantize_(
        torch.randn(4, 136, 1024, device="cuda", dtype=torch.bfloat16) * 0.02)
    _engine(monkeypatch, nf4_decoder="bnb")
    want = [q.dequantize(), q.dequantize(expert=2), q.dequantize(dtype=torch.float32)]
    _engine(monkeypatch, nf4_decoder=decoder)
    out = torch.empty_like(want[0])
    got = [q.dequantize(), q.dequantize(expert=2), q.dequantize(dtype=torch.float32)]
    q._decode(slice(None), list(q.shape), torch.bfloat16, out=out)
    for a, b in zip(want + [want[0]], got + [out], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    from moefit.quant.nf4 import decoder_in_use

    assert decoder_in_use("cuda") == decoder  # Triton decoded (no silent fall-back to bitsandbytes)


def test_fused_nf4_grouped_matmul_matches_dequantize_then_grouped_mm(monkeypatch):
    pytest.importorskip("triton")
    from moefit.kernels import nf4_grouped_mm
    from moefit.moe.grouped import _GROUPED_MM, ExpertGroups, _apply
    from moefit.quant.nf4 import NF4Weight

    torch.manual_seed(0)
    e, out_f, in_f = 8, 384, 640
    counts = torch.tensor([5, 0, 17, 300, 1, 130, 0, 11], device="cuda")  # empty experts, several row tiles
    groups = ExpertGroups(counts)
    q = NF4Weight((e, out_f, in_f), dtype=torch.bfloat16, device="cuda").quantize_(
        torch.randn(e, out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.05)
    w = q.dequantize()
    _engine(monkeypatch, expert_matmul="fused")
    assert nf4_grouped_mm.enabled()
    for transpose in (True, False):
        x = torch.randn(int(counts.sum()), in_f if transpose else out_f, device="cuda", dtype=torch.bfloat16)
        fused = _apply(x, q, groups, transpose=transpose)
        ref = _GROUPED_MM(x, w.transpose(1, 2) if transpose else w, offs=groups.offs)
        assert fused.shape == ref.shape
        assert rel(fused, ref) < 5e-3, transpose
        _engine(monkeypatch, expert_matmul="dequant")
        assert torch.equal(_apply(x, q, groups, transpose=transpose), ref)
        _engine(monkeypatch, expert_matmul="fused")


def test_grouped_mm_padding_for_large_tiles_changes_nothing():
    from moefit.moe.grouped import ExpertGroups, _apply, _padded_for_large_tiles, loop_grouped_matmul
    from moefit.quant.nf4 import NF4Weight

    torch.manual_seed(0)
    counts = torch.full((16,), 126, device="cuda")
    counts[3] += 30  # 2,046 rows: 18 rows short of 129 per expert
    groups = ExpertGroups(counts)
    q = NF4Weight((16, 256, 512), dtype=torch.bfloat16, device="cuda").quantize_(
        torch.randn(16, 256, 512, device="cuda", dtype=torch.bfloat16) * 0.05)
    for transpose in (True, False):
        x = torch.randn(int(counts.sum()), 512 if transpose else 256, device="cuda", dtype=torch.bfloat16)
        assert _padded_for_large_tiles(x, 16).shape[0] == 129 * 16  # this shape is padded
        w = q.dequantize(dtype=torch.bfloat16)
        plain = loop_grouped_matmul(x, w.transpose(1, 2) if transpose else w, groups.sizes)
        padded = _apply(x, q, groups, transpose=transpose)
        assert padded.shape == plain.shape and rel(padded, plain) < 5e-3


def test_grouped_expert_matmul_matches_loop_forward_and_backward():
    from moefit.moe.grouped import (
        ExpertGroups,
        _apply,
        frozen_expert_matmul,
        grouped_matmul,
        loop_grouped_matmul,
    )
    from moefit.quant.nf4 import NF4Weight

    torch.manual_seed(0)
    e, h, i = 8, 512, 256
    counts = torch.tensor([5, 0, 17, 64, 1, 30, 0, 11], device="cuda")
    n = int(counts.sum())
    groups = ExpertGroups(counts)
    q = NF4Weight((e, i, h), dtype=torch.bfloat16, device="cuda").quantize_(
        torch.randn(e, i, h, device="cuda", dtype=torch.bfloat16) * 0.05)
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = frozen_expert_matmul(x, q, groups)
    ref = _apply(x.detach().float(), q, groups, transpose=True)  # fp32 per-expert loop
    assert rel(y, ref) < 1e-2
    g = torch.randn_like(y)
    y.backward(g)
    ref_gx = _apply(g.float(), q, groups, transpose=False)
    assert rel(x.grad, ref_gx) < 1e-2

    a = torch.randn(e, h, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xx = x.detach().clone().requires_grad_(True)
    out = grouped_matmul(xx, a, groups)
    ref_out = loop_grouped_matmul(xx.detach().float(), a.detach().float(), counts.tolist())
    assert rel(out, ref_out) < 1e-2
    out.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    assert a.grad[1].abs().sum() == 0 and a.grad[6].abs().sum() == 0  # experts with no tokens get no gradient


@pytest.mark.parametrize("expert_matmul", ["dequant", "fused"])
def test_tiny_model_on_cuda_matches_cpu_and_trains(tmp_path, monkeypatch, expert_matmul):
    if expert_matmul == "fused":
        pytest.importorskip("triton")
    _engine(monkeypatch, expert_matmul=expert_matmul)
    import moefit
    import moefit.moe.grouped as grouped
    from moefit.lora import add_lora
    from tests.test_engine_parity import CONFIGS, tiny_config, write_checkpoint

    cfg = tiny_config(**CONFIGS["top2-8e-norope"])
    write_checkpoint(tmp_path, cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    cpu = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32)
    gpu32 = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32, device="cuda")
    gpu = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert rel(gpu32(ids.cuda()).logits, cpu(ids).logits) < 2e-3  # same NF4 bytes; GPU fp32 reduction order
        # One MoE block, same routing: grouped kernel vs the per-expert loop (whole-model logits would also
        # differ where bf16 rounding flips a near-tied top-k choice in a later layer).
        block = gpu.hf.model.layers[0].feed_forward
        hidden = torch.randn(2, 64, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        fast, _ = block(hidden)
        grouped_mm = grouped._GROUPED_MM
        monkeypatch.setattr(grouped, "_GROUPED_MM", None)
        _engine(monkeypatch, expert_matmul="dequant")
        slow, _ = block(hidden)
        monkeypatch.setattr(grouped, "_GROUPED_MM", grouped_mm)
        _engine(monkeypatch, expert_matmul=expert_matmul)
    assert rel(fast, slow) < 1e-2
    params = add_lora(gpu, r=8, alpha=16, dropout=0.0)
    gpu.enable_gradient_checkpointing()
    gpu.train()
    import bitsandbytes as bnb

    opt = bnb.optim.AdamW8bit(list(params.values()), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = gpu(ids.cuda(), labels=ids.cuda()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bench_reports_gpu_busy_fraction():
    from moefit.bench import build_synthetic_model, measure_training
    from moefit.config import LoraConfig

    m = build_synthetic_model("llama4-scout", num_layers=1, lora=LoraConfig(r=8, alpha=16), device="cuda")
    r = measure_training(m, seq_len=256, batch=1, steps=1, warmup=1)
    assert 0 < r["kernel_s"] < 2 * r["step_s"] and 0 < r["gpu_busy_fraction"] < 2
    # the device timeline of the timed step: one span per micro-step and the optimizer's, within the step's wall
    r = measure_training(m, seq_len=256, batch=1, steps=1, warmup=1, grad_accum=3, profile_kernels=False)
    assert len(r["micro_step_s"]) == 3 and all(s > 0 for s in r["micro_step_s"]) and r["optimizer_s"] > 0
    assert sum(r["micro_step_s"]) + r["optimizer_s"] <= 1.05 * r["step_s"]
    # the graphs' pools (engine.layer_graphs, backward_graphs: on by default), what a replay's temporaries hold
    assert r["graph_pool_bytes"] > 0 and 0 <= r["graph_pool_idle_bytes"] <= r["graph_pool_bytes"]


def test_host_embedding_on_cuda_matches_trains_and_generates(tmp_path):
    import moefit
    from moefit.config import QuantConfig
    from tests.test_engine_parity import CONFIGS, tiny_config, write_checkpoint

    cfg = tiny_config(**CONFIGS["top1-4e-norope"])
    write_checkpoint(tmp_path, cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    plain = moefit.load_model(str(tmp_path), dtype=torch.float32, device="cuda")
    hosted = moefit.load_model(str(tmp_path), dtype=torch.float32, device="cuda",
                               quant=QuantConfig(embeddings_on_host=True))
    assert hosted.device.type == "cuda" and hosted.hf.get_input_embeddings().weight.device.type == "cpu"
    assert hosted.input_device.type == "cpu"
    with torch.no_grad():
        logits = hosted(ids, return_logits=True).logits
        assert rel(logits, plain(ids, return_logits=True).logits) < 1e-5
        from_host = hosted(ids.cpu(), return_logits=True).logits  # ids already in host memory: no device sync
        assert from_host.device.type == "cuda" and torch.equal(from_host, logits)
    moefit.add_lora(hosted, r=4, alpha=8, dropout=0.0)
    hosted.enable_gradient_checkpointing()
    hosted.train()
    hosted(ids.cpu(), labels=ids).loss.backward()
    hosted.eval()
    out = hosted.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12) and out.device.type == "cuda"


@pytest.mark.parametrize("window", [None, 128])
def test_fused_sink_attention_matches_eager_on_cuda(window):
    """gpt-oss's sinks through the fused CUDA kernels (bottom-right causal, or the window's mask) against
    transformers' eager attention in fp32: values and gradients."""
    from transformers.models.gpt_oss import modeling_gpt_oss

    from moefit.models.sink_attention import sdpa_with_sinks

    torch.manual_seed(0)
    b, hq, hkv, t, d = 1, 8, 2, 512, 64
    q0, k0, v0 = (torch.randn(b, h, t, d, device="cuda") for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, device="cuda")
    module = torch.nn.Module()
    module.num_key_value_groups, module.sinks = hq // hkv, torch.nn.Parameter(sinks, requires_grad=False)
    pos = torch.arange(t, device="cuda")
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    additive = torch.zeros(t, t, device="cuda").masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    results = []
    for impl, dtype in (("eager", torch.float32), ("fused", torch.bfloat16)):
        q, k, v = (x.detach().to(dtype).clone().requires_grad_(True) for x in (q0, k0, v0))
        if impl == "eager":
            out, _ = modeling_gpt_oss.eager_attention_forward(module, q, k, v, additive, scaling=d ** -0.5,
                                                              dropout=0.0, sliding_window=window)
        else:
            mask = None if window is None else allowed[None, None]
            out, _ = sdpa_with_sinks(module, q, k, v, mask, scaling=d ** -0.5, sliding_window=window,
                                     s_aux=module.sinks.to(dtype))
        out.float().square().sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for got, want in zip(results[1], results[0], strict=True):
        assert rel(got, want) < 2e-2


@pytest.mark.parametrize("k, m", [(64, 4), (4, 64), (12, 20)])
def test_grouped_matmul_pads_unaligned_widths_for_the_grouped_kernel(k, m):
    """A LoRA rank of 4 (Qwen3-30B-A3B's expert rank on a 24 GB GPU) stays on the grouped kernel: equal to the
    per-expert loop, forward and backward."""
    from moefit.moe.grouped import ExpertGroups, grouped_matmul, loop_grouped_matmul

    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 17, 9], device="cuda")
    x0 = torch.randn(int(counts.sum()), k, device="cuda", dtype=torch.bfloat16)
    w0 = torch.randn(4, k, m, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (lambda x, w: grouped_matmul(x, w, ExpertGroups(counts)),
               lambda x, w: loop_grouped_matmul(x, w, counts.tolist())):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = fn(x, w)
        y.float().square().sum().backward()
        outs.append((y, x.grad, w.grad))
    for got, want in zip(*outs, strict=True):
        assert got.shape == want.shape
        assert rel(got, want) < 1e-2


@pytest.mark.parametrize("r", [4, 16])
def test_grouped_lora_node_equals_composed_grouped_matmuls_on_cuda(r):
    """The routed experts' LoRA as one autograd node (_GroupedLoRA) runs the same grouped GEMMs as the two
    composed _GroupedMM with casts, pads and slices it replaced: bit-identical, gradients included."""
    from moefit.moe.grouped import ExpertGroups, grouped_lora, grouped_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    groups = ExpertGroups(torch.tensor([40, 0, 150, 70, 2, 0], device="cuda"))
    x0 = torch.randn(262, 256, device="cuda", generator=gen).bfloat16()
    a0 = torch.randn(6, 256, r, device="cuda", generator=gen)
    b0 = torch.randn(6, r, 512, device="cuda", generator=gen)
    grad = torch.randn(262, 512, device="cuda", generator=gen).bfloat16()
    outs = []
    for fused in (True, False):
        x, a, b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
        if fused:
            y = grouped_lora(x, a, b, 2.0, groups)
            assert type(y.grad_fn).__name__ == "_GroupedLoRABackward"
        else:
            y = grouped_matmul(grouped_matmul(x, a.to(x.dtype), groups) * 2.0, b.to(x.dtype), groups)
        y.backward(grad)
        outs.append((y.detach(), x.grad, a.grad, b.grad))
    for got, want in zip(*outs, strict=True):
        assert torch.equal(got, want)


def test_bench_memory_limit_and_auto_layout_on_plain_cuda_device():
    """`moefit bench --layout auto --memory-limit-gib N` with device "cuda" (no index): the allocator's limit is
    set on the current GPU (torch refuses a bare "cuda") and the chosen layout is reported."""
    from moefit.bench.run import bench

    results = bench(model="llama4-scout", layers=1, seq_lens=[256], batch=1, grad_accum=2, rank=8, steps=1,
                    warmup=1, device="cuda", layout="auto", memory_limit_bytes=40 * 2**30)
    assert results["runs"][0]["tokens_per_s"] > 0
    assert results["layout"]["why"]


def test_fused_rms_norm_is_one_kernel_each_way_on_cuda_and_close_to_transformers():
    """engine.rms_norm: fused pays only if torch runs F.rms_norm as its fused CUDA kernel (one op forward, one
    backward); values within bf16 rounding of transformers' norm (the squares are summed in another order)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    from moefit.models.rms_norm import FusedRMSNorm, form_of

    ref = Qwen3MoeRMSNorm(2048, eps=1e-6).to("cuda", torch.bfloat16)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.1)
    fused = FusedRMSNorm(ref.weight, 1e-6, form_of(ref))
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    class Count(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten.detach, torch.ops.aten._unsafe_view):
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    counter = Count()
    with counter:
        y = fused(x)
    forward_ops = list(counter.ops)
    g = torch.randn_like(y)
    counter.ops.clear()
    with counter:
        (gx,) = torch.autograd.grad(y, x, g)
    # the weight multiply (a separate bf16 op, as transformers does it) and its backward are allowed besides
    assert len(forward_ops) <= 2 and any("rms_norm" in o for o in forward_ops), forward_ops
    assert len(counter.ops) <= 4 and any("rms_norm" in o for o in counter.ops), counter.ops
    want = ref(x)
    (gwant,) = torch.autograd.grad(want, x, g)
    assert (y.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max()
    assert (gx.float() - gwant.float()).norm() <= 1e-2 * gwant.float().norm()


def test_loss_over_labels_in_host_memory_never_syncs_the_host():
    """Labels in host memory (as the trainer and moefit bench pass them): selecting the label positions, the
    chunked loss and its backward queue their work without a device sync (torch's sync debug mode raises on
    one); the same loss as the labels on the GPU (a boolean mask, which syncs)."""
    from moefit.labels import IGNORE_INDEX
    from moefit.models.causal_lm import label_rows
    from moefit.models.loss import chunked_cross_entropy_sum

    torch.manual_seed(0)
    hidden = torch.randn(2, 700, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda")
    labels = torch.randint(0, 1000, (2, 700))
    labels[0, :100] = IGNORE_INDEX
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows, y = label_rows(labels, hidden.device)
        loss = chunked_cross_entropy_sum(hidden.reshape(-1, 64).index_select(0, rows), weight, y, 256)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows_gpu, y_gpu = label_rows(labels.cuda(), hidden.device)
    assert torch.equal(rows, rows_gpu) and torch.equal(y, y_gpu)
    want = chunked_cross_entropy_sum(hidden.detach().reshape(-1, 64)[rows_gpu], weight, y_gpu, 256)
    assert torch.equal(loss.detach(), want)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("case", ["llama4-top2-4e-rope", "qwen3_moe", "gpt_oss"])
def test_packed_micro_step_with_host_positions_and_labels_never_syncs_the_host(tmp_path, monkeypatch, case, graphs):
    """A training micro-step as the trainer runs it (packed rows; labels and position ids in host memory; NF4
    experts; LoRA; checkpointing; the first passes eager or replayed): forward and backward queue their work
    without a single device sync (torch's sync debug mode raises on one), after one warm-up step (the decoder's
    launch shapes are tuned once, the graphs captured)."""
    import dataclasses

    import moefit
    from moefit import engine_switches
    from moefit.lora import add_lora
    from tests.families import CASES, write_checkpoint

    monkeypatch.setattr(engine_switches, "_current",
                        dataclasses.replace(engine_switches.current(), layer_graphs=graphs))
    write_checkpoint(tmp_path, CASES[case])
    model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.bfloat16, device="cuda")
    add_lora(model, r=8, alpha=16, dropout=0.0)
    model.enable_gradient_checkpointing()
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.stack([torch.arange(64), torch.cat([torch.arange(20), torch.arange(44)])])
    labels = ids.clone()
    labels[1, 20] = -100  # the first token of the second sample carries no loss
    ids = ids.cuda()
    for debug in ("default", "error"):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(debug)
        try:
            out = model(ids, labels=labels, position_ids=positions)
            out.loss_sum.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss_sum).item()
    assert (model.layer_graphs is not None and model.layer_graphs.stats()["replayed"] > 0) == graphs


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("case", ["llama4-top1-4e-norope", "qwen3_moe", "gpt_oss"])
def test_layer_graphs_replay_the_first_pass_with_eager_losses_and_gradients(tmp_path, monkeypatch, case, backward):
    """engine.layer_graphs on CUDA: four packed / unpacked NF4 + LoRA micro-steps with dropout, each layer's first
    pass captured once per mask shape and replayed: the same losses as eager (bit for bit where the eager forward
    is deterministic: top-1 or two experts summed into zeros; gpt-oss sums four with atomics) and the same LoRA
    gradients up to the backward's atomics; a replayed micro-step queues its work without a device sync.
    `backward` (engine.backward_graphs): the recomputation and backward replayed too, from each mask shape's
    second micro-step on (the dropout masks must be the first pass's for the gradients to match)."""
    import dataclasses

    import moefit
    from moefit import engine_switches
    from moefit.lora import add_lora
    from moefit.models.layer_graphs import LayerGraphs
    from tests.families import CASES, write_checkpoint

    # the eager run must not get the graphs from the default engine.layer_graphs
    monkeypatch.setattr(engine_switches, "_current",
                        dataclasses.replace(engine_switches.current(), layer_graphs=False))
    write_checkpoint(tmp_path, CASES[case])
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 200, (2, 64), generator=gen) for _ in range(3)]
    packed = torch.stack([torch.arange(64), torch.cat([torch.arange(20), torch.arange(44)])])
    runs = {}
    for graphs in (False, True):
        model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.bfloat16, device="cuda")
        add_lora(model, r=8, alpha=16, dropout=0.1)
        init = torch.Generator().manual_seed(1)  # B != 0: the LoRA paths (and their dropout) reach the loss
        with torch.no_grad():
            for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
                p.copy_(0.05 * torch.randn(p.shape, generator=init))
        model.enable_gradient_checkpointing(keep_routed_gate_up=True)
        assert model.layer_graphs is None
        if graphs:
            model.use_layer_graphs(LayerGraphs(backward=backward))
        model.train()
        losses = []
        for i, positions in enumerate([None, packed, None, packed]):
            torch.manual_seed(10 + i)
            x = ids[i % 3].cuda()
            if graphs and i == 3:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = model(x, labels=ids[i % 3], position_ids=positions)
                out.loss_sum.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            losses.append(out.loss_sum.detach().float())
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        runs[graphs] = (torch.stack(losses), grads, model.layer_graphs)
    (plain, plain_grads, _), (losses, grads, layer_graphs) = runs[False], runs[True]
    if case == "gpt_oss":
        assert rel(losses, plain) < 1e-3, (plain, losses)
    else:
        assert torch.equal(losses, plain), (plain, losses)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert (g - plain_grads[name]).norm() <= 2e-2 * plain_grads[name].norm() + 1e-6, name
    stats = layer_graphs.stats()
    layers = model.config.num_hidden_layers
    assert stats["replayed"] == 4 * layers and stats["graphs"] == 2 * layers and not stats["eager"], stats
    if backward:
        assert stats["backward"] == {"replayed": 2 * layers, "eager": {}, "disabled": None}, stats


def test_a_failed_capture_leaves_eager_dropout_working():
    """A capture that fails (here a host sync inside it) must not leave the random-number generator marked as
    capturing: the eager recomputation that then runs draws dropout masks from it (engine.layer_graphs falls
    back to eager; without the reset every later draw raised "Offset increment outside graph capture")."""
    from moefit.models.layer_graphs import _capturing

    x = torch.ones(4096, device="cuda")
    with pytest.raises(Exception):  # noqa: B017 - CUDA reports the broken capture as one of several errors
        with _capturing(torch.cuda.CUDAGraph(), None, torch.cuda.Stream()):
            torch.nn.functional.dropout(x, 0.5)  # a draw inside the capture: the generator is registered
            x.sum().item()  # a host sync: not allowed during a capture
    y = torch.nn.functional.dropout(x, 0.5)
    assert 0 < int((y == 0).sum()) < 4096


@pytest.mark.parametrize("case", ["llama4-top1-4e-norope", "gpt_oss"])
def test_offloaded_checkpoints_on_cuda_hold_less_and_give_the_same_gradients(tmp_path, monkeypatch, case):
    """train.offload_checkpoints on CUDA: three NF4 + LoRA micro-steps with dropout (one packed), each layer's input
    copied to pinned host memory on a side stream and back one layer ahead of the backward: the same losses and
    LoRA gradients as torch's checkpoint (up to the backward's atomics), a micro-step without a device sync, and
    the saved inputs' bytes off the peak (long rows: they are most of it)."""
    import moefit
    from moefit.lora import add_lora
    from tests.families import CASES, write_checkpoint

    _engine(monkeypatch, layer_graphs=False)
    layers = {"llama4-top1-4e-norope": dict(no_rope_layers=[1, 1, 0] * 2), "gpt_oss": {}}[case]
    write_checkpoint(tmp_path, CASES[case], num_hidden_layers=6, **layers)
    gen = torch.Generator().manual_seed(0)
    seq = 2048
    ids = [torch.randint(3, 200, (2, seq), generator=gen) for _ in range(3)]
    packed = torch.stack([torch.arange(seq), torch.cat([torch.arange(700), torch.arange(seq - 700)])])
    runs = {}
    for offloaded in (False, True):
        model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.bfloat16, device="cuda")
        add_lora(model, r=8, alpha=16, dropout=0.1)
        init = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
                p.copy_(0.05 * torch.randn(p.shape, generator=init))
        model.enable_gradient_checkpointing(offload_checkpoints=offloaded)
        model.train()
        losses = []
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i, positions in enumerate([None, packed, None]):
            torch.manual_seed(10 + i)
            x = ids[i].cuda()
            if i == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = model(x, labels=ids[i], position_ids=positions)
                out.loss_sum.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            losses.append(out.loss_sum.detach().float())
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        runs[offloaded] = (torch.stack(losses), grads, peak, model)
    (plain, plain_grads, plain_peak, _), (losses, grads, peak, model) = runs[False], runs[True]
    assert rel(losses, plain) < 1e-3, (plain, losses)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert (g - plain_grads[name]).norm() <= 2e-2 * plain_grads[name].norm() + 1e-6, name
    layer_input = 2 * seq * model.config.hidden_size * 2  # bf16 [2, seq, hidden]
    assert model.host_checkpoints.peak_saved_bytes == 6 * layer_input
    assert plain_peak - peak >= 3 * layer_input, (plain_peak, peak)

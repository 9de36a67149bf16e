"""quantization.fp32_linear_scales: the linears' NF4 block scales decoded from the double quantization once, at
load, and kept in fp32 (one decode kernel per pass instead of three): the same weights bit for bit, the same
training, and the planner counts the extra bytes."""

from __future__ import annotations

import pytest
import torch

import moefit
from moefit.config import QuantConfig
from moefit.lora import add_lora
from moefit.models.layers import MoefitLinear
from moefit.moe.experts import MoefitExperts
from moefit.plan import plan
from moefit.plan.memory import nf4_bytes
from moefit.quant.nf4 import NF4Weight


@pytest.mark.parametrize("shape", [(256, 512), (3, 128, 96), (100, 70)])
def test_decodes_the_double_quantized_values_in_one_call(shape):
    w = torch.randn(shape, dtype=torch.bfloat16)
    dq = NF4Weight(shape).quantize_(w)
    fp = NF4Weight(shape, scales_fp32=True).quantize_(w)
    assert torch.equal(dq.dequantize(), fp.dequantize())
    assert fp.absmax.dtype == torch.float32 and not hasattr(fp, "absmax2")
    if len(shape) == 2:
        _, consts = nf4_bytes(w.numel(), 1, QuantConfig(fp32_linear_scales=True), linear=True)
        held = sum(b.numel() * b.element_size() for n, b in fp.named_buffers() if n != "packed")
        assert held <= consts <= held + 512 * 3  # the planner rounds each buffer to 512 B


def _train_step(quant: QuantConfig):
    model = moefit.load_model("tiny", quantization="nf4", dtype=torch.float32, quant=quant)
    params = add_lora(model, r=4, alpha=8, dropout=0.0, expert_r=2)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids, return_logits=True)
    out.loss.backward()
    return model, out.logits.detach(), {n: p.grad for n, p in params.items()}


def test_same_training_as_double_quant_and_only_the_linears_change():
    base, logits, grads = _train_step(QuantConfig())
    fp, logits_fp, grads_fp = _train_step(QuantConfig(fp32_linear_scales=True))
    linears = [m.qweight for m in fp.modules() if isinstance(m, MoefitLinear) and isinstance(m.qweight, NF4Weight)]
    experts = [m.gate for m in fp.modules() if isinstance(m, MoefitExperts)]
    assert linears and all(w.scales_fp32 for w in linears)
    assert experts and not any(w.scales_fp32 for w in experts)  # the routed experts stay double-quantized
    assert torch.equal(logits, logits_fp)
    for n in grads:
        assert torch.equal(grads[n], grads_fp[n]), n


def test_the_planner_counts_the_fp32_scales_of_the_linears_only():
    kw = dict(model="llama3.1-8b", seq_len=2048, gpus=["h200"], search=False)
    lean, scales = moefit.config.RunConfig(), moefit.config.RunConfig()
    lean.quantization.fp32_linear_scales, scales.quantization.fp32_linear_scales = False, True
    a = plan(lean, **kw)
    b = plan(scales, **kw)
    extra = b.memory.by_key()["quant_constants"] - a.memory.by_key()["quant_constants"]
    params = 6.98e9  # Llama 3.1 8B's quantized linears (all but the embeddings and lm_head)
    assert extra == pytest.approx(params * (4 - 1 - 4 / 256) / 64, rel=0.02)  # fp32 per block vs u8 + fp32 / 256
    scout = dict(model="llama4-scout", seq_len=2048, gpus=["h200"], search=False)
    c = plan(lean, **scout)
    d = plan(scales, **scout)
    assert 0 < d.memory.total - c.memory.total < 0.5 * 2**30  # 9 B linear params; the routed experts (100 B) not


def test_plan_offers_the_double_quantized_scales_when_they_decide_the_fit():
    """fp32 scales cost 0.35 GiB on Scout: on a GPU they overflow by less than that, the refusal names
    quantization.fp32_linear_scales false, and the run fits with it."""
    scout = dict(model="llama4-scout", seq_len=2048, gpus=["h200"], search=False)
    lean, scales = moefit.config.RunConfig(), moefit.config.RunConfig()
    lean.quantization.fp32_linear_scales, scales.quantization.fp32_linear_scales = False, True
    need_lean, need = plan(lean, **scout).memory.needed, plan(scales, **scout).memory.needed
    assert need - need_lean > 0.2 * 2**30
    from moefit.plan import check_fits

    cfg = moefit.config.RunConfig(model="llama4-scout")
    cfg.train.max_length = 2048
    cfg.quantization.fp32_linear_scales = True
    p = check_fits(cfg, gpu="h200", gpu_memory_bytes=(need + need_lean) // 2)
    assert not p.fits and "quantization.fp32_linear_scales false fits" in p.suggestion
    cfg.quantization.fp32_linear_scales = False
    assert check_fits(cfg, gpu="h200", gpu_memory_bytes=(need + need_lean) // 2).fits

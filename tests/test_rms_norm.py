"""engine.rms_norm: fused replaces transformers' RMS norms by F.rms_norm in the form each family computes, with the
same logits and LoRA gradients (bit for bit on the CPU, in bf16 and fp32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moefit
from moefit.config import EngineConfig
from moefit.lora import add_lora
from moefit.models.rms_norm import FusedRMSNorm, form_of, replace_rms_norms
from tests.families import CASES, FAMILY_CASES, randomize_lora, write_checkpoint

EXPECTED_FORM = {"gpt_oss": "weight_before_cast"}  # the others cast, then multiply by the weight


def _run(path, rms_norm: str, dtype: torch.dtype):
    model = moefit.load_model(str(path), quantization="nf4", dtype=dtype, engine=EngineConfig(rms_norm=rms_norm))
    params = add_lora(model, r=4, alpha=8, dropout=0.0, expert_r=2)
    randomize_lora(model)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, return_logits=True)
    out.loss.backward()
    return model, out.logits.detach(), {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_fused_norms_give_the_same_logits_and_gradients(tmp_path, case, dtype):
    write_checkpoint(tmp_path, CASES[case])
    try:
        plain, logits, grads = _run(tmp_path, "transformers", dtype)
        fused, logits_f, grads_f = _run(tmp_path, "fused", dtype)
    finally:
        moefit.engine_switches.use(EngineConfig())
    norms = [m for m in fused.modules() if isinstance(m, FusedRMSNorm)]
    left = [type(m).__name__ for m in fused.modules() if type(m).__name__.endswith(("RMSNorm", "L2Norm"))
            and not isinstance(m, FusedRMSNorm)]
    assert norms and not left, left
    assert not any(isinstance(m, FusedRMSNorm) for m in plain.modules())
    want = EXPECTED_FORM.get(CASES[case].config().model_type, "weight_after_cast")
    assert {m.form for m in norms if m.weight is not None} == {want}
    assert torch.equal(logits, logits_f)
    for n in grads:
        assert torch.equal(grads[n], grads_f[n]), n


def test_llama4_qk_norm_has_no_weight():
    from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm

    assert form_of(Llama4TextL2Norm(1e-5)) == "no_weight"


class _OnePlusWeightRMSNorm(nn.Module):
    """Gemma's form, y = x_hat * (1 + w): no form of F.rms_norm with this weight reproduces it."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.eps = 1e-6

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())).to(x.dtype)


def test_a_norm_it_cannot_reproduce_is_kept_and_said():
    model = nn.Sequential(_OnePlusWeightRMSNorm(32))
    said = []
    assert replace_rms_norms(model, said.append) == 0
    assert isinstance(model[0], _OnePlusWeightRMSNorm) and "kept" in said[0]

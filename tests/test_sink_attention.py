"""gpt-oss attention with sinks through fused SDPA equals transformers' eager implementation, values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gpt_oss import modeling_gpt_oss

from moefit.models.sink_attention import sdpa_with_sinks


class _Module(torch.nn.Module):
    def __init__(self, heads: int, kv_heads: int, sinks: torch.Tensor):
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        self.sinks = torch.nn.Parameter(sinks)
        self.training = False


def _eager_mask(t: int, window: int | None, pad: int) -> torch.Tensor:
    """Additive mask [B=2, 1, T, T] as transformers' eager path gets it: causal, optional window, and the second
    sequence's last `pad` keys masked (right padding)."""
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None, None].repeat(2, 1, 1, 1)
    if pad:
        allowed[1, :, :, t - pad:] = False
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min), allowed


@pytest.mark.parametrize("window, pad, mask_form", [(None, 0, "none"), (5, 0, "none"), (None, 3, "bool"),
                                                    (5, 3, "bool"), (None, 0, "bool")])
def test_sinks_sdpa_equals_eager_values_and_gradients(window, pad, mask_form):
    torch.manual_seed(0)
    b, hq, hkv, t, d = 2, 4, 2, 12, 16
    scale = d ** -0.5
    q0, k0, v0 = (torch.randn(b, h, t, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    sinks = torch.randn(hq, dtype=torch.float64)
    additive, allowed = _eager_mask(t, window, pad)
    outs, grads = [], []
    for impl in ("eager", "sdpa"):
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
        module = _Module(hq, hkv, sinks.clone())
        if impl == "eager":
            out, _ = modeling_gpt_oss.eager_attention_forward(module, q, k, v, additive.double(), scaling=scale,
                                                              dropout=0.0, sliding_window=window)
        else:
            mask = None if mask_form == "none" else allowed
            out, _ = sdpa_with_sinks(module, q, k, v, mask, scaling=scale, sliding_window=window,
                                     s_aux=module.sinks)
        # padded query rows are ignored by the loss; they differ by construction (eager: all keys masked)
        keep = torch.ones(b, t, dtype=torch.bool)
        if pad:
            keep[1, t - pad:] = False
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * w)[keep].sum().backward()
        outs.append(out.detach()[keep])
        grads.append([q.grad, k.grad, v.grad, module.sinks.grad])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_gpt_oss_builds_with_the_fused_sink_attention():
    from moefit.config import QuantConfig
    from moefit.models.build import build_skeleton

    cfg = modeling_gpt_oss.GptOssConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        intermediate_size=16, num_hidden_layers=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=64, sliding_window=4)
    model = build_skeleton(cfg, quant=QuantConfig(weights="none"), dtype=torch.float32, device="cpu")
    assert model.config._attn_implementation == "moefit_fused_sinks"


@pytest.mark.parametrize("case", ["gpt_oss", "qwen3_moe", "mixtral", "glm4_moe"])
def test_packed_samples_have_the_logits_they_have_alone(tmp_path, case):
    """A row of packed samples (positions restarting at 0): each sample's logits are those it has alone, for
    gpt-oss too, whose transformers model builds its masks without the position ids (moefit's sink attention
    keeps the samples apart)."""
    import moefit
    from tests.families import CASES, write_checkpoint

    ref = write_checkpoint(tmp_path, CASES[case])
    model = moefit.load_model(str(tmp_path), quantization="none", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    lengths = (7, 12, 5)  # the 12-token sample is longer than gpt-oss's sliding window of 8
    samples = [torch.randint(3, ref.config.vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=positions, return_logits=True).logits[0]
        off = 0
        for sample in samples:
            alone = model(sample[None], return_logits=True).logits[0]
            assert (alone - packed[off:off + len(sample)]).abs().max().item() < 1e-4, (case, len(sample))
            off += len(sample)


def test_a_graph_capture_neither_reads_nor_keeps_a_cached_packed_mask(monkeypatch):
    """Packed rows' masks are kept per position ids for the layers of a forward; captured into a CUDA graph
    (engine.layer_graphs) a layer must make its mask itself: the graph would read a kept mask at its address after
    the next position ids had cleared the cache (gpt-oss replays read other graphs' temporaries as their mask)."""
    from moefit.models import sink_attention

    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]  # two samples in one row
    kept = sink_attention._with_sample_boundaries(None, positions, 12, 12, 4)
    assert sink_attention._with_sample_boundaries(None, positions, 12, 12, 4) is kept  # eager: the kept one
    monkeypatch.setattr(sink_attention, "in_graph_capture", lambda t: True)
    made = sink_attention._with_sample_boundaries(None, positions, 12, 12, 4)
    assert made is not kept and torch.equal(made, kept)
    full = sink_attention._with_sample_boundaries(None, positions, 12, 12, None)  # another window, made in the graph
    assert not full[0, 0, 11, :5].any() and full[0, 0, 11, 5:].all()
    assert all(mask is not made and mask is not full for _, _, mask in sink_attention._PACKED["masks"])

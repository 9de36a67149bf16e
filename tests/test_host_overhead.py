"""The GPU path's fused autograd nodes on CPU (moefit.moe.grouped.GROUPED_ON_CPU runs torch._grouped_mm there):
the routed experts' LoRA as one node gives what the composed grouped matmuls gave, bit for bit, gradients
included; and benchmarks/host_overhead.py counts a layer's host work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import moefit.moe.grouped as grouped
from moefit.moe.grouped import ExpertGroups, grouped_lora, grouped_matmul

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    monkeypatch.setattr(grouped, "GROUPED_ON_CPU", True)


@pytest.mark.parametrize("r,scale", [(4, 2.0), (16, 2.0), (4, 1.5)])  # 2.0 is folded into B, 1.5 is not
def test_grouped_lora_node_equals_the_composed_grouped_matmuls(grouped_on_cpu, r, scale):
    gen = torch.Generator().manual_seed(0)
    experts, rows, width, out = 6, 50, 32, 24
    groups = ExpertGroups(torch.tensor([10, 0, 15, 5, 20, 0]))  # two experts without a row
    x = torch.randn(rows, width, generator=gen).bfloat16().requires_grad_(True)
    a = torch.randn(experts, width, r, generator=gen).requires_grad_(True)
    b = torch.randn(experts, r, out, generator=gen).requires_grad_(True)
    grad = torch.randn(rows, out, generator=gen).bfloat16()

    def run(fused: bool):
        for t in (x, a, b):
            t.grad = None
        if fused:
            y = grouped_lora(x, a, b, scale, groups)
            assert type(y.grad_fn).__name__ == "_GroupedLoRABackward"
        else:
            y = grouped_matmul(grouped_matmul(x, a.to(x.dtype), groups) * scale, b.to(x.dtype), groups)
        y.backward(grad)
        return y.detach(), x.grad, a.grad, b.grad

    for got, want in zip(run(True), run(False), strict=True):
        assert torch.equal(got, want)
    assert not run(True)[2][[1, 5]].any()  # experts without rows: exactly zero weight gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [2.0, 1.5])
def test_lora_linear_node_equals_the_composed_ops(dtype, scale):
    """MoefitLinear's one-node LoRA (_LoraLinear) against the ops it replaced (frozen matmul, casts, F.linear, the
    scaling on the rank-r activation, addmm): the same bits, gradients included."""
    from moefit.models.layers import MoefitLinear
    from moefit.moe.grouped import frozen_linear

    gen = torch.Generator().manual_seed(0)
    layer = MoefitLinear(64, 32, quantization="nf4", dtype=dtype)
    layer.load_weight(torch.randn(32, 64, generator=gen))
    layer.add_lora(8, 8 * scale, 0.0, torch.float32, gen)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    x0 = torch.randn(2, 5, 64, generator=gen).to(dtype)
    grad = torch.randn(2, 5, 32, generator=gen).to(dtype)

    def run(fused: bool):
        x = x0.clone().requires_grad_(True)
        for p in (layer.lora_A, layer.lora_B):
            p.grad = None
        if fused:
            y = layer(x)
        else:
            h = torch.nn.functional.linear(x, layer.lora_A.to(dtype)) * scale
            y = torch.addmm(frozen_linear(x, layer.qweight).reshape(-1, 32), h.reshape(-1, 8),
                            layer.lora_B.to(dtype).t()).view(2, 5, 32)
        y.backward(grad)
        return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad

    for got, want in zip(run(True), run(False), strict=True):
        assert torch.equal(got, want)


def test_groups_from_sorted_experts_match_counted_ones():
    row_expert = torch.tensor([0, 0, 2, 2, 2, 5])
    groups = ExpertGroups.from_sorted(row_expert, 7)
    counted = ExpertGroups(torch.tensor([2, 0, 3, 0, 0, 1, 0]))
    assert torch.equal(groups.offs, counted.offs) and groups.offs.dtype == torch.int32
    assert torch.equal(groups.counts, counted.counts) and groups.sizes == [2, 0, 3, 0, 0, 1, 0]
    assert groups.empty.flatten().tolist() == [False, True, False, True, True, False, True]


def test_host_overhead_counts_a_layers_work(tmp_path):
    spec = importlib.util.spec_from_file_location("host_overhead", ROOT / "benchmarks" / "host_overhead.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "r.json"
    assert tool.main(["--families", "mixtral", "--layers", "2", "--seq-len", "32", "--steps", "1",
                           "--json", str(out)]) == 0
    res = json.loads(out.read_text())["families"]["mixtral"]
    assert res["layers_measured"] == [1]
    fwd, bwd = res["passes"]["forward"], res["passes"]["backward"]
    assert fwd["ops"] > 50 and fwd["autograd_nodes"] > 0 and fwd["saved_tensors"] > 0 and bwd["ops"] > 50
    assert fwd["ops_by_category"]["experts.lora"] > 0 and bwd["ops_by_category"]["experts.lora"] > 0
    assert all(res["passes"][p]["host_ms"] > 0 for p in ("forward", "recompute", "backward"))
    assert not grouped.GROUPED_ON_CPU  # put back

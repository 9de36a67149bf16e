"""Expert parallelism on CPU: 2 processes (torchrun, gloo), each holding half of every MoE layer's routed experts,
against one process holding all of them. Logits and LoRA gradients equal within 1e-5 (fp32) for top-1 and top-2
routing, interleaved dense/MoE layers, and a batch from which some experts get no row at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ep_worker import reference  # noqa: E402

from moefit.parallel.expert_parallel import ExpertShard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "top1": {"top_k": 1},
    "top2-interleaved": {"top_k": 2, "layers": 4, "moe_layers": [1, 3]},
    "top1-rank-without-rows-for-some-experts": {"top_k": 1, "uniform_rank": 1},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_equals_one_process(name, tmp_path):
    case = CASES[name]
    (tmp_path / "case.json").write_text(json.dumps(case))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "ep_worker.py"), str(tmp_path / "case.json"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref_logits, ref_grads = reference(case, tmp_path / "ref", 2)
    experts_seen = 0
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert rel(got["logits"], ref_logits[rank]) < 1e-5
        start, local = got["start"], got["local"]
        for n, g in got["grads"].items():
            want = ref_grads[n]
            if ".experts." in n:
                want = want[start:start + local]
                experts_seen += 1
            assert g.shape == want.shape, n
            assert rel(g, want) < 1e-5 or (want.abs().max() == 0 and g.abs().max() == 0), n
    assert experts_seen > 0
    if "uniform_rank" in case:  # that rank sent no row at all to some experts (of both ranks) in the last layer
        counts = torch.load(tmp_path / f"rank{case['uniform_rank']}.pt")["counts"]
        assert (counts == 0).sum() >= case.get("experts", 4) - case["top_k"]


def test_the_expert_parallel_size_must_divide_the_experts():
    with pytest.raises(ValueError, match="divide the number of experts"):
        ExpertShard(0, 3, 16)
    s = ExpertShard(1, 4, 16)
    assert (s.start, s.local) == (4, 4)

"""Expert parallelism on CPU: 2 processes (torchrun, gloo), each holding half of every MoE layer's routed experts,
against one process holding all of them. Logits and LoRA gradients equal within 1e-5 (fp32) for top-1 and top-2
routing, interleaved dense/MoE layers, and a batch from which some experts get no row at all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ep_worker import reference  # noqa: E402

from moefit.parallel.expert_parallel import ExpertShard  # noqa: E402
from tests.test_data_parallel import _env  # noqa: E402  (the 2-process tests' environment)

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "top1": {"top_k": 1},
    "top2-interleaved": {"top_k": 2, "layers": 4, "moe_layers": [1, 3]},
    "top1-rank-without-rows-for-some-experts": {"top_k": 1, "uniform_rank": 1},
    "top2-checkpointed-kept-gate-up": {"top_k": 2, "checkpointing": True, "keep": True},
    # the layers' saved inputs offloaded (train.offload_checkpoints): the recomputation in the backward exchanges rows
    # with the other rank again, in the same order on both
    "top2-checkpointed-offloaded": {"top_k": 2, "checkpointing": True, "offload": True},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_equals_one_process(name, tmp_path):
    case = CASES[name]
    (tmp_path / "case.json").write_text(json.dumps(case))
    env = _env()
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
    # One count exchange (a host sync) per MoE layer of the forward and backward: a checkpointed layer's
    # recomputation takes its first pass's.
    moe_layers = len(case.get("moe_layers", range(case.get("layers", 4))))
    assert [torch.load(tmp_path / f"rank{r}.pt")["exchanges"] for r in range(2)] == [moe_layers] * 2
    if "uniform_rank" in case:  # that rank sent no row at all to some experts (of both ranks) in the last layer
        counts = torch.load(tmp_path / f"rank{case['uniform_rank']}.pt")["counts"]
        assert (counts == 0).sum() >= case.get("experts", 4) - case["top_k"]


def test_the_expert_parallel_size_must_divide_the_experts():
    with pytest.raises(ValueError, match="divide the number of experts"):
        ExpertShard(0, 3, 16)
    s = ExpertShard(1, 4, 16)
    assert (s.start, s.local) == (4, 4)


@pytest.mark.parametrize("family", ["llama4-top1-4e-interleaved", "qwen3_moe", "gpt_oss", "glm4_moe"])
def test_loading_a_slice_reads_only_its_experts(family, tmp_path, monkeypatch):
    """load_model(expert_shard=...) reads half the expert bytes from the checkpoint, holds experts
    [start, start + local) with the values of a whole load, names them globally, and its LoRA init equals the whole
    model's for those experts."""
    import moefit
    from moefit import safetensors_io
    from moefit.lora import add_lora, lora_parameters
    from moefit.moe.experts import MoefitExperts
    from tests.families import CASES, write_checkpoint

    case = CASES[family]
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, case)
    expert_bytes = [0]
    plain_read = safetensors_io.SafetensorsFile.read

    def counting_read(self, key, index=None):
        t = plain_read(self, key, index)
        if ".experts." in key or key.endswith(".experts"):
            expert_bytes[0] += t.numel() * t.element_size()
        return t

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read", counting_read)
    whole = moefit.load_model(str(ckpt), quantization="none", dtype=torch.float32)
    whole_bytes, expert_bytes[0] = expert_bytes[0], 0
    total = next(m for m in whole.modules() if isinstance(m, MoefitExperts)).num_experts
    shard = ExpertShard(1, 2, total)
    part = moefit.load_model(str(ckpt), quantization="none", dtype=torch.float32, expert_shard=shard)
    assert whole_bytes > 0 and expert_bytes[0] == whole_bytes // 2
    pairs = [(a, b) for a, b in zip(whole.modules(), part.modules(), strict=True) if isinstance(a, MoefitExperts)]
    assert pairs
    for a, b in pairs:
        assert (b.num_experts, b.expert_offset, b.total_experts) == (shard.local, shard.start, total)
        for proj in ("gate", "up", "down"):
            assert torch.equal(getattr(b, proj).dequantize(), getattr(a, proj).dequantize()[shard.start:][:shard.local])
    add_lora(whole, r=4, alpha=8, dropout=0.0)
    add_lora(part, r=4, alpha=8, dropout=0.0)
    pw, pp = lora_parameters(whole), lora_parameters(part)
    assert pw.keys() == pp.keys()
    for name in pw:
        want = pw[name][shard.start:shard.start + shard.local] if ".experts." in name else pw[name]
        assert torch.equal(pp[name], want), name


# ------------------------------------------------------------------------------------ training expert-parallel

SETTINGS = {"train.max_length": 128, "train.max_steps": 4, "train.eval_every": 2, "train.eval_batches": 3,
            "train.save_every": 2, "train.keep_checkpoints": 3, "train.lr": 5e-3, "train.warmup_steps": 1,
            "train.precision": "fp32", "train.optimizer": "adamw", "lora.r": 4, "lora.alpha": 8,
            "lora.dropout": 0.0, "data.eval_fraction": 0.0}


def _torchrun(nproc: int, **kwargs) -> None:
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "tests" / "dp_worker.py"), json.dumps(kwargs, default=str)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _evals(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in recs if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    """The tiny Llama 4 MoE (4 experts): 1 process x grad_accum 4; 2 processes expert-parallel x grad_accum 2;
    the same stopped after step 3 and resumed."""
    from moefit.train import train

    root = tmp_path_factory.mktemp("ep")
    train(output_dir=root / "one", echo=False, **SETTINGS, **{"train.grad_accum": 4, "train.num_threads": 2})
    ep = {**SETTINGS, "train.grad_accum": 2, "parallel.expert": 2}
    _torchrun(2, output_dir=str(root / "ep"), **ep)
    _torchrun(2, output_dir=str(root / "cut"), stop_after=3, **ep)
    _torchrun(2, resume=str(root / "cut"))
    return root


def test_expert_parallel_training_matches_one_process(ep_runs):
    from safetensors.torch import load_file

    a, b = _evals(ep_runs / "one"), _evals(ep_runs / "ep")
    assert [s for s, _ in a] == [s for s, _ in b] == [0, 2, 4] and a[0][1] != a[-1][1]
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert abs(la - lb) <= 1e-3 * abs(la), (a, b)
    one, ep = load_file(ep_runs / "one" / "adapter_model.safetensors"), load_file(ep_runs / "ep" /
                                                                                  "adapter_model.safetensors")
    assert one.keys() == ep.keys()  # the adapter holds every expert, as a one-GPU run's does
    for k in one:
        assert one[k].shape == ep[k].shape, k
        torch.testing.assert_close(ep[k], one[k], rtol=1e-3, atol=1e-5)
    report = json.loads((ep_runs / "ep" / "report.json").read_text())
    assert report["expert_parallel"] == 2 and report["world_size"] == 2
    step2 = ep_runs / "ep" / "checkpoints" / "step-2"
    assert (step2 / "optimizer.pt").is_file() and (step2 / "optimizer-rank1.pt").is_file()


def test_expert_parallel_resume_is_bit_identical(ep_runs):
    from safetensors.torch import load_file

    full, resumed = load_file(ep_runs / "ep" / "adapter_model.safetensors"), load_file(
        ep_runs / "cut" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert _evals(ep_runs / "ep") == _evals(ep_runs / "cut")


def test_expert_parallel_needs_enough_processes(tmp_path):
    from moefit.errors import MoefitError
    from moefit.train import train

    with pytest.raises(MoefitError, match="parallel.expert is 2 but this run has 1 process"):
        train(output_dir=tmp_path / "x", echo=False, **SETTINGS, **{"parallel.expert": 2})


def test_bench_measures_expert_parallel_on_two_processes():
    """moefit bench --gpus 2 --expert-parallel 2 (CPU, gloo): each rank builds its half of the experts."""
    env = _env()
    cmd = [sys.executable, "-m", "moefit", "bench", "--model", str(REPO / "moefit" / "assets" / "tiny"), "--device",
           "cpu", "--gpus", "2", "--expert-parallel", "2", "--seq-len", "64", "--steps", "1", "--warmup", "0",
           "--rank", "4", "--optimizer", "adamw", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["world_size"] == 2 and out["expert_parallel"] == 2
    assert out["runs"][0]["tokens_per_s"] > 0 and len(out["runs"][0]["step_s_per_rank"]) == 2


def test_a_bank_larger_than_one_decode_call_is_decoded_in_runs_of_experts(monkeypatch):
    """A Maverick bank (128 x 8192 x 5120 values) is more than bitsandbytes' 32-bit indexing takes in one call."""
    from moefit.quant import nf4

    w = nf4.NF4Weight((6, 64, 32), blocksize=64)
    w.quantize_(torch.randn(6, 64, 32))
    whole = w.dequantize()
    monkeypatch.setattr(nf4, "MAX_DECODE_NUMEL", 2 * 64 * 32 + 1)  # two experts per call
    assert torch.equal(w.dequantize(), whole)
    assert torch.equal(w.dequantize(expert=4), whole[4])


def test_the_dispatch_tells_repeat_interleave_its_size(tmp_path, monkeypatch):
    """On CUDA, repeat_interleave with a tensor of repeats reads their sum back to the host (a sync per MoE layer and
    pass) unless given the output size; the dispatch knows it (the received split sizes) and gives it. One process,
    a gloo group of one: the rows go nowhere and come back."""
    import torch.distributed as dist

    from moefit.moe.block import make_groups
    from moefit.parallel.dist import release_groups_at_shutdown
    from moefit.parallel.expert_parallel import ExpertDispatch

    real, sizes = torch.repeat_interleave, []

    def spy(*args, **kwargs):
        if len(args) > 1 and isinstance(args[1], torch.Tensor):
            sizes.append(kwargs.get("output_size"))
        return real(*args, **kwargs)

    release_groups_at_shutdown()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch, "repeat_interleave", spy)
        dispatch = ExpertDispatch(ExpertShard(0, 1, 4))
        xs = torch.randn(6, 8)
        y = dispatch(lambda x, groups: x * 2, xs, torch.tensor([2, 0, 3, 1]), make_groups)
        assert torch.equal(y, xs * 2) and dispatch.count_exchanges == 1
        assert sizes == [6]
    finally:
        dist.destroy_process_group()

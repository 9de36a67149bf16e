"""`shutdown_distributed` releases every process group: no gloo thread outlives it (two processes, torchrun, gloo).

A group kept alive past destroy_process_group (torch._dynamo imported after the group existed) kept its gloo
threads until interpreter exit, whose teardown now and then aborted a finished rank ("terminate called without an
active exception"): seen twice in CI, in a data-parallel resume and an expert-parallel test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data_parallel import _env  # the 2-process tests' environment: this checkout first, one thread

WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from moefit.parallel import init_distributed, shutdown_distributed

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

ctx = init_distributed("cpu")
import transformers.modeling_utils  # imports torch._dynamo, as building any model does
sub = dist.new_group([0, 1]) if "sub" in sys.argv else None
t = torch.ones(3)
dist.all_reduce(t)
dist.all_reduce(t, group=sub)
del sub
during = threads()
shutdown_distributed()
with open(os.path.join(sys.argv[1], f"rank{ctx.rank}.json"), "w") as f:
    json.dump({"during": during, "after": threads(), "sum": t.tolist()}, f)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
@pytest.mark.parametrize("groups", ["default", "sub"])
def test_shutdown_leaves_no_gloo_thread(groups, tmp_path):
    """With the default group alone, and with a subgroup (as expert parallelism makes) that the worker drops
    before shutting down, as the trainer drops its model."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path), groups]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["sum"] == [4.0, 4.0, 4.0]  # both collectives ran
        assert any("gloo" in name for name in got["during"])  # the probe sees gloo's threads while they exist
        assert not [name for name in got["after"] if "gloo" in name], got["after"]


BENCH_WORKER = """
import json, os, sys
from moefit.bench import bench

res = bench(model=sys.argv[1], seq_lens=[16], batch=1, rank=4, steps=1, warmup=0, device="cpu", optimizer="adamw",
            expert_parallel=2)
names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"gloo": sorted(n for n in names if "gloo" in n), "world_size": res["world_size"],
               "tokens_per_s": res["runs"][0]["tokens_per_s"]}, f)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
def test_expert_parallel_bench_releases_its_groups(tmp_path):
    """`moefit bench --expert-parallel 2` in two gloo processes measures, and returns with its expert group and the
    default group gone."""
    from tests.test_engine_parity import tiny_config

    tiny_config(num_local_experts=4, num_experts_per_tok=1).save_pretrained(tmp_path / "model")
    script = tmp_path / "worker.py"
    script.write_text(BENCH_WORKER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path / "model"), str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["world_size"] == 2 and got["tokens_per_s"] > 0
        assert got["gloo"] == [], got["gloo"]

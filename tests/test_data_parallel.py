"""Data-parallel training on CPU: 2 processes through torchrun with gloo, the tiny Llama 4 MoE in fp32.

The claim under test: 2 processes with grad_accum A train the same optimizer steps as 1 process with 2 x A
(same sequences, same gradient: the loss is averaged over all label tokens of the step across ranks), resume
bit-identically on the same layout and continue on another number of processes; a dead worker ends the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from moefit.parallel.data_parallel import take_step
from moefit.train import train
from moefit.train.progress import progress_line

WORKER = Path(__file__).with_name("dp_worker.py")
REPO = Path(__file__).resolve().parents[1]
# Small and deterministic: fp32, no LoRA dropout, a few steps of short sequences, plain AdamW (its update does not
# amplify float-summation differences the way 8-bit state quantization can).
SETTINGS = {"train.max_length": 128, "train.max_steps": 4, "train.eval_every": 2, "train.eval_batches": 3,
            "train.save_every": 2, "train.keep_checkpoints": 3, "train.lr": 5e-3, "train.warmup_steps": 1,
            "train.precision": "fp32", "train.optimizer": "adamw", "lora.r": 4, "lora.alpha": 8,
            "lora.dropout": 0.0, "data.eval_fraction": 0.0}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(nproc: int, **kwargs) -> None:
    """moefit.train(**kwargs) in `nproc` processes (torchrun --standalone, gloo)."""
    logs = Path(tempfile.mkdtemp(prefix="moefit-torchrun-"))  # each rank's own output, kept for a failure
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--log-dir", str(logs), "--tee", "3", str(WORKER), json.dumps(kwargs, default=str)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    ranks = "".join(f"\n--- {f.relative_to(logs)}:\n{f.read_text(errors='replace')[-2500:]}"
                    for f in sorted(logs.rglob("stderr.log")))
    assert proc.returncode == 0, proc.stderr[-2000:] + ranks
    shutil.rmtree(logs)  # kept only when the run failed


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in recs if r["kind"] == "eval"]


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x grad_accum 4; 2 processes x grad_accum 2 uninterrupted; 2 processes stopped after step 3 and
    resumed on 2; the same stopped run copied and resumed on 1 process."""
    root = tmp_path_factory.mktemp("dp")
    one = train(output_dir=root / "one", echo=False, **SETTINGS, **{"train.grad_accum": 4, "train.num_threads": 2})
    torchrun(2, output_dir=str(root / "two"), **SETTINGS, **{"train.grad_accum": 2})
    torchrun(2, output_dir=str(root / "cut"), stop_after=3, **SETTINGS, **{"train.grad_accum": 2})
    subprocess.run(["cp", "-r", str(root / "cut"), str(root / "cut1")], check=True)
    torchrun(2, resume=str(root / "cut"))
    on_one = train(resume=root / "cut1", echo=False, **{"train.num_threads": 2})
    return root, one, on_one


def test_two_processes_train_the_same_steps_as_one_with_twice_the_accumulation(runs):
    root, one, _ = runs
    a, b = eval_losses(root / "one"), eval_losses(root / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [0, 2, 4]
    assert a[0][1] != a[-1][1]  # the model did change
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert abs(la - lb) <= 1e-3 * abs(la), (a, b)
    report = json.loads((root / "two" / "report.json").read_text())
    assert report["world_size"] == 2 and report["sequences_per_step"] == 4
    assert len(report["peak_mem_bytes_per_rank"]) == 2
    assert report["tokens"] == one.tokens  # the same sequences in the same steps
    train_recs = [json.loads(x) for x in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["peak_mem_bytes_per_rank"]) == 2 for r in train_recs if r["kind"] == "train")


def test_only_rank_zero_writes_and_each_rank_keeps_its_rng(runs):
    root, _, _ = runs
    step2 = root / "two" / "checkpoints" / "step-2"
    assert (step2 / "rng.pt").is_file() and (step2 / "rng-rank1.pt").is_file()
    state = json.loads((step2 / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["sequences_per_step"] == 4
    assert not list((root / "two").glob("*rank1*"))  # no per-rank files outside the checkpoints


def test_resume_on_two_processes_is_bit_identical(runs):
    root, _, _ = runs
    full, resumed = adapter(root / "two"), adapter(root / "cut")
    assert full.keys() == resumed.keys() and full
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert eval_losses(root / "two") == eval_losses(root / "cut")
    for run in ("two", "cut"):  # the report's end loss is the last eval, also after a resume
        report = json.loads((root / run / "report.json").read_text())
        assert report["end_eval_loss"] == eval_losses(root / run)[-1][1]


def test_resume_of_a_two_process_run_on_one_process_keeps_the_sequences_per_step(runs):
    root, _, on_one = runs
    assert on_one.completed and on_one.step == 4
    log = (root / "cut1" / "train.log").read_text()
    assert "train.grad_accum 2 -> 4" in log
    a, b = eval_losses(root / "two"), eval_losses(root / "cut1")
    for (sa, la), (sb, lb) in zip(a, b, strict=True):
        assert sa == sb and abs(la - lb) <= 1e-3 * abs(la), (a, b)
    full, cont = adapter(root / "two"), adapter(root / "cut1")
    for k in full:
        torch.testing.assert_close(cont[k], full[k], rtol=1e-3, atol=1e-5)


def test_a_killed_worker_ends_the_job_with_its_rank_named(tmp_path):
    """kill -9 of rank 1 mid-run: the launcher stops rank 0 and exits 3 within a bounded time, naming rank 1."""
    cmd = [sys.executable, "-m", "moefit", "train", "--gpus", "2", "--output-dir", str(tmp_path / "run"),
           "--set", "train.max_steps=200", "--set", "train.max_length=128", "--set", "train.eval_every=1000",
           "--set", "train.save_every=1000", "--set", "data.eval_fraction=0"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rank1 = None
        deadline = time.time() + 240
        while time.time() < deadline and rank1 is None:  # wait until training has started
            time.sleep(1)
            metrics = tmp_path / "run" / "metrics.jsonl"
            if not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
                continue
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1":
                        rank1 = child
                except psutil.Error:
                    pass
        assert rank1 is not None, "training did not start"
        killed_at = time.time()
        os.kill(rank1.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        took = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-2000:]
    assert f"worker rank 1 (local rank 1, pid {rank1.pid}) was killed by SIGKILL" in err
    assert "Traceback" not in err, err[-3000:]
    assert took < 60, took


def test_each_rank_takes_its_block_of_the_global_stream():
    def stream():
        i = 0
        while True:
            labels = torch.full((1, 5), -100)
            labels[0, : 2 + i % 3] = 1
            yield {"input_ids": torch.full((1, 5), i), "labels": labels}, i + 1
            i += 1

    from moefit.parallel.dist import DistContext

    def count(labels):
        return int((labels[:, 1:] != -100).sum())

    one = take_step(stream(), 4, DistContext(), count)
    r0 = take_step(stream(), 2, DistContext(rank=0, world_size=2), count)
    r1 = take_step(stream(), 2, DistContext(rank=1, world_size=2), count)
    ids = [int(b["input_ids"][0, 0]) for b in one.mine]
    assert ids == [0, 1, 2, 3]
    assert [int(b["input_ids"][0, 0]) for b in r0.mine + r1.mine] == ids
    assert one.label_tokens == r0.label_tokens == r1.label_tokens == sum(1 + i % 3 for i in range(4))
    assert one.tokens == r0.tokens == 20 and one.position == r0.position == r1.position == 4


def test_progress_line_shows_every_ranks_peak():
    line = progress_line(3, 10, 1.5, 1e-4, 0.5, 12345.0, [2**30, 3 * 2**29], 60.0)
    assert "12,345 tok/s" in line and "peak [1.00 1.50] GiB" in line
    assert "peak 1.00 GiB" in progress_line(3, 10, 1.5, 1e-4, 0.5, 1.0, 2**30, None)


def test_resume_refuses_a_process_count_that_cannot_keep_the_sequences_per_step():
    from moefit.config import RunConfig
    from moefit.errors import MoefitError
    from moefit.parallel.dist import DistContext
    from moefit.train.checkpoint import TrainerState
    from moefit.train.loop import _match_sequences_per_step

    saved = TrainerState(step=2, data_epoch=0, data_index=8, tokens_seen=0, label_tokens_seen=0, elapsed_s=0,
                         train_time_s=0, start_eval_loss=None, world_size=2, sequences_per_step=4)
    cfg = RunConfig()
    cfg.train.batch_size, cfg.train.grad_accum = 1, 2
    said: list[str] = []
    _match_sequences_per_step(cfg, saved, DistContext(rank=0, world_size=4), said.append)
    assert cfg.train.grad_accum == 1 and said
    cfg.train.grad_accum = 2
    with pytest.raises(MoefitError, match="divides 4"):
        _match_sequences_per_step(cfg, saved, DistContext(rank=0, world_size=3), said.append)

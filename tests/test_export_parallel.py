"""A merged export written by several worker threads is byte for byte the serial one (moefit.export's `workers`),
for each way the merge makes a tensor: fused routed experts one expert at a time (Llama 4), one weight per expert
(Qwen3-MoE; Mixtral with its renamed keys), MXFP4 experts decoded (gpt-oss), tensors copied in runs of rows; and
the shard writer never holds more pieces than it has workers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import moefit
import moefit.export.merge as merge
from moefit.export.safetensors_stream import Piece, PlannedTensor, write_shards
from tests.concurrency import Overlap
from tests.families import CASES, rel, write_checkpoint, write_mxfp4_copy
from tests.test_export import make_run


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, fname in index["weight_map"].items():
        with safe_open(str(out / fname), "pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


def _check_workers_agree(run: Path, tmp: Path, monkeypatch, **kw) -> dict:
    """Export serially and with 3 workers (tensors copied in runs of a few rows, many small shards): the same
    index, the same files, and every tensor equal. Returns the serial export's report."""
    monkeypatch.setattr(merge, "COPY_CHUNK_BYTES", 1000)
    reports = {w: moefit.export(run, tmp / f"w{w}", max_shard_size="100KB", workers=w, **kw) for w in (1, 3)}
    serial, parallel = tmp / "w1", tmp / "w3"
    assert reports[1].shards > 2 and reports[3].workers == 3
    assert (serial / "model.safetensors.index.json").read_text() == (parallel / "model.safetensors.index.json").read_text()
    a, b = _tensors(serial), _tensors(parallel)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    shards = sorted(p.name for p in serial.glob("*.safetensors"))
    assert shards == sorted(p.name for p in parallel.glob("*.safetensors"))
    assert all((serial / n).read_bytes() == (parallel / n).read_bytes() for n in shards)
    return reports[1]


def test_parallel_llama4_export_equals_serial(tiny_run, tmp_path, monkeypatch):
    """Fused experts (gate_up_proj [E, H, 2I]), NF4 round trip of the default base; and into the original base."""
    _check_workers_agree(tiny_run, tmp_path / "nf4", monkeypatch)
    base = Path(moefit.load_config(tiny_run / "config.yaml").model)
    _check_workers_agree(tiny_run, tmp_path / "base", monkeypatch, base=base)


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral", "gpt_oss-mxfp4"])
def test_parallel_family_export_equals_serial(case, tmp_path, monkeypatch):
    family, _, mxfp4 = case.partition("-")
    base = tmp_path / "base"
    write_checkpoint(base, CASES[family])
    if mxfp4:
        base = write_mxfp4_copy(base, tmp_path / "mxfp4")
    run = make_run(tmp_path, steps=1, expert_r=2, base=base)
    report = _check_workers_agree(run, tmp_path, monkeypatch)
    assert report.merged_modules > 0 and (not mxfp4 or any("MXFP4" in n for n in report.notes))


def test_shard_writer_bounds_pieces_in_flight_and_checks_sizes(tmp_path):
    """At most `workers` pieces exist at once (host memory), each lands at its place, and pieces that do not add
    up to a planned tensor are refused before anything is written."""
    gauge = Overlap(hold=0.002)

    def make(value: int, n: int) -> torch.Tensor:
        with gauge:
            return torch.full((n,), value, dtype=torch.int32)

    planned = [PlannedTensor(f"t{i}", "I32", (4 * (i + 1),)) for i in range(6)]
    pieces = {t.name: [Piece(16, lambda i=i, j=j: make(10 * i + j, 4)) for j in range(i + 1)]
              for i, t in enumerate(planned)}
    files = [(tmp_path / "a.safetensors", planned[:4]), (tmp_path / "b.safetensors", planned[4:])]
    done = []
    stats = write_shards(files, pieces, workers=3, progress=lambda d, t: done.append((d, t)))
    assert gauge.most <= 3 and stats.bytes == sum(t.nbytes for t in planned) == done[-1][0] == done[-1][1]
    for path, tensors in files:
        with safe_open(str(path), "pt") as f:
            for t in tensors:
                i = int(t.name[1:])
                expected = torch.tensor([10 * i + j for j in range(i + 1)], dtype=torch.int32).repeat_interleave(4)
                assert torch.equal(f.get_tensor(t.name), expected)
    short = {**pieces, "t5": pieces["t5"][:-1]}
    with pytest.raises(RuntimeError, match="t5 has pieces of 80 bytes, planned 96"):
        write_shards([(tmp_path / "c.safetensors", planned)], short, workers=2)
    assert not (tmp_path / "c.safetensors").exists()
    wrong = {**pieces, "t0": [Piece(16, lambda: torch.zeros(4, dtype=torch.float32))]}
    with pytest.raises(RuntimeError, match="t0: planned I32, got torch.float32"):
        write_shards([(tmp_path / "d.safetensors", planned)], wrong, workers=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_export_equals_its_serial_run_and_is_close_to_the_cpu_one(tiny_run, tmp_path, monkeypatch):
    """On the GPU, too, 3 workers write the serial export's bytes. Against the CPU export the values may differ in
    the last bits (bitsandbytes' CUDA NF4 kernels, cuBLAS), never more than rounding."""
    report = _check_workers_agree(tiny_run, tmp_path / "gpu", monkeypatch, device="cuda")
    assert report.device.startswith("cuda")
    moefit.export(tiny_run, tmp_path / "cpu", device="cpu", max_shard_size="100KB")
    gpu, cpu = _tensors(tmp_path / "gpu" / "w1"), _tensors(tmp_path / "cpu")
    assert gpu.keys() == cpu.keys()
    for k in gpu:
        assert gpu[k].dtype == cpu[k].dtype
        if gpu[k].is_floating_point() and gpu[k].numel():
            assert rel(gpu[k].float(), cpu[k].float()) < 2e-2, k


def test_preallocated_shards_hold_the_same_bytes_and_size(tmp_path):
    """Each shard file is allocated at its planned size when opened (worker threads writing one file then do not
    wait on each other to extend it): the same bytes and the same size as without."""
    from moefit.export.safetensors_stream import preallocate_file

    planned = [PlannedTensor(f"t{i}", "BF16", (1000 + i,)) for i in range(5)]
    pieces = {t.name: [Piece(t.nbytes, lambda t=t: torch.full(t.shape, float(len(t.name)), dtype=torch.bfloat16))]
              for t in planned}
    files = {}
    for pre in (False, True):
        path = tmp_path / f"{pre}.safetensors"
        write_shards([(path, planned)], pieces, workers=3, preallocate=pre)
        files[pre] = path.read_bytes()
    assert files[True] == files[False]
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        grown = preallocate_file(f.fileno(), 4096)
    assert probe.stat().st_size == (4096 if grown else 0)


def test_pieces_stay_as_they_are_off_the_gpu():
    from moefit.export.thread_streams import on_thread_streams

    pieces = {"t": [Piece(4, lambda: torch.zeros(1))]}
    assert on_thread_streams(pieces, torch.device("cpu")) is pieces


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_each_export_worker_thread_runs_its_pieces_on_its_own_stream():
    """The merge workers' GPU work goes on one stream per thread (not the default stream, where each thread's copy
    back waits for the others' work): the piece sees its thread's stream as the current one."""
    from concurrent.futures import ThreadPoolExecutor

    from moefit.export.thread_streams import on_thread_streams

    seen: list[tuple[int, int]] = []

    def make() -> torch.Tensor:
        seen.append((threading.get_ident(), torch.cuda.current_stream().cuda_stream))
        return (torch.ones(1000, device="cuda") * 2).cpu()

    pieces = on_thread_streams({"t": [Piece(4000, make) for _ in range(12)]},
                               torch.device("cuda", torch.cuda.current_device()))
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda p: p.make(), pieces["t"]))
    assert all(torch.equal(o, torch.full((1000,), 2.0)) for o in outs)
    by_thread = {}
    for thread, stream in seen:
        by_thread.setdefault(thread, set()).add(stream)
    assert all(len(s) == 1 for s in by_thread.values())  # one stream per thread, kept
    assert len({next(iter(s)) for s in by_thread.values()}) == len(by_thread)  # and a stream of its own
    assert torch.cuda.default_stream().cuda_stream not in {st for _, st in seen}


def test_host_staging_hands_out_aligned_regions_of_one_buffer_per_thread_and_falls_back_when_full():
    """Within a piece, reads get consecutive 64-byte-aligned regions of the thread's one buffer; a read that does
    not fit is read into pageable memory instead (the bytes are the same); the next piece starts again at the
    front; each thread has a buffer of its own."""
    from moefit.export.host_staging import ALIGN, HostStaging

    staging = HostStaging(1000, torch.device("cpu"))
    regions: list[torch.Tensor | None] = []
    fallbacks: list[int] = []

    def read_into(value: int):
        def fill(buf: torch.Tensor) -> torch.Tensor:
            regions.append(buf)
            return buf.fill_(value)
        return fill

    def piece() -> list[torch.Tensor]:
        return [staging.to_device(read_into(v), n, lambda v=v, n=n: fallbacks.append(v) or torch.full((n,), v,
                                                                                                      dtype=torch.uint8),
                                  "cpu")
                for v, n in ((1, 100), (2, 300), (3, 700), (4, 500))]

    got = staging.wrap(piece)()
    assert [int(t[0]) for t in got] == [1, 2, 3, 4] and [t.numel() for t in got] == [100, 300, 700, 500]
    assert fallbacks == [3]  # 128 + 300 = 428, then 448 + 700 > 1000; 448 + 500 fits
    buf = regions[0]._base if regions[0]._base is not None else regions[0]
    starts = [r.data_ptr() - buf.data_ptr() for r in regions]
    assert starts == [0, 128, 448] and all(s % ALIGN == 0 for s in starts)
    again = staging.wrap(lambda: staging.inbound(10))()
    assert again.data_ptr() == buf.data_ptr()  # a new piece starts at the front
    other: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: other.append(staging.wrap(lambda: staging.inbound(10))()))
    t.start()
    t.join()
    assert other[0].data_ptr() != buf.data_ptr() and staging.allocated_bytes == 2000
    elsewhere = staging.wrap(lambda: staging.to_device(read_into(9), 10, lambda: torch.zeros(10, dtype=torch.uint8),
                                                       "meta"))()
    assert elsewhere.is_meta and len(regions) == 3  # a read for another device is not read into the buffer
    assert staging.inbound(2000) is None
    staging.close()
    assert staging.allocated_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_export_through_page_locked_buffers_writes_the_pageable_exports_bytes(tiny_run, tmp_path, monkeypatch):
    """Each worker's reads and results go through its reused page-locked buffer (the result a view of it until the
    piece is written): 3 workers write the same bytes as the pageable path, also when the buffer is smaller than
    some pieces (those go through pageable memory)."""
    from moefit.export import host_staging

    made: list[int] = []
    real = host_staging.page_locked
    monkeypatch.setattr(host_staging, "page_locked", lambda n: made.append(n) or real(n))
    monkeypatch.setattr(merge, "COPY_CHUNK_BYTES", 1000)
    want = _tensors(moefit.export(tiny_run, tmp_path / "pageable", device="cuda", workers=3, pinned=False).out_dir)
    assert not made
    for cap in (merge.MAX_STAGING_BYTES, None):
        if cap is None:  # a buffer one byte short of the largest pieces: those go through pageable memory
            cap = made[-1] - 1
            monkeypatch.setattr(merge, "MAX_STAGING_BYTES", cap)
        before = len(made)
        got = _tensors(moefit.export(tiny_run, tmp_path / f"pinned{cap}", device="cuda", workers=3).out_dir)
        assert len(made) > before and made[-1] <= cap  # buffers made, of the largest piece's size at most
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not host_staging._REGISTERED  # every registration undone

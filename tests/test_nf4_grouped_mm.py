"""The fused NF4 grouped-GEMM kernel, run on CPU through Triton's interpreter (TRITON_INTERPRET=1) in a child
process: tile schedule over experts (empty experts, experts spanning several row tiles), nibble order, block
scales and both orientations, against the per-expert loop on the dequantized weights. On the GPU the same kernel
is compared with dequantize + torch._grouped_mm (tests/test_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
    pytest.skip("the kernel's scalar control flow needs Triton >= 3.9's interpreter", allow_module_level=True)

CHILD = textwrap.dedent("""
    import torch
    from moefit.moe.grouped import ExpertGroups, loop_grouped_matmul
    from moefit.quant.nf4 import NF4Weight
    from moefit.kernels.nf4_grouped_mm import VARIANTS, nf4_grouped_matmul

    torch.manual_seed(0)
    experts = 4
    counts = torch.tensor([5, 0, 37, 20])  # an empty expert; 37 rows span three 16-row tiles
    groups = ExpertGroups(counts)
    # The interpreter runs 128 x 128 weight tiles: 192 columns overhang (masked edges), 256 do not (no masks).
    for out_f, in_f in [(128, 192), (128, 256)]:
        # The interpreter has no bf16 arithmetic; fp16 storage makes the decoded weights exactly comparable.
        q = NF4Weight((experts, out_f, in_f), dtype=torch.float16).quantize_(
            torch.randn(experts, out_f, in_f) * 0.05)
        w = q.dequantize().float()
        for variant, transpose in [(v, t) for v in VARIANTS for t in (True, False)]:
            x = torch.randn(int(counts.sum()), in_f if transpose else out_f).half()
            y = nf4_grouped_matmul(x, q.packed, q.absmax_fp32(), q.code, groups.offs, (out_f, in_f), q.blocksize,
                                   transpose, variant)
            ref = loop_grouped_matmul(x.float(), w.transpose(1, 2) if transpose else w, counts.tolist())
            err = ((y.float() - ref).norm() / ref.norm()).item()
            worst = (y.float() - ref).abs().max().item()
            print(in_f, variant, transpose, tuple(y.shape), err, worst)
            assert y.shape == ref.shape
            assert err < 1e-3 and worst < 1e-2, (in_f, variant, transpose, err, worst)
    from moefit.kernels import triton_nf4
    # The plain decoder, every lookup and launch shape the variant benchmark runs: bit-identical to bitsandbytes,
    # also on a size that is no multiple of the block (masked tail).
    odd = NF4Weight((3, 40, 64), dtype=torch.float16).quantize_(torch.randn(3, 40, 64) * 0.05)
    for w in (q, odd):
        for lookup in triton_nf4.LOOKUPS:
            for block, warps in [(None, None), (1024, 4), (4096, 8)]:  # None: the autotuned launch
                decoded = triton_nf4.decode(w.packed, w.absmax_fp32(), w.code, w.blocksize, list(w.shape),
                                            torch.float16, lookup=lookup, block=block, warps=warps)
                assert torch.equal(decoded, w.dequantize()), (lookup, block, tuple(w.shape))
    # The double-quantized scales decoded inside the kernel: experts of 272 blocks (two second-level runs each, the
    # second one short, so a run never straddles two experts), the whole bank and a run of experts, every lookup.
    dq = NF4Weight((3, 136, 128), dtype=torch.float16).quantize_(torch.randn(3, 136, 128) * 0.05)
    assert dq.double_quant and dq.absmax.shape[1] == 272 and dq.absmax2.shape[1] == 2
    for rows in (slice(None), slice(1, 3)):
        want = dq.dequantize()[rows]
        for lookup in triton_nf4.LOOKUPS:
            for block, warps in [(None, None), (1024, 4), (2048, 4)]:
                decoded = triton_nf4.decode(dq.packed[rows], dq.absmax[rows], dq.code, dq.blocksize,
                                            list(want.shape), torch.float16, lookup=lookup, block=block,
                                            warps=warps, double_quant=(dq.absmax2[rows], dq.offset[rows], dq.code2))
                assert torch.equal(decoded, want), ("double quant", rows, lookup, block)
    # The largest quantization.blocksize (4096 values: 2,048 bytes per scale, more than the smallest launch block)
    big = NF4Weight((2, 8, 1024), dtype=torch.float16, blocksize=4096).quantize_(torch.randn(2, 8, 1024))
    for double in (False, True):
        decoded = triton_nf4.decode(big.packed, big.absmax if double else big.absmax_fp32(), big.code, 4096,
                                    list(big.shape), torch.float16, lookup="load",
                                    double_quant=(big.absmax2, big.offset, big.code2) if double else None)
        assert torch.equal(decoded, big.dequantize()), ("blocksize 4096", double)
    # Threads (the export's workers) each deciding a size's launch shape at once: the autotuning is serialized and
    # each gets its own decode. (Sizes of their own: the interpreter cannot run two kernels at once.)
    from concurrent.futures import ThreadPoolExecutor
    triton_nf4._launch_shapes.clear()
    ws = [NF4Weight((2, 24 + 8 * i, 64), dtype=torch.float16).quantize_(torch.randn(2, 24 + 8 * i, 64))
          for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda w: triton_nf4.decode(w.packed, w.absmax, w.code, w.blocksize, list(w.shape),
                                                        torch.float16, lookup="load",
                                                        double_quant=(w.absmax2, w.offset, w.code2)), ws))
    assert all(torch.equal(g, w.dequantize()) for g, w in zip(got, ws))
    print("ok")
""")


def test_fused_nf4_grouped_matmul_matches_dequantized_loop_in_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr

"""Triton kernels for NF4 (imported only when a Triton path runs: Triton is optional): the fused grouped GEMM
(`nf4_grouped_mm`) and the plain decoder (`triton_nf4`)."""

from __future__ import annotations

import os

import triton
import triton.language as tl


def configs():
    out = []
    for bm, bn, bk, warps, stages in [
        (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    ]:
        out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=stages))
    if os.environ.get("TRITON_INTERPRET") == "1":  # CPU interpreter (tests): one small config
        # Tiles wider than the test's weights, so the edge masks are exercised.
        return [triton.Config({"BM": 16, "BN": 128, "BK": 128}, num_warps=1, num_stages=1)]
    return out


@triton.jit
def nf4_value(n):
    """bitsandbytes' NF4 table (fp32) indexed by the 4-bit code, as a tree of selects: no memory lookups."""
    b0 = (n & 1) != 0
    v01 = tl.where(b0, -0.6961928009986877, -1.0)
    v23 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    v45 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    v67 = tl.where(b0, 0.0, -0.09105003625154495)
    v89 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    v1011 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    v1213 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    v1415 = tl.where(b0, 1.0, 0.7229568362236023)
    b1 = (n & 2) != 0
    v03 = tl.where(b1, v23, v01)
    v47 = tl.where(b1, v67, v45)
    v811 = tl.where(b1, v1011, v89)
    v1215 = tl.where(b1, v1415, v1213)
    b2 = (n & 4) != 0
    v07 = tl.where(b2, v47, v03)
    v815 = tl.where(b2, v1215, v811)
    return tl.where((n & 8) != 0, v815, v07)

@triton.jit
def decode(code_ptr, n, SELECT: tl.constexpr):
    if SELECT:
        return nf4_value(n)
    return tl.load(code_ptr + n)

@triton.autotune(configs=configs(), key=["N_OUT", "K", "TRANSPOSE", "SELECT", "JOIN"])
@triton.jit
def nf4_grouped_mm(x_ptr, packed_ptr, absmax_ptr, code_ptr, offs_ptr, out_ptr,
                   N_OUT, K, W_COLS, stride_xm, stride_om,
                   E: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCKSIZE: tl.constexpr,
                   SELECT: tl.constexpr, JOIN: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which expert and which of its row tiles this program computes.
    expert = -1
    row_start = 0
    row_end = 0
    tiles_before = 0
    prev_end = 0
    for e in tl.static_range(E):
        end = tl.load(offs_ptr + e)
        n_tiles = tl.cdiv(end - prev_end, BM)
        hit = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, prev_end + (pid_m - tiles_before) * BM, row_start)
        row_end = tl.where(hit, end, row_end)
        tiles_before += n_tiles
        prev_end = end
    if expert >= 0:
        rm = row_start + tl.arange(0, BM)
        m_mask = rm < row_end
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N_OUT
        slice_numel = N_OUT.to(tl.int64) * K
        w_bytes = packed_ptr + expert.to(tl.int64) * (slice_numel // 2)
        w_scales = absmax_ptr + expert.to(tl.int64) * (slice_numel // BLOCKSIZE)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_mask = rk < K
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if TRANSPOSE:  # tile of W[e] with rows rn (out) and columns rk (in), used transposed
                rows = rn
                cols = rk
                R: tl.constexpr = BN
                C: tl.constexpr = BK
                c0 = k0
                row_mask = n_mask
                col_limit = K
            else:  # tile of W[e] with rows rk (out) and columns rn (in)
                rows = rk
                cols = rn
                R: tl.constexpr = BK
                C: tl.constexpr = BN
                c0 = pid_n * BN
                row_mask = k_mask
                col_limit = N_OUT
            row_off = rows[:, None].to(tl.int64)
            # Tiles may overhang the weight's edges (K or N_OUT not a multiple of the tile): masked, decoded as 0.
            w_mask = row_mask[:, None] & (cols < col_limit)[None, :]
            if JOIN:
                # Each byte loaded once, its two codes decoded and interleaved (high nibble first).
                half = c0 // 2 + tl.arange(0, C // 2)
                half_mask = row_mask[:, None] & (2 * half < col_limit)[None, :]
                b = tl.load(w_bytes + row_off * (W_COLS // 2) + half[None, :], mask=half_mask, other=0).to(tl.int32)
                vals = tl.reshape(tl.join(decode(code_ptr, b >> 4, SELECT), decode(code_ptr, b & 15, SELECT)),
                                  (R, C))
                blk = c0 // BLOCKSIZE + tl.arange(0, C // BLOCKSIZE)
                blk_mask = row_mask[:, None] & (blk * BLOCKSIZE < col_limit)[None, :]
                scale = tl.load(w_scales + row_off * (W_COLS // BLOCKSIZE) + blk[None, :], mask=blk_mask, other=0.0)
                w = tl.reshape(tl.reshape(vals, (R, C // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None], (R, C))
            else:
                # Each element decoded where it sits: its byte loaded by index (twice, from cache), the nibble
                # picked by the column's parity, its block scale loaded by index.
                b = tl.load(w_bytes + row_off * (W_COLS // 2) + (cols // 2)[None, :], mask=w_mask, other=0).to(tl.int32)
                nibble = (b >> ((1 - cols % 2) * 4)[None, :]) & 15
                scale = tl.load(w_scales + row_off * (W_COLS // BLOCKSIZE) + (cols // BLOCKSIZE)[None, :], mask=w_mask,
                                other=0.0)
                w = decode(code_ptr, nibble, SELECT) * scale
            w = w.to(x_ptr.dtype.element_ty)
            if TRANSPOSE:
                acc = tl.dot(x, tl.trans(w), acc)
            else:
                acc = tl.dot(x, w, acc)
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def nf4_decode(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, BYTES_PER_BLOCK: tl.constexpr,
               BLOCK: tl.constexpr):
    """Decode BLOCK packed bytes into 2 x BLOCK values; the NF4 table is a tree of selects, not a lookup."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + offs // BYTES_PER_BLOCK, mask=mask, other=0.0)
    hi = nf4_value(b >> 4) * scale  # the first value of a pair sits in the high nibble
    lo = nf4_value(b & 15) * scale
    pair = tl.reshape(tl.join(hi, lo), [2 * BLOCK])
    out_offs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, pair.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)

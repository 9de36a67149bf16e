"""Triton kernels for NF4 (imported only when a Triton path runs: Triton is optional): the fused grouped GEMM
(`nf4_grouped_mm`) and the plain decoder (`triton_nf4`)."""

from __future__ import annotations

import os

import triton
import triton.language as tl
import triton.testing


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
def decode(code_ptr, n, DECODE: tl.constexpr):
    """NF4 codes (a 1-D or 2-D block) -> fp32 table values. DECODE 0: lookup through memory (a dependent load);
    1: tree of selects; 2: the 16-entry table held in registers and read with tl.gather (lowered to warp shuffles
    where it can)."""
    if DECODE == 1:
        return nf4_value(n)
    if DECODE == 2:  # gathered as one flat block: a 1-D and a 2-D block take the same code
        flat = tl.gather(tl.load(code_ptr + tl.arange(0, 16)), tl.reshape(n, [n.numel]), 0)
        return tl.reshape(flat, n.shape)
    return tl.load(code_ptr + n)


@triton.jit
def below(v, limit, EVEN: tl.constexpr):
    """v < limit, or a constant all-true mask when the shapes are tile multiples (EVEN), so the compiler drops the
    edge predicates."""
    if EVEN:
        return tl.full(v.shape, 1, tl.int1)
    return v < limit


def _even(args) -> bool:
    return args["K"] % args["BK"] == 0 and args["N_OUT"] % args["BN"] == 0


@triton.jit
def expert_tile(offs_ptr, pid_m, E: tl.constexpr, BM: tl.constexpr):
    """Row tile `pid_m` of the grid -> (expert, first row, end row of that expert); expert -1 past the last tile.
    Row tiles are laid out expert after expert, each expert's rows cut into BM-row tiles."""
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
    return expert, row_start, row_end

@triton.autotune(configs=configs(), key=["N_OUT", "K", "TRANSPOSE", "DECODE", "JOIN"])
@triton.heuristics({"EVEN": _even})
@triton.jit
def nf4_grouped_mm(x_ptr, packed_ptr, absmax_ptr, code_ptr, offs_ptr, out_ptr,
                   N_OUT, K, W_COLS, stride_xm, stride_om,
                   E: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCKSIZE: tl.constexpr,
                   DECODE: tl.constexpr, JOIN: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr):
    pid_n = tl.program_id(1)
    expert, row_start, row_end = expert_tile(offs_ptr, tl.program_id(0), E, BM)
    if expert >= 0:
        rm = row_start + tl.arange(0, BM)
        m_mask = rm < row_end
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = below(rn, N_OUT, EVEN)
        slice_numel = N_OUT.to(tl.int64) * K
        w_bytes = packed_ptr + expert.to(tl.int64) * (slice_numel // 2)
        w_scales = absmax_ptr + expert.to(tl.int64) * (slice_numel // BLOCKSIZE)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_mask = below(rk, K, EVEN)
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
            w_mask = row_mask[:, None] & below(cols, col_limit, EVEN)[None, :]
            if JOIN:
                # Each byte loaded once, its two codes decoded and interleaved (high nibble first).
                half = c0 // 2 + tl.arange(0, C // 2)
                half_mask = row_mask[:, None] & below(2 * half, col_limit, EVEN)[None, :]
                b = tl.load(w_bytes + row_off * (W_COLS // 2) + half[None, :], mask=half_mask, other=0).to(tl.int32)
                vals = tl.reshape(tl.join(decode(code_ptr, b >> 4, DECODE), decode(code_ptr, b & 15, DECODE)),
                                  (R, C))
                blk = c0 // BLOCKSIZE + tl.arange(0, C // BLOCKSIZE)
                blk_mask = row_mask[:, None] & below(blk * BLOCKSIZE, col_limit, EVEN)[None, :]
                scale = tl.load(w_scales + row_off * (W_COLS // BLOCKSIZE) + blk[None, :], mask=blk_mask, other=0.0)
                w = tl.reshape(tl.reshape(vals, (R, C // BLOCKSIZE, BLOCKSIZE)) * scale[:, :, None], (R, C))
            else:
                # Each element decoded where it sits: its byte loaded by index (twice, from cache), the nibble
                # picked by the column's parity, its block scale loaded by index.
                b = tl.load(w_bytes + row_off * (W_COLS // 2) + (cols // 2)[None, :], mask=w_mask, other=0).to(tl.int32)
                nibble = (b >> ((1 - cols % 2) * 4)[None, :]) & 15
                scale = tl.load(w_scales + row_off * (W_COLS // BLOCKSIZE) + (cols // BLOCKSIZE)[None, :], mask=w_mask,
                                other=0.0)
                w = decode(code_ptr, nibble, DECODE) * scale
            w = w.to(x_ptr.dtype.element_ty)
            if TRANSPOSE:
                acc = tl.dot(x, tl.trans(w), acc)
            else:
                acc = tl.dot(x, w, acc)
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(configs=configs(), key=["N_OUT", "K", "TRANSPOSE", "DECODE"])
@triton.heuristics({"EVEN": _even})
@triton.jit
def nf4_grouped_mm_split(x_ptr, packed_ptr, absmax_ptr, code_ptr, offs_ptr, out_ptr,
                         N_OUT, K, W_COLS, stride_xm, stride_om,
                         E: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCKSIZE: tl.constexpr,
                         DECODE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr):
    """Same contract as `nf4_grouped_mm`, without ever interleaving the two codes of a byte: the high nibbles
    (even weight columns) and the low nibbles (odd columns) stay two half-width tiles. In the forward they meet
    the even and odd columns of x (two MMAs over half of K each); in the backward they produce the even and odd
    output columns (two accumulators). No join/reshape, so no register shuffles between decode and MMA."""
    pid_n = tl.program_id(1)
    expert, row_start, row_end = expert_tile(offs_ptr, tl.program_id(0), E, BM)
    if expert >= 0:
        rm = row_start + tl.arange(0, BM)
        m_mask = rm < row_end
        slice_numel = N_OUT.to(tl.int64) * K
        w_bytes = packed_ptr + expert.to(tl.int64) * (slice_numel // 2)
        w_scales = absmax_ptr + expert.to(tl.int64) * (slice_numel // BLOCKSIZE)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        if TRANSPOSE:
            HALF: tl.constexpr = BK // 2
            rn = pid_n * BN + tl.arange(0, BN)
            n_mask = below(rn, N_OUT, EVEN)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            HALF: tl.constexpr = BN // 2
            acc_even = tl.zeros((BM, HALF), dtype=tl.float32)
            acc_odd = tl.zeros((BM, HALF), dtype=tl.float32)
        j = tl.arange(0, HALF)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_mask = below(rk, K, EVEN)
            if TRANSPOSE:  # weight tile: rows rn (out), byte columns over k0 .. k0 + BK
                rows = rn
                row_mask = n_mask
                c0 = k0
                col_limit = K
            else:  # weight tile: rows rk (out), byte columns over the output columns of this program
                rows = rk
                row_mask = k_mask
                c0 = pid_n * BN
                col_limit = N_OUT
            row_off = rows[:, None].to(tl.int64)
            even_cols = c0 + 2 * j
            col_mask = row_mask[:, None] & below(even_cols, col_limit, EVEN)[None, :]
            b = tl.load(w_bytes + row_off * (W_COLS // 2) + (c0 // 2 + j)[None, :], mask=col_mask,
                        other=0).to(tl.int32)
            scale = tl.zeros(b.shape, dtype=tl.float32)
            for q in tl.static_range((2 * HALF) // BLOCKSIZE):  # the tile's blocks along its columns
                s_q = tl.load(w_scales + rows.to(tl.int64) * (W_COLS // BLOCKSIZE) + c0 // BLOCKSIZE + q,
                              mask=row_mask & below(rows * 0 + c0 + q * BLOCKSIZE, col_limit, EVEN), other=0.0)
                scale = tl.where(((2 * j) // BLOCKSIZE == q)[None, :], s_q[:, None], scale)
            w_even = (decode(code_ptr, b >> 4, DECODE) * scale).to(x_ptr.dtype.element_ty)
            w_odd = (decode(code_ptr, b & 15, DECODE) * scale).to(x_ptr.dtype.element_ty)
            if TRANSPOSE:
                ke = k0 + 2 * j
                x_even = tl.load(x_rows + ke[None, :], mask=m_mask[:, None] & below(ke, K, EVEN)[None, :], other=0.0)
                x_odd = tl.load(x_rows + ke[None, :] + 1, mask=m_mask[:, None] & below(ke + 1, K, EVEN)[None, :],
                                other=0.0)
                acc = tl.dot(x_even, tl.trans(w_even), acc)
                acc = tl.dot(x_odd, tl.trans(w_odd), acc)
            else:
                x = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                acc_even = tl.dot(x, w_even, acc_even)
                acc_odd = tl.dot(x, w_odd, acc_odd)
        out_rows = out_ptr + rm[:, None].to(tl.int64) * stride_om
        if TRANSPOSE:
            tl.store(out_rows + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        else:
            ce = pid_n * BN + 2 * j
            tl.store(out_rows + ce[None, :], acc_even.to(out_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & below(ce, N_OUT, EVEN)[None, :])
            tl.store(out_rows + ce[None, :] + 1, acc_odd.to(out_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & below(ce + 1, N_OUT, EVEN)[None, :])


@triton.jit
def nf4_decode(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, absmax2_ptr, offset_ptr, code2_ptr, nblocks,
               nblocks2, BYTES_PER_BLOCK: tl.constexpr, BLOCK: tl.constexpr, LOOKUP: tl.constexpr = 1,
               DOUBLE_QUANT: tl.constexpr = 0):
    """Decode BLOCK packed bytes into 2 x BLOCK values. LOOKUP: how the NF4 table is read, `decode`'s DECODE (1 a
    tree of selects, ~20 integer/select operations per value; 0 a load from the 16-entry table, which stays in L1,
    one operation; 2 a register gather). All three are bitsandbytes' fp32 table values x the fp32 absmax, then the
    cast: the same bits.

    The block scales: fp32 in `absmax_ptr` (DOUBLE_QUANT 0), or double-quantized (1): uint8 codes into `code2_ptr`,
    times the second-level scale of their run of 256 blocks (`absmax2_ptr`, `nblocks2` per expert), plus the
    expert's `offset_ptr` -- bitsandbytes' dequantize_blockwise and the add of the offset, decoded here, once per
    block of BYTES_PER_BLOCK bytes, instead of by two more kernel launches. `nblocks`: blocks per expert. Launched
    with fp fusion off, so that the multiply and the add round as two operations, as they do in bitsandbytes."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    SCALES: tl.constexpr = BLOCK // BYTES_PER_BLOCK
    blk = pid.to(tl.int64) * SCALES + tl.arange(0, SCALES)
    blk_mask = blk * BYTES_PER_BLOCK < n_bytes
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=blk_mask, other=0).to(tl.int32)
        expert = blk // nblocks
        run = expert * nblocks2 + (blk - expert * nblocks) // 256
        s = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + run, mask=blk_mask, other=0.0)
        s = s + tl.load(offset_ptr + expert, mask=blk_mask, other=0.0)
    else:
        s = tl.load(absmax_ptr + blk, mask=blk_mask, other=0.0)
    scale = tl.reshape(tl.broadcast_to(s[:, None], (SCALES, BYTES_PER_BLOCK)), [BLOCK])
    hi = decode(code_ptr, b >> 4, LOOKUP) * scale  # the first value of a pair sits in the high nibble
    lo = decode(code_ptr, b & 15, LOOKUP) * scale
    pair = tl.reshape(tl.join(hi, lo), [2 * BLOCK])
    out_offs = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out_offs, pair.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)


# The plain decoder's launch shapes (packed bytes per program, warps): measured against each other by
# benchmarks/nf4_decode_variants.py; `nf4_decode_autotuned` picks among them on the first call of each size.
DECODE_BLOCKS = (1024, 2048, 4096, 8192)
DECODE_WARPS = (4, 8)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def decode_configs():
    if _interpreted():  # CPU interpreter (tests): two shapes, so that the autotuner prunes and picks as on a GPU
        return [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in DECODE_BLOCKS for w in DECODE_WARPS]


# Timed briefly (5 ms warm-up, 20 ms of runs per shape, against Triton's 25 / 100): a decode is under a
# millisecond, and a training step meets several sizes on its first call.
def _brief_bench(kernel_call, quantiles):
    if _interpreted():  # nothing to time on the CPU: each shape runs once, all equally fast (the first is kept)
        kernel_call()
        return [1.0] * len(quantiles) if quantiles else 1.0
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _whole_scale_blocks(configs, named_args, **kwargs):
    """The launch shapes whose BLOCK holds whole scale blocks: quantization.blocksize goes up to 4096 values (2,048
    bytes), past the smallest DECODE_BLOCKS."""
    need = kwargs.get("BYTES_PER_BLOCK", 1)
    return [c for c in configs if c.kwargs["BLOCK"] >= need] or [triton.Config({"BLOCK": need}, num_warps=4)]


nf4_decode_autotuned = triton.autotune(configs=decode_configs(), key=["n_bytes", "LOOKUP", "DOUBLE_QUANT"],
                                       do_bench=_brief_bench,
                                       prune_configs_by={"early_config_prune": _whole_scale_blocks})(nf4_decode)

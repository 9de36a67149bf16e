"""The zero rows that steer torch._grouped_mm to its large tiles are added only when few
(at most 1/8 more rows) and never change the rows that belong to experts (tests/test_gpu.py runs the kernel)."""

from __future__ import annotations

import torch

from moefit.moe.grouped import _padded_for_large_tiles


def test_padding_only_when_cheap():
    x = torch.randn(2046, 8)
    padded = _padded_for_large_tiles(x, 16)
    assert padded.shape == (129 * 16, 8) and torch.equal(padded[:2046], x) and not padded[2046:].any()
    assert _padded_for_large_tiles(torch.randn(1024, 8), 16).shape == (1024, 8)  # would add 1,040 rows: no
    assert _padded_for_large_tiles(torch.randn(4096, 8), 16).shape == (4096, 8)  # already past 128 per expert

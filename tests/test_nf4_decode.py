"""NF4Weight's decode against the format written out by hand (code[nibble] x block scale), for rows that are not a
whole number of blocks: bitsandbytes 0.50's native CPU kernel decodes those with the wrong scales, and the tiny test
models have such rows (hidden 32 at blocksize 64)."""

from __future__ import annotations

import pytest
import torch

from moefit.quant.nf4 import NF4Weight


def decoded_by_hand(w: NF4Weight, expert: int) -> torch.Tensor:
    """Expert `expert` of `w` from its bytes: high nibble first, each value the NF4 code times its block's scale."""
    numel = w.slice_numel
    packed = w.packed[expert].reshape(-1).view(torch.uint8)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:numel].long()
    scales = w.absmax_fp32(slice(expert, expert + 1)).reshape(-1).float()
    values = w.code.float()[nibbles] * scales.repeat_interleave(w.blocksize)[:numel]
    return values.to(w.dtype).reshape(w.slice_shape)


@pytest.mark.parametrize("shape", [(64, 32), (3, 64, 32), (32, 96), (2, 7, 64), (3, 10, 30), (128, 256)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_every_value_is_its_code_times_its_block_scale(shape, double_quant):
    torch.manual_seed(0)
    w = NF4Weight(shape, blocksize=64, double_quant=double_quant).quantize_(torch.randn(shape))
    whole = w.dequantize().reshape(-1, *w.slice_shape)
    for e in range(w.experts):
        want = decoded_by_hand(w, e)
        assert torch.equal(whole[e], want), f"expert {e} of {shape}"
        assert torch.equal(w.dequantize(expert=e if len(shape) == 3 else None).reshape(want.shape), want)


def test_the_decode_is_close_to_what_was_quantized():
    """Half of the gap between NF4 levels at most, times the block's scale: the error of a right decode of N(0, 1)
    values at blocksize 64 averages about 0.07 (the misdecoded rows averaged 0.13 to 0.28)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32)
    w = NF4Weight(x.shape, blocksize=64).quantize_(x)
    assert (w.dequantize().float() - x).abs().mean() < 0.09

"""MXFP4 (OCP microscaling FP4), as gpt-oss checkpoints store their routed experts: decoded at load, then NF4.

`blocks` [..., G, 16] uint8 hold 32 FP4 (E2M1) values per group, low nibble first; `scales` [..., G] uint8 hold
one power-of-two exponent per group of 32, biased by 127. The same decoding as transformers'
`integrations.mxfp4.convert_moe_packed_tensors` (the tests compare the two).
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] and scales [..., G] -> values [..., G * 32]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not belong together")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    blocks = blocks.to(torch.uint8)
    out = torch.empty(*blocks.shape[:-1], 32, dtype=torch.float32, device=blocks.device)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1).to(torch.float32))
    return out.flatten(-2).to(dtype)


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16], scales [..., K/32]): round to nearest FP4
    with the group's exponent chosen so its largest magnitude fits 6.0. For tests and tools (gpt-oss ships
    MXFP4; moefit only decodes it in training)."""
    *lead, k = values.shape
    g = values.float().reshape(*lead, k // 32, 32)
    amax = g.abs().amax(-1).clamp_min(2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.ldexp(torch.ones_like(exp), exp.to(torch.int32)).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES[:8])
    mag = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(-1)  # 0..7
    codes = (mag + 8 * (scaled < 0).long()).to(torch.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)

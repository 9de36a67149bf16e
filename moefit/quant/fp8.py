"""FP8 block-quantized checkpoints (DeepSeek-V3 on the hub, "fp8" quantization_config): each weight is
float8_e4m3fn beside a `<name>_scale_inv` [ceil(out/b0), ceil(in/b1)] of fp32 scales, one per b0 x b1 block
(128 x 128). moefit decodes them at load (then NF4) and writes merged exports in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCALE_SUFFIX = "_scale_inv"
FP8_MAX = 448.0  # largest float8_e4m3fn


def fp8_block_size(config: Any) -> tuple[int, int]:
    """The weight block of an fp8 quantization_config (default 128 x 128)."""
    q = getattr(config, "quantization_config", None) or {}
    block = (q.get("weight_block_size") if isinstance(q, dict) else getattr(q, "weight_block_size", None))
    return tuple(block) if block else (128, 128)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [..., out, in] (fp8) times its per-block scale [..., ceil(out/b0), ceil(in/b1)]."""
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float()
    if scale.numel() > 1:
        scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]
        scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (weight.float() * scale).to(dtype)


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, for tests and tools: (float8_e4m3fn weight, fp32 scale_inv per block)."""
    rows, cols = weight.shape[-2:]
    nb0, nb1 = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    pad = torch.nn.functional.pad(weight.float(), (0, nb1 * block[1] - cols, 0, nb0 * block[0] - rows))
    blocks = pad.unflatten(-2, (nb0, block[0])).unflatten(-1, (nb1, block[1]))  # [..., nb0, b0, nb1, b1]
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-12) / FP8_MAX  # [..., nb0, nb1]
    q = (blocks / scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn), scale

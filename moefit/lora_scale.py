"""When a LoRA scale (alpha / r) can be multiplied into B's compute copy instead of into the rank-r activation.

Its own module, without torch: the kernels (moe.grouped, models.layers) decide with it whether to fold the scale,
and the planner, which never imports torch, counts the copies folding makes (plan.memory, lora_cast_cache).
"""

from __future__ import annotations

import math


def exact_scale(scale: float) -> bool:
    """Whether `scale` is a power of two (LoRA's usual alpha = 2r gives 2): multiplying it into B instead of into
    the rank-r activation then gives the same bits (scaling by 2^k commutes with rounding)."""
    return math.frexp(scale)[0] == 0.5

"""Triton kernels, outside the core engine: no core module imports them at import time. The NF4 code paths
import them on first use on a GPU, and only when an engine setting selects them:

- `nf4_grouped_mm`: the fused NF4 grouped GEMM (opt-in, `engine.expert_matmul: fused`, variants
  `engine.nf4_gemm_variant`), called from moefit.moe.grouped;
- `triton_nf4`: the Triton NF4 decoder (`engine.nf4_decoder`, default `triton-load`), called from moefit.quant.nf4;
- `_nf4_gemm_kernels`: the Triton code of both (imports triton).

Triton itself is optional: every path asks `triton_importable()` first, and without it bitsandbytes decodes.
docs/engine.md says what each measured.
"""

from __future__ import annotations

import functools


@functools.cache
def triton_importable() -> bool:
    """Triton is optional: every Triton path in moefit asks here first."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

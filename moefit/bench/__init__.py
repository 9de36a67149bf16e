"""`moefit bench`: measure training memory and speed at real shapes without downloading anything.

- `synthetic`: the model from a preset's config.json with random NF4 weights (`build_synthetic_model`);
- `measure`: QLoRA steps on random tokens, peak memory, tokens/s, kernel time (`measure_training`, `cuda_time`);
- `run`: the `moefit bench` procedure (`bench`): build once, measure each sequence length, compare with the plan.
"""

from .measure import cuda_time, kernel_seconds, measure_training, profiled_kernel_seconds
from .run import active_params_per_token, bench, matmul_tflops
from .synthetic import build_synthetic_model, fill_synthetic, load_config_json, truncate_layers

__all__ = ["active_params_per_token", "bench", "build_synthetic_model", "cuda_time", "fill_synthetic",
           "kernel_seconds", "load_config_json", "matmul_tflops", "measure_training", "profiled_kernel_seconds",
           "truncate_layers"]

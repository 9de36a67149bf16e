"""Plan a run before renting a GPU: peak memory by component, fit and margin per GPU, step time, cost.

Reads only the model's config.json; never imports torch or transformers (`moefit plan` answers in well under
2 s on a laptop). See planner.plan / planner.check_fits.
"""

from __future__ import annotations

from .gpus import Gpu, get_gpu, gpu_names
from .memory import MemoryEstimate, RunShape, estimate_memory
from .model_facts import ModelFacts, load_model_facts
from .planner import GpuFit, Plan, check_fits, plan

__all__ = ["plan", "check_fits", "Plan", "GpuFit", "Gpu", "get_gpu", "gpu_names", "ModelFacts",
           "load_model_facts", "MemoryEstimate", "RunShape", "estimate_memory"]


from .._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, plan)

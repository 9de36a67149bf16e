"""Routed MoE blocks (block.py) and their expert matmuls (grouped.py).

This package's own module is torch-free, so the planner can read the facts below without importing torch.
"""

# Model families whose decoder layer adds the MoE block's output straight to the residual stream (no norm or gate
# after it): the recomputation of a checkpointed layer skips the frozen down projections that produce it
# (models.build sets MoefitMoE.output_feeds_residual from this; plan.timing counts the skipped passes).
OUTPUT_FEEDS_RESIDUAL = frozenset({"llama4_text"})

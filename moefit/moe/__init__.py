"""Routed MoE blocks (block.py), their routing rules (routing.py), expert banks (experts.py) and expert matmuls
(grouped.py), and the recomputation shortcut of checkpointed layers (recompute.py). Nothing here imports
moefit.models: the model side builds these modules from a family spec (models.families).
"""

"""Several processes training one run, launched by torchrun (or `moefit train --gpus N`).

- `dist`: the process group (NCCL on GPUs, gloo on CPU) and the few small collectives the trainer needs.
- `data_parallel`: the LoRA gradients summed over the ranks (one all-reduce per optimizer step), and the split
  of an optimizer step's micro-batches between the ranks.
- `launch`: `moefit train --gpus N` starts N workers through torch's elastic launcher (what torchrun runs) and
  turns a failed worker into one message that names its rank.
"""

from .dist import DistContext, current_context, init_distributed, shutdown_distributed

__all__ = ["DistContext", "current_context", "init_distributed", "shutdown_distributed"]

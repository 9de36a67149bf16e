"""The input embedding kept in host memory (`quantization.embeddings_on_host`).

A frozen input embedding is only ever indexed: per micro-step it reads batch x seq rows out of vocab x hidden.
On Llama 4 Scout the table is 202,048 x 5,120 bf16 = 1.93 GiB of GPU memory for rows worth 20 MiB per 2,048
tokens. Held here in host memory, the lookup runs on the CPU and only the rows travel to the GPU, through pinned
memory and an asynchronous copy. Token ids that are already in host memory (the trainer and `moefit bench` pass
them so: `MoefitCausalLM.input_device`) cost no device sync; ids on the GPU are copied back first, which waits for
the GPU's queued work. The lm_head stays on the GPU: it is a full GEMM every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HostEmbedding(nn.Module):
    """nn.Embedding's interface (`weight`, `num_embeddings`, `embedding_dim`, `padding_idx`) with the table in host
    memory as a buffer (frozen, never a parameter: `model.device` and `.to()` keep describing the GPU part) and
    the output on `out_device`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, dtype: torch.dtype,
                 out_device: torch.device | str):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.out_device = torch.device(out_device)
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=dtype, device="cpu"))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")  # no-op (and no sync) for ids already in host memory
        if self.out_device.type != "cuda":
            return F.embedding(ids, self.weight, self.padding_idx).to(self.out_device)
        # Gathered straight into pinned memory, then an asynchronous copy: a copy from pageable memory would first
        # wait for all the GPU's queued work. (padding_idx only affects gradients; the table is frozen.)
        rows = torch.empty(*ids.shape, self.embedding_dim, dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows.view(-1, self.embedding_dim))
        return rows.to(self.out_device, non_blocking=True)

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` / `.cuda()` on the model leave the table in host memory (that is the point); the rows follow
        the device the rest of the model went to."""
        probe = fn(torch.empty(0, dtype=self.weight.dtype))
        if probe.device != self.out_device and probe.device.type != "meta":
            self.out_device = probe.device
        if probe.dtype != self.weight.dtype:
            self.weight = self.weight.to(probe.dtype)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table in host memory, rows to {self.out_device}"

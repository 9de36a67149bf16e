"""The model object moefit hands out: the HF causal LM (modules replaced) plus a memory-lean loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import engine_switches
from ..devices import copy_without_waiting
from ..labels import IGNORE_INDEX
from ..moe import recompute
from ..moe.experts import MoefitExperts
from . import host_positions, offload
from .layer_graphs import LayerGraphs
from .loss import chunked_cross_entropy_sum


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None  # mean over label tokens (HF's shift: logits at t predict labels[t+1])
    loss_sum: torch.Tensor | None = None  # fp32 sum, for exact weighting across gradient accumulation
    num_tokens: int = 0
    logits: torch.Tensor | None = None


def label_rows(labels: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the [B*S, H] hidden states that predict a label token, those labels), both on `device`: position t
    predicts labels[t+1] (HF's shift), IGNORE_INDEX positions left out. Labels in host memory are selected there
    and copied without waiting: selecting them on the GPU (a boolean mask) reads the count back, a host sync in
    every micro-step that stops the host from queuing the backward while the GPU runs the forward."""
    valid = labels[:, 1:] != IGNORE_INDEX
    rows = torch.arange(labels.numel(), device=labels.device).view(labels.shape)[:, :-1][valid]
    y = labels[:, 1:][valid]
    return copy_without_waiting(rows, device), copy_without_waiting(y, device)


def placed_batch(batch: dict[str, torch.Tensor], model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch placed as `MoefitCausalLM.forward` takes it best: the input ids where the input embedding is
    (host memory when quantization.embeddings_on_host), labels and position ids left in host memory (the label
    positions and packed rows are decided there, no device sync), anything else on `device`; copied through pinned
    memory (devices.copy_without_waiting: from pageable memory the driver may sync the stream first)."""
    input_device = getattr(model, "input_device", device)
    return {k: v if k in ("labels", "position_ids") else
            copy_without_waiting(v, input_device if k == "input_ids" else device) for k, v in batch.items()}


class MoefitCausalLM(nn.Module):
    """`hf` is the transformers model itself (same class, config and module names as the checkpoint), so
    `generate`, chat templates and exports keep working; `forward` computes the loss without full logits."""

    def __init__(self, hf: nn.Module, *, source: str, source_dir: Path | None, quantization: str,
                 dtype: torch.dtype, loss_chunk: int | None = None):
        super().__init__()
        self.hf = hf
        self.source = source
        self.source_dir = source_dir
        self.quantization = quantization
        self.dtype = dtype
        self.loss_chunk = loss_chunk
        self.layer_graphs: LayerGraphs | None = None  # engine.layer_graphs, from enable_gradient_checkpointing
        self.host_checkpoints: offload.HostCheckpoints | None = None  # train.offload_checkpoints
        host_positions.install()

    @property
    def config(self):
        return self.hf.config

    @property
    def device(self) -> torch.device:
        # The lm_head, not the input embedding: that one may live in host memory (quantization.embeddings_on_host).
        return self.hf.get_output_embeddings().weight.device

    @property
    def input_device(self) -> torch.device:
        """Where `input_ids` should be: the input embedding's device (host memory when
        quantization.embeddings_on_host; ids already there cost the lookup no device sync)."""
        return self.hf.get_input_embeddings().weight.device

    def enable_gradient_checkpointing(self, keep_routed_gate_up: bool = False, offload_checkpoints: bool = False
                                      ) -> None:
        """Checkpoint every decoder layer. `keep_routed_gate_up`: the recomputation reuses the routed experts'
        frozen gate/up outputs of the first pass (faster; tokens x top_k x intermediate x 4 bytes per MoE layer
        held until backward; TrainConfig.keep_routed_gate_up). `offload_checkpoints`: the layers' saved inputs in
        host memory (models.offload; TrainConfig.offload_checkpoints), their first passes eager (no layer graphs)."""
        for module in self.modules():
            if isinstance(module, MoefitExperts):
                module.keep_gate_up = keep_routed_gate_up
        if not any(getattr(m, "gradient_checkpointing", False) for m in self.hf.modules()):
            # (on already: transformers would add its input-requires-grad hook to the embedding once more)
            # transformers >= 5.2x renamed the method; 5.17 (the GPU image) only has the old name.
            kwargs = {"use_reentrant": False, "context_fn": recompute.context_fn}
            if hasattr(self.hf, "activation_checkpointing_enable"):
                self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if offload_checkpoints:
            if self.layer_graphs is not None:  # graphs hold every layer's output on the GPU: not with offloading
                self.layer_graphs.uninstall(self.hf)
                self.layer_graphs = None
            if self.host_checkpoints is None:
                self.host_checkpoints = offload.HostCheckpoints()
            offload.install(self.hf, self.host_checkpoints)
            return
        if self.host_checkpoints is not None:
            offload.uninstall(self.hf)
            self.host_checkpoints = None
        if engine_switches.current().layer_graphs and self.layer_graphs is None:
            self.use_layer_graphs(LayerGraphs(backward=engine_switches.current().backward_graphs))

    def use_layer_graphs(self, graphs: LayerGraphs) -> None:
        """Replay the checkpointed layers' first passes from CUDA graphs (engine.layer_graphs; after
        enable_gradient_checkpointing). `graphs.stats()` says what ran how."""
        graphs.install(self.hf)
        self.layer_graphs = graphs

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                return_logits: bool = False) -> CausalLMOutput:
        """`labels` and `position_ids` may (and in training should) stay in host memory: the label positions and
        whether rows pack several samples are then decided there, with no device sync (labels.label_rows,
        host_positions)."""
        if position_ids is None or position_ids.device.type == "cpu":
            # with layer graphs replaying this forward, one kind of masks: one graph per layer (host_positions)
            replays = self.layer_graphs is not None and self.layer_graphs.masks_as_packed \
                and self.layer_graphs.replays_on(self.device) and self.training and torch.is_grad_enabled()
            known = host_positions.known(position_ids, tuple(input_ids.shape), as_packed=replays)
            if position_ids is not None:
                position_ids = copy_without_waiting(position_ids, self.device)
        else:
            known = contextlib.nullcontext()
        with known:
            hidden = self.hf.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   use_cache=False).last_hidden_state
        out = CausalLMOutput()
        if labels is not None:
            rows, y = label_rows(labels, hidden.device)
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
            out.num_tokens = int(y.numel())
            out.loss_sum = chunked_cross_entropy_sum(h, self.hf.lm_head.weight, y, self.loss_chunk)
            out.loss = out.loss_sum / max(out.num_tokens, 1)
        if labels is None or return_logits:
            out.logits = self.hf.lm_head(hidden)
        return out

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        return self.hf.generate(*args, **kwargs)

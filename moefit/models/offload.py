"""Checkpointed layers' saved inputs in host memory (`train.offload_checkpoints`).

With gradient checkpointing each decoder layer keeps its bf16 [B, S, H] input from its first pass until its
backward: Scout at 8 x 2048 tokens per micro-step holds 48 x 160 MiB = 7.5 GiB of them. Offloaded, a layer's input
is copied to pinned host memory on a stream of its own while the layer runs (160 MiB at ~50 GB/s is ~3 ms, under a
first pass of ~20 ms), and copied back one layer ahead of the backward (the layer below's copy starts when a
layer's recomputation starts), so the GPU holds two or three of them instead of all.

The layer's first pass and recomputation are this module's own checkpoint, as torch's reentrant one: the first
pass under no_grad, the recomputation in the backward from the saved input under the first pass's random-number
states (the same dropout masks), backpropagated there (the layer's LoRA gradients accumulate into `.grad` as
autograd's would). The other tensor arguments (rotary tables, masks) are not copied: they are shared by the
layers and not trained. On a CPU the "host copy" is a copy in the same memory (tests run the same bookkeeping).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..moe import recompute
from ..plan.memory import pinned_block_bytes
from . import checkpoint_funcs, host_positions


class _HostCopy:
    """One saved layer input: its host copy, and its device copy once loaded (or prefetched)."""

    def __init__(self, store: HostCheckpoints, t: torch.Tensor, index: int):
        self.store, self.index = store, index
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        if t.device.type != "cuda":
            self.host = t.detach().clone()
            return
        stream = store.stream(t.device)
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # after the kernels that wrote `t`
        with torch.cuda.stream(stream):
            self.host.copy_(t.detach(), non_blocking=True)
        t.record_stream(stream)  # its memory is not reused before the copy has read it

    def fetch(self) -> None:
        """Start the copy back to the device (on the copy stream; `load` waits for it)."""
        if self.device_copy is not None:
            return
        if self.device.type != "cuda":
            self.device_copy = self.host
            return
        current = torch.cuda.current_stream(self.device)
        stream = self.store.stream(self.device)
        self.device_copy = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        stream.wait_stream(current)  # the block may still be read by kernels queued before its allocation
        with torch.cuda.stream(stream):
            self.device_copy.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        self.device_copy.record_stream(stream)

    def load(self) -> torch.Tensor:
        self.fetch()
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        return self.device_copy


class HostCheckpoints:
    """The saved inputs of one model's checkpointed layers, in host memory: a copy stream per device, and the inputs
    saved and not yet loaded, in the order their first passes ran (the backward loads them in reverse). Held
    weakly: a forward whose backward never runs frees its copies with its autograd graph."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[weakref.ref] = []
        self._count = 0
        self.peak_saved_bytes = 0  # the most host bytes held at once (what the run needs of host memory)

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pending(self) -> list[_HostCopy]:
        live = [s for s in (r() for r in self._pending) if s is not None]
        self._pending = [weakref.ref(s) for s in live]
        return live

    def save(self, t: torch.Tensor) -> _HostCopy:
        self._count += 1
        saved = _HostCopy(self, t, self._count)
        live = [*self.pending(), saved]  # (pending() keeps the live ones' references)
        self._pending.append(weakref.ref(saved))
        held = sum(s.host.numel() * s.host.element_size() for s in live)
        self.peak_saved_bytes = max(self.peak_saved_bytes, held)
        return saved

    def load(self, saved: _HostCopy) -> torch.Tensor:
        """`saved` back on its device; the copy of the input saved just before it (the next layer down, which the
        backward reaches next) is started."""
        rest = [s for s in self.pending() if s is not saved]
        self._pending = [weakref.ref(s) for s in rest]
        below = [s for s in rest if s.index < saved.index and s.device == saved.device]
        out = saved.load()
        if below:
            below[-1].fetch()
        return out


@contextlib.contextmanager
def _rng_states(cpu: torch.Tensor, device: torch.device, cuda: torch.Tensor | None) -> Iterator[None]:
    """Run from the random-number states a first pass started from (restored after)."""
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class _Offloaded(torch.autograd.Function):
    """A checkpointed layer with its input saved in host memory. `anchor` requires grad so the output does even
    when the layer's input does not (the first layer); the layer's LoRA weights are not inputs of this node, their
    gradients accumulate in the inner backward."""

    @staticmethod
    def forward(ctx, store: HostCheckpoints, function: Callable, hidden: torch.Tensor, anchor: torch.Tensor):
        ctx.store, ctx.function = store, function
        ctx.device = hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.device.type == "cuda" else None
        ctx.host = host_positions.this_forward()  # the recomputation's masks are decided as the forward's were
        ctx.kept = {}
        with torch.no_grad(), recompute.phases(ctx.kept)[0]:
            out = function(hidden)
        ctx.saved = store.save(hidden)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        need_x = ctx.needs_input_grad[2]
        x = ctx.store.load(ctx.saved).detach().requires_grad_(need_x)
        ctx.saved = None
        kept = {key: list(values) for key, values in ctx.kept.items()}
        with _rng_states(ctx.cpu_rng, ctx.device, ctx.cuda_rng), torch.enable_grad(), \
                recompute.phases(kept)[1], host_positions.restored(ctx.host):
            out = ctx.function(x)
        if out.requires_grad:
            torch.autograd.backward(out, grad)
        return None, None, x.grad if need_x else None, None


class OffloadedCheckpoint:
    """What one layer calls instead of torch's checkpoint (transformers' `_gradient_checkpointing_func`): the
    first pass with its input saved in host memory. Without grad (evaluation) the layer just runs."""

    def __init__(self, store: HostCheckpoints, fallback: Callable):
        self.store, self.fallback = store, fallback
        self._anchor: torch.Tensor | None = None

    def __call__(self, function: Callable, *args: Any):
        if not torch.is_grad_enabled():
            return function(*args)
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):  # not a decoder layer's call: torch's
            return self.fallback(function, *args)
        if self._anchor is None:
            self._anchor = torch.zeros((), requires_grad=True)
        return _Offloaded.apply(self.store, function, args[0], self._anchor)


def install(model: nn.Module, store: HostCheckpoints) -> None:
    """Route every checkpointed layer of `model` (gradient checkpointing enabled first) through `store`."""
    for module, fallback in checkpoint_funcs.checkpointed_modules(model):
        module._gradient_checkpointing_func = OffloadedCheckpoint(store, fallback)


def uninstall(model: nn.Module) -> None:
    checkpoint_funcs.restore(model, OffloadedCheckpoint)


def saved_input_bytes(model: nn.Module, batch: int, seq_len: int) -> int:
    """Pinned host bytes one micro-step's saved layer inputs hold: one [batch, seq_len, hidden] per checkpointed
    layer, each in a block of its own (plan.memory.pinned_block_bytes)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = sum(isinstance(m, GradientCheckpointingLayer)  # (the model module holds the function too, unused)
                 and isinstance(getattr(m, "_gradient_checkpointing_func", None), OffloadedCheckpoint)
                 for m in model.modules())
    emb = model.get_input_embeddings().weight
    dtype = emb.dtype if emb.dtype.is_floating_point else torch.bfloat16
    return layers * pinned_block_bytes(batch * seq_len * model.config.get_text_config().hidden_size * dtype.itemsize)


def check_host_memory(model: nn.Module, batch: int, seq_len: int, ranks_on_host: int = 1) -> str:
    """What offloading needs of host memory, in words; a MoefitError naming the setting when the host has not got
    it (with a fifth of what is available left for everything else)."""
    import psutil

    from ..errors import MoefitError
    from ..train.progress import fmt_bytes

    need = saved_input_bytes(model, batch, seq_len) * ranks_on_host
    available = psutil.virtual_memory().available
    per = f" ({ranks_on_host} processes on this host)" if ranks_on_host > 1 else ""
    if need > 0.8 * available:
        raise MoefitError(f"train.offload_checkpoints: the layers' saved inputs need {fmt_bytes(need)} of host "
                          f"memory per micro-step{per}, and this host has {fmt_bytes(available)} available. Set "
                          f"train.offload_checkpoints: false, or lower train.batch_size / train.max_length.")
    return (f"train.offload_checkpoints: the layers' saved inputs in pinned host memory, {fmt_bytes(need)} per "
            f"micro-step{per} of {fmt_bytes(available)} available; the layers' first passes run eagerly "
            f"(engine.layer_graphs off)")

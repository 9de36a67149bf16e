"""The first pass of every checkpointed decoder layer replayed from a CUDA graph (`engine.layer_graphs`).

At micro-batch 1 the host issuing kernels sets the pace of a step (benchmarks/speed_targets.md): ~560 launches per
Scout layer and micro-step at ~35 us of host time each, about what the GPU spends on them. A checkpointed layer's
first pass builds nothing backward reads (its activations are dropped), and for one input shape it is the same
kernels every micro-step with no host sync (benchmarks/sync_audit.py), so it is captured once and then replayed:
one launch per layer instead of ~170. The recomputation and backward stay eager: in backward the layer is run
again from its saved input with autograd recording and backpropagated (as torch's reentrant checkpoint does),
from the random-number state the replay started from, so its dropout masks are the replay's.

What a replay reads and writes stays where the capture put it: each layer's input is the previous layer's
captured output (the first layer's a buffer the input is copied into), which is what checkpointing saves anyway;
tensor arguments (rotary tables, masks, position ids) are copied into shared buffers once per forward; what the
first pass keeps for the recomputation (moe.recompute.keep) is the capture's own tensors. All graphs of a model
share one private memory pool, which holds one layer's first-pass temporaries (the decoded expert banks) apart
from the eager allocator's: the plan counts it (plan.memory, `layer_graph_pool`).

A call runs eagerly, through torch's checkpoint as without the setting, when a graph cannot stand in: tensors
not on a GPU, a layer whose experts are spread over processes (expert parallelism: its all-to-all reads row counts
on the host), an argument that is not a tensor / number / None, a third input shape per layer, a forward while
an earlier replayed forward's backward may still run, or a failed capture (then for the rest of the run, with the
reason logged). Packed and unpacked batches build other masks; with `masks_as_packed` every mask is built the
packed way (the same masks), so they share one graph per layer.
`stats()` counts each. Data parallelism keeps the graphs, the backward's too: the ranks' LoRA gradients are
summed after the step's last backward (parallel.data_parallel), from the `.grad` a replay accumulates into as
autograd would (tests/graphs_dp_worker.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..devices import cuda_index
from ..moe import recompute
from . import checkpoint_funcs, host_positions

log = logging.getLogger(__name__)

MAX_SHAPES_PER_LAYER = 2  # graphs kept per layer (each holds its own outputs); past it a new shape runs eagerly


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


@contextlib.contextmanager
def _from_rng_state(state: torch.Tensor, device: torch.device) -> Iterator[None]:
    """Run from the random-number state `state` (the one a first pass started from), the state restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _set_rng_state(state, device)
        yield


@contextlib.contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, pool, stream: torch.cuda.Stream) -> Iterator[None]:
    """`torch.cuda.graph(...)`, and on a failed capture the CUDA random-number generator taken out of capture.

    A capture that fails leaves the default generator marked as capturing (its epilogue never ran); every later
    eager draw (the dropout of the recomputation that then runs eagerly) raises "Offset increment outside graph
    capture encountered unexpectedly", and the run the fallback was meant to save dies (seen on an H200,
    2026-12-02, when a backward capture failed). An empty capture ends that state: its prologue and epilogue run."""
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            yield
    except Exception:
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream, capture_error_mode="thread_local"):
                pass
        except Exception as e:  # noqa: BLE001 - the first failure is the one to report
            log.warning("engine.layer_graphs: after a failed capture the generator could not be reset (%s)", e)
        raise


class _Token:
    """Held by the autograd node of one replay: alive while that forward's graph may still be backpropagated."""


class _SharedArgument:
    """A static copy of one tensor argument that several layers' graphs read (the rotary table, a mask)."""

    def __init__(self, source: torch.Tensor):
        self.buffer = source.detach().clone()
        self.source = source  # the tensor last copied in (held: its id cannot be reused)
        self.version = source._version  # ... and its version then (written in place since: copied again)

    def feed(self, source: torch.Tensor) -> None:
        if source is not self.source or source._version != self.version:
            self.buffer.copy_(source)
            self.source, self.version = source, source._version


class _LayerGraph:
    """One layer's captured first pass for one input shape."""

    def __init__(self, owner: LayerGraphs):
        self.owner = owner
        self.graph: torch.cuda.CUDAGraph | None = None
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.arguments: list[_SharedArgument] = []
        self.kept: dict = {}  # what the captured first pass keeps for the recomputation (moe.recompute)
        self.pending: weakref.ref | None = None
        self.static: functools.partial | None = None  # the layer's function reading the static arguments
        self.params: list[nn.Parameter] = []  # the layer's trainable parameters (LoRA), set by its checkpoint
        # engine.backward_graphs: the recomputation and backward captured after the first eager one
        self.backward_graph: torch.cuda.CUDAGraph | None = None
        self.backward_needs_x: bool | None = None
        self.grad: torch.Tensor | None = None  # the output's gradient in, the input's out (shared by the layers)
        self.param_grads: list[torch.Tensor] = []  # the parameters' gradients out (shared by like layers)
        self.used: list[bool] = []  # which parameters the layer's output depends on

    def bind(self, function: functools.partial, hidden: torch.Tensor, sources: list[torch.Tensor]
             ) -> functools.partial:
        """Where this graph's inputs live: the previous layer's captured output (else a copy of `hidden`) and the
        shared copies of the tensor arguments; returns `function` reading those."""
        previous = self.owner.output_of(hidden)
        self.input = previous if previous is not None else hidden.detach().clone()
        self.arguments = [self.owner.shared_argument(s) for s in sources]
        self.static = _with_tensors(function, [a.buffer for a in self.arguments])
        return self.static

    def feed(self, hidden: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
        """Copy this call's inputs where the graph reads them (those already there stay); returns the
        random-number state the first pass starts from."""
        if hidden.data_ptr() != self.input.data_ptr():
            self.input.copy_(hidden)
        for argument, source in zip(self.arguments, sources, strict=True):
            argument.feed(source)
        return _rng_state(hidden.device)

    def capture(self, function: functools.partial, hidden: torch.Tensor, sources: list[torch.Tensor]) -> None:
        owner = self.owner
        static = self.bind(function, hidden, sources)
        stream, device = owner.capture_stream(hidden.device), hidden.device
        rng = torch.cuda.get_rng_state(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad(), recompute.phases({})[0]:
            static(self.input)  # warm-up on the capture stream: lazy initialisation and autotuning happen here
        torch.cuda.set_rng_state(rng, device)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), recompute.phases(self.kept)[0], _capturing(graph, owner.pool(), stream):
            out = static(self.input)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.set_rng_state(rng, device)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the layer returned {type(out).__name__}, not a tensor")
        self.graph, self.output = graph, out

    def replay(self, hidden: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
        """Run the captured first pass on `hidden`; returns the random-number state it started from."""
        rng = self.feed(hidden, sources)
        self.graph.replay()
        return rng

    def awaits_backward(self) -> bool:
        """Replayed for a forward whose backward has not run and may still run (its autograd graph is alive): the
        buffers hold what that backward reads, a replay now would overwrite them."""
        return self.pending is not None and self.pending() is not None

    def kept_for_recomputation(self) -> dict:
        return {key: list(values) for key, values in self.kept.items()}

    # -- engine.backward_graphs
    def _recompute_and_backward(self, host: object, needs_x: bool) -> None:
        """The recomputation from the static input (under whatever random-number state is set: the first pass's),
        backpropagated from `self.grad`: the parameters' gradients into `self.param_grads`, then the input's into
        `self.grad` (after every read of it). Nothing is accumulated into `.grad` here."""
        x = self.input.detach().requires_grad_(needs_x)
        with torch.enable_grad(), recompute.phases(self.kept_for_recomputation())[1], host_positions.restored(host):
            out = self.static(x)
            grads = torch.autograd.grad(out, ([x] if needs_x else []) + self.params, self.grad, allow_unused=True)
        self.used = [g is not None for g in grads[needs_x:]]
        for buffer, g in zip(self.param_grads, grads[needs_x:], strict=True):
            if g is not None:
                buffer.copy_(g)
        if needs_x:
            self.grad.copy_(grads[0])

    def capture_backward(self, rng: torch.Tensor, host: object, needs_x: bool) -> None:
        """Capture the recomputation and backward (after the first eager one, so lazy initialisation is done):
        one warm-up on the capture stream, then the capture into the graphs' shared pool."""
        owner, device = self.owner, self.input.device
        if self.output.shape != self.input.shape or self.output.dtype != self.input.dtype:
            raise ValueError(f"the layer maps {tuple(self.input.shape)} to {tuple(self.output.shape)}")
        self.grad = owner.grad_buffer(self.output)
        self.param_grads = owner.param_grad_buffers(self.params)
        stream = owner.capture_stream(device)
        before = torch.cuda.get_rng_state(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            torch.cuda.set_rng_state(rng, device)
            self._recompute_and_backward(host, needs_x)  # warm-up
        torch.cuda.set_rng_state(rng, device)
        graph = torch.cuda.CUDAGraph()
        with _capturing(graph, owner.pool(), stream):
            self._recompute_and_backward(host, needs_x)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.set_rng_state(before, device)
        self.backward_graph, self.backward_needs_x = graph, needs_x

    def replay_backward(self, grad: torch.Tensor, rng: torch.Tensor, host: object) -> torch.Tensor:
        """The captured recomputation and backward for the output's gradient `grad`, from the random-number state
        the first pass's replay started from (restored after); the parameters' gradients are accumulated into
        their `.grad` as autograd would (the first one taken, the later ones added; a parameter the layer's
        output does not depend on keeps None). Returns the input's gradient: a buffer shared by the layers, which
        the next layer's replay reads as its output's gradient and then overwrites."""
        if grad.data_ptr() != self.grad.data_ptr():
            self.grad.copy_(grad)
        with _from_rng_state(rng, self.input.device):
            self._run_backward(host)
        self.accumulate()
        return self.grad

    def _run_backward(self, host: object) -> None:
        self.backward_graph.replay()

    def accumulate(self) -> None:
        pairs = [(p, g) for p, g, used in zip(self.params, self.param_grads, self.used, strict=True) if used]
        if all(p.grad is not None for p, _ in pairs):
            torch._foreach_add_([p.grad for p, _ in pairs], [g for _, g in pairs])
            return
        for p, g in pairs:
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)


class _EagerStandIn(_LayerGraph):
    """The first pass run eagerly where a replay would be (LayerGraphs(stand_in=True)): everything but the CUDA
    graph itself (static inputs, shared arguments, random-number states, the recomputation and its backward)
    runs as with graphs, so CPU tests check that bookkeeping against torch's checkpoint."""

    def capture(self, function: functools.partial, hidden: torch.Tensor, sources: list[torch.Tensor]) -> None:
        self.bind(function, hidden, sources)
        rng = _rng_state(hidden.device)  # as a capture, it leaves the random-number state as it found it
        with torch.no_grad():
            self.output = self.static(self.input).clone()
        _set_rng_state(rng, hidden.device)

    def replay(self, hidden: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
        rng = self.feed(hidden, sources)
        self.kept = {}
        with torch.no_grad(), recompute.phases(self.kept)[0]:
            self.output.copy_(self.static(self.input))
        return rng

    def capture_backward(self, rng: torch.Tensor, host: object, needs_x: bool) -> None:
        self.grad = self.owner.grad_buffer(self.output)
        self.param_grads = self.owner.param_grad_buffers(self.params)
        self.backward_needs_x = needs_x

    def _run_backward(self, host: object) -> None:
        self._recompute_and_backward(host, self.backward_needs_x)


class _Replayed(torch.autograd.Function):
    """A layer's first pass replayed (forward) and recomputed with autograd recording, then backpropagated
    (backward). `anchor` requires grad so the output does even when the layer's input does not (the first layer):
    the layer's LoRA weights are not inputs of this node, their gradients accumulate in the inner backward."""

    @staticmethod
    def forward(ctx, graph: _LayerGraph, function: functools.partial, sources: list[torch.Tensor],
                hidden: torch.Tensor, anchor: torch.Tensor):
        ctx.graph, ctx.function = graph, function
        ctx.rng = graph.replay(hidden, sources)
        ctx.host = host_positions.this_forward()  # the recomputation's masks are decided as the forward's were
        ctx.token = _Token()
        graph.pending = weakref.ref(ctx.token)
        return graph.output.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        graph = ctx.graph
        graph.pending = None
        need_x = ctx.needs_input_grad[3]
        owner = graph.owner
        if graph.backward_needs_x is not None:  # captured (the stand-in: taken over)
            if need_x == graph.backward_needs_x:
                owner.counts["backward replayed"] += 1
                dx = graph.replay_backward(grad, ctx.rng, ctx.host)
                return None, None, None, dx if need_x else None, None
            owner.eager_backward("another input gradient")
        why = owner.why_backward_eager(graph)
        if why is not None and why != "off":
            owner.eager_backward(why)
        x = graph.input.detach().requires_grad_(need_x)
        with _from_rng_state(ctx.rng, x.device), torch.enable_grad(), \
                recompute.phases(graph.kept_for_recomputation())[1], host_positions.restored(ctx.host):
            out = ctx.function(x)
        if out.requires_grad:
            torch.autograd.backward(out, grad)
        dx = x.grad if need_x else None
        # The recomputed graph goes now: alive, it keeps the LoRA weights' gradient-accumulation nodes of this eager
        # pass, whose stream (the default one) a capture's backward would then have to wait for, which breaks the
        # capture (torch warns of "the AccumulateGrad node's stream"; an H200 call, 2026-12-02).
        del out, x
        if why is None and graph.backward_needs_x is None:  # the first backward ran eagerly: capture the next ones
            try:
                graph.capture_backward(ctx.rng, ctx.host, need_x)
            except Exception as e:  # noqa: BLE001 - any failure: the backward stays eager, and says why
                owner.backward_disabled = f"{type(e).__name__}: {e}"
                log.warning("engine.backward_graphs: capture failed, the backward stays eager (%s)",
                            owner.backward_disabled)
                graph.backward_graph, graph.backward_needs_x = None, None
        return None, None, None, dx, None


class LayerGraphs:
    """The graphs of one model's checkpointed layers, their shared memory pool, and counts of what ran how."""

    def __init__(self, *, stand_in: bool = False, masks_as_packed: bool = True, backward: bool = False):
        """`stand_in`: run each first pass eagerly where a graph would replay (CPU tests of the bookkeeping).
        `masks_as_packed`: the forwards build every mask the packed way (host_positions.as_packed: the same masks)
        so that packed and unpacked batches replay one graph per layer; the trainer turns it off when no training
        row is packed (all one sample at full length: the plain causal masks are faster and one kind anyway).
        `backward` (engine.backward_graphs): each layer's recomputation and backward are captured too, after its
        first eager backward, and replayed."""
        self.stand_in = stand_in
        self.masks_as_packed = masks_as_packed
        self.backward = backward
        self.backward_disabled: str | None = None
        self._grad_buffers: dict[tuple, torch.Tensor] = {}
        self._param_grad_buffers: dict[tuple, list[torch.Tensor]] = {}
        self.graphs: dict[tuple, _LayerGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # data_ptr -> a captured layer output
        self.shared: list[_SharedArgument] = []
        self.counts: Counter = Counter()
        self.disabled: str | None = None
        self.unfinished: list[_LayerGraph] = []  # replayed, their backward not run yet (as of the forward's start)
        self._last_layer = -1
        self._behind_a_backward = False
        self._pool = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._anchor: torch.Tensor | None = None
        self._host_answer: tuple[object, tuple] = (None, ())

    def install(self, model: nn.Module) -> int:
        """Route every checkpointed layer of `model` (transformers' `_gradient_checkpointing_func`, set by
        enabling gradient checkpointing first) through these graphs; returns how many layers."""
        n = 0
        for module, fallback in checkpoint_funcs.checkpointed_modules(model):  # (graphs installed before: replaced)
            module._gradient_checkpointing_func = _LayerCheckpoint(self, n, fallback, module)
            n += 1
        return n

    def uninstall(self, model: nn.Module) -> None:
        """Give every layer of `model` back the checkpoint these graphs stood in for."""
        checkpoint_funcs.restore(model, _LayerCheckpoint)

    def replays_on(self, device: torch.device) -> bool:
        """Whether first passes on `device` may be replayed (a GPU, or the CPU stand-in; graphs not stopped)."""
        return not self.disabled and (self.stand_in or device.type == "cuda")

    def stats(self) -> dict[str, Any]:
        """Captured graphs, replayed layer passes, eager ones by reason, and why graphs stopped (if they did)."""
        out = {"graphs": len(self.graphs),
               "replayed": self.counts["replayed"],
               "eager": {k[6:]: v for k, v in self.counts.items() if k.startswith("eager:")},
               "disabled": self.disabled}
        if self.backward:
            out["backward"] = {"replayed": self.counts["backward replayed"],
                               "eager": {k[15:]: v for k, v in self.counts.items() if k.startswith("eager backward:")},
                               "disabled": self.backward_disabled}
        return out

    # -- used by the layers' graphs
    def pool(self):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def capture_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def output_of(self, hidden: torch.Tensor) -> torch.Tensor | None:
        out = self.outputs.get(hidden.data_ptr())
        return out if out is not None and out.shape == hidden.shape and out.dtype == hidden.dtype else None

    def shared_argument(self, source: torch.Tensor) -> _SharedArgument:
        for argument in self.shared:
            if argument.source is source:
                return argument
        argument = _SharedArgument(source)
        self.shared.append(argument)
        return argument

    def anchor(self) -> torch.Tensor:
        if self._anchor is None:
            self._anchor = torch.zeros((), requires_grad=True)
        return self._anchor

    def host_answer(self) -> tuple:
        """This forward's packed-rows answers from host memory (host_positions): part of what a graph was
        captured for, since the masks the layers build depend on them."""
        known = host_positions.this_forward()
        if known is None:
            return ()
        if self._host_answer[0] is not known:
            self._host_answer = (known, (known.restarts_inside_a_row(), known.breaks_inside_a_row()))
        return self._host_answer[1]

    def behind_a_backward(self, layer: int) -> bool:
        """Whether the forward calling `layer` started while an earlier forward's backward may still run: its
        replays would overwrite what that backward reads (inputs, kept tensors, and what graphs of other shapes
        captured over memory the earlier ones had freed), so it runs eagerly. Layers run in order: a layer
        index not above the last one's starts a forward."""
        if layer <= self._last_layer:
            self.unfinished = [g for g in self.unfinished if g.awaits_backward()]
            self._behind_a_backward = bool(self.unfinished)
        self._last_layer = layer
        return self._behind_a_backward

    def eager(self, reason: str) -> None:
        self.counts["eager:" + reason] += 1

    def eager_backward(self, reason: str) -> None:
        self.counts["eager backward:" + reason] += 1

    def why_backward_eager(self, graph: _LayerGraph) -> str | None:
        """Why `graph`'s recomputation and backward run eagerly this time (None: captured after it, if not yet)."""
        if not self.backward:
            return "off"
        if self.backward_disabled:
            return "disabled"
        return None

    def grad_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """One gradient buffer per shape and dtype, shared by the layers (they run one after another)."""
        key = (tuple(like.shape), like.dtype, like.device)
        if key not in self._grad_buffers:
            self._grad_buffers[key] = torch.zeros_like(like)
        return self._grad_buffers[key]

    def param_grad_buffers(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        key = tuple((tuple(p.shape), p.dtype, p.device) for p in params)
        if key not in self._param_grad_buffers:
            self._param_grad_buffers[key] = [torch.zeros_like(p) for p in params]
        return self._param_grad_buffers[key]


def describe(stats: dict[str, Any]) -> str:
    """`LayerGraphs.stats()` in words, for the trainer's and the bench's last lines."""
    eager = ", ".join(f"{n} {why}" for why, n in stats["eager"].items()) or "none"
    text = (f"{stats['graphs']} captured, {stats['replayed']:,} first passes replayed, eager: {eager}"
            + (f"; stopped: {stats['disabled']}" if stats["disabled"] else ""))
    back = stats.get("backward")
    if back:
        eager = ", ".join(f"{n} {why}" for why, n in back["eager"].items()) or "none"
        text += (f"; backward: {back['replayed']:,} replayed, eager: {eager}"
                 + (f", stopped: {back['disabled']}" if back["disabled"] else ""))
    return text


class _LayerCheckpoint:
    """What one layer calls instead of torch's checkpoint (transformers' `_gradient_checkpointing_func`)."""

    def __init__(self, owner: LayerGraphs, layer: int, fallback: Callable, module: nn.Module):
        self.owner, self.layer, self.fallback = owner, layer, fallback
        self.module = module
        self._collective: bool | None = None

    def exchanges_rows(self) -> bool:
        """The layer sends routed rows to other processes (expert parallelism: its all-to-all needs the row counts
        on the host, a sync no graph can hold)."""
        if self._collective is None:
            self._collective = any(getattr(m, "expert_dispatch", None) is not None for m in self.module.modules())
        return self._collective

    def __call__(self, function: Callable, *args: Any):
        owner = self.owner
        reason = "forward before backward" if owner.behind_a_backward(self.layer) else \
            "expert parallel" if self.exchanges_rows() else _why_eager(owner, function, args)
        if reason is not None:
            owner.eager(reason)
            return self.fallback(function, *args)
        described = _tensors(function)
        if described is None:
            owner.eager("an argument of another type")
            return self.fallback(function, *args)
        hidden = args[0]
        sources, shape = described
        key = (self.layer, _describe(hidden), shape, owner.host_answer())
        graph = owner.graphs.get(key)
        if graph is None:
            if sum(k[0] == self.layer for k in owner.graphs) >= MAX_SHAPES_PER_LAYER:
                owner.eager(f"more than {MAX_SHAPES_PER_LAYER} input shapes")
                return self.fallback(function, *args)
            graph = owner.graphs[key] = (_EagerStandIn if owner.stand_in else _LayerGraph)(owner)
            graph.params = [p for p in self.module.parameters() if p.requires_grad]
            try:
                graph.capture(function, hidden, sources)
                owner.outputs[graph.output.data_ptr()] = graph.output  # the next layer's graph reads it there
            except Exception as e:  # noqa: BLE001 - any failure: this run goes on without graphs, and says why
                owner.disabled = f"layer {self.layer}: {type(e).__name__}: {e}"
                log.warning("engine.layer_graphs: capture failed, the run goes on without graphs (%s)",
                            owner.disabled)
                owner.graphs.clear()
                owner.outputs.clear()
                owner.eager("capture failed")
                return self.fallback(function, *args)
        owner.counts["replayed"] += 1
        owner.unfinished.append(graph)
        return _Replayed.apply(graph, function, sources, hidden, owner.anchor())


def _why_eager(owner: LayerGraphs, function: Callable, args: tuple) -> str | None:
    if owner.disabled:
        return "disabled"
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return "not one tensor argument"
    if not args[0].is_cuda and not owner.stand_in:
        return "not on a GPU"
    if not isinstance(function, functools.partial):
        return "not a partial"
    return None


def _tensors(function: functools.partial) -> tuple[list[torch.Tensor], tuple] | None:
    """The tensor keyword arguments of `function` (in a fixed order) and a description of all of them, or None
    when one is neither a tensor, a tuple of tensors, a number, a string, a bool nor None."""
    sources, shape = [], []
    for name in sorted(function.keywords):
        value = function.keywords[name]
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                sources.append(item)
                shape.append((name, _describe(item)))
            elif item is None or isinstance(item, (bool, int, float, str)):
                shape.append((name, item))
            else:
                return None
    return sources, tuple(shape)


def _describe(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _with_tensors(function: functools.partial, tensors: list[torch.Tensor]) -> functools.partial:
    """`function` with its tensor keyword arguments replaced, in `_tensors`' order, by `tensors`."""
    feed = iter(tensors)
    keywords = {}
    for name in sorted(function.keywords):
        value = function.keywords[name]
        if isinstance(value, (tuple, list)):
            keywords[name] = type(value)(next(feed) if isinstance(v, torch.Tensor) else v for v in value)
        else:
            keywords[name] = next(feed) if isinstance(value, torch.Tensor) else value
    return functools.partial(function.func, *function.args, **keywords)


def graph_pool_bytes(device: torch.device) -> dict[str, int]:
    """The CUDA graphs' private pools now: reserved, and of it what no live tensor holds (the
    replays' temporaries: a replay writes there without the allocator, so peak allocated does not count it; peak
    allocated + this idle part bounds what a replayed step uses)."""
    pools = [s for s in torch.cuda.memory_snapshot()
             if s.get("device") == cuda_index(device) and tuple(s.get("segment_pool_id") or (0, 0)) != (0, 0)]
    reserved = sum(s["total_size"] for s in pools)
    return {"graph_pool_bytes": reserved, "graph_pool_idle_bytes": reserved - sum(s["allocated_size"] for s in pools)}

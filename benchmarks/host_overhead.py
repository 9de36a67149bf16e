"""Host work per decoder layer per pass (forward, recompute under gradient checkpointing, backward) of a QLoRA
micro-step, for each MoE family: what the CPU does to issue one layer's kernels, apart from the kernels themselves.

    python benchmarks/host_overhead.py                                # CPU: five families, tiny widths
    python benchmarks/host_overhead.py --families qwen3 --detail 40   # + the 40 commonest ops of each pass
    python benchmarks/host_overhead.py --device cuda --width real --layers 4 --json out.json   # on a GPU

Two measurements of the same training code path (moefit.bench.build_synthetic_model, LoRA, gradient
checkpointing, the trainer's forward / backward):

- **Counts** (one instrumented micro-step): aten ops dispatched (each is about one kernel launch on CUDA; views
  and allocations launch nothing and are counted apart), autograd nodes built in the forward, tensors saved for
  backward, and Python function calls, per decoder layer and pass, by category (where in the layer: attention
  projections, routing, routed experts' frozen matmuls, their LoRA, ...). An op is attributed to the layer and
  module running when it is dispatched; in backward, to the autograd node it runs for, which was tagged with its
  layer and module when the forward built it.
- **Host time** (uninstrumented micro-steps, no device sync): forward and recompute per layer from timestamps at
  the checkpointed function's start and end; backward per layer from gradient hooks on the layer outputs (the
  time between the gradient of layer i's output and that of layer i-1's output, less layer i's recompute).

On CPU the GPU's code path is run by `--grouped-on-cpu` (default on): the routed experts decode a whole bank and
call torch._grouped_mm exactly as on CUDA (moefit.moe.grouped.GROUPED_ON_CPU), so the op sequence is the GPU's.
`--stub-kernels` (default on CPU) replaces the heavy CPU kernels (NF4 decode, grouped GEMM) by an empty tensor of
the result's shape, still dispatched, so that what is timed is the host's work and not CPU arithmetic that the
GPU does in microseconds. On CUDA nothing is stubbed; the host timestamps are taken without synchronizing, so
they measure the issuing of the kernels (as long as the GPU keeps up, which a host-bound step means it does).

Reported per MoE layer (the mean over the model's MoE layers after the first; dense layers are left out).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> (preset, LoRA rank, routed-expert rank): the ranks of benchmarks/families.md (Scout: the seed recipe)
FAMILIES = {
    "qwen3": ("qwen3-30b-a3b", 16, 4),
    "scout": ("llama4-scout", 32, 32),
    "gpt-oss": ("gpt-oss-20b", 16, 16),
    "mixtral": ("mixtral-8x7b", 16, 16),
    "glm": ("glm-4.5-air", 16, 16),
}
# Tiny widths with every expert, top-k and routing rule of the real model kept. Each expert slice and attention
# weight holds a multiple of 256 NF4 blocks, as the real ones do (the same decode path).
TINY = dict(hidden_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            intermediate_size_mlp=128, moe_intermediate_size=64, vocab_size=512)
EXPERT_INTERMEDIATE = {"llama4_text": "intermediate_size", "gpt_oss": "intermediate_size",
                       "mixtral": "intermediate_size"}  # families whose routed width is `intermediate_size`
PASSES = ("forward", "recompute", "backward")
VIEW_OPS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "slice", "select", "unsqueeze",
            "squeeze", "expand", "as_strided", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind",
            "narrow", "diagonal", "view_as", "_reshape_alias", "unflatten", "flatten", "movedim", "lift_fresh",
            "_to_copy_view", "numpy_T", "real", "imag", "_neg_view", "_conj",
            # allocations: the caching allocator, no kernel on CUDA
            "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


# ----------------------------------------------------------------------------------------------------- the model

def tiny_config_dir(preset: str, out: Path, width: str) -> str:
    """The preset's config.json, widths shrunk (width='tiny') or as is ('real'), in `out`; returns its path."""
    from moefit.plan.model_facts import resolve_config_path

    values = json.loads(resolve_config_path(preset).read_text())
    text = values.get("text_config", values) if "text_config" in values else values
    if width == "tiny":
        expert_key = EXPERT_INTERMEDIATE.get(text.get("model_type"), "moe_intermediate_size")
        for key, value in TINY.items():
            if key in text:
                text[key] = value
        text[expert_key] = TINY["moe_intermediate_size"]
        for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
            if text.get(key) is not None:
                text[key] = value
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(text))
    return str(out)


def build(family: str, *, layers: int, width: str, device: str, dropout: float, tmp: Path):
    from moefit.bench import build_synthetic_model
    from moefit.config import LoraConfig

    preset, r, expert_r = FAMILIES[family]
    path = tiny_config_dir(preset, tmp / family, width)
    config = json.loads(Path(path, "config.json").read_text())
    dense_first = int(config.get("first_k_dense_replace", 0) or 0)
    lora = LoraConfig(r=r, alpha=2.0 * r, expert_r=expert_r, dropout=dropout)
    model = build_synthetic_model(path, num_layers=layers + dense_first, lora=lora, device=device,
                                  dtype=torch.bfloat16)
    model.enable_gradient_checkpointing()
    model.train()
    return model


def decoder_layers(model) -> list:
    return list(model.hf.model.layers)


def moe_layer_indices(model) -> list[int]:
    from moefit.moe.block import MoefitMoE

    return [i for i, layer in enumerate(decoder_layers(model))
            if any(isinstance(m, MoefitMoE) for m in layer.modules())]


def micro_step(model, ids: torch.Tensor) -> None:
    out = model(ids.to(model.input_device), labels=ids.to(model.device))
    out.loss.backward()


# -------------------------------------------------------------------------------------------- layer and pass context

class LayerContext:
    """Wraps each decoder layer's checkpointed function so that both its first pass and its recomputation say
    which layer runs (module hooks on the layer itself run outside the checkpoint in recent transformers)."""

    def __init__(self, model, on_enter=None, on_exit=None):
        self.stack: list[tuple[int, str]] = []
        self.on_enter, self.on_exit = on_enter, on_exit
        self.saved = []
        for i, layer in enumerate(decoder_layers(model)):
            fn = getattr(layer, "_gradient_checkpointing_func", None)
            if fn is None:
                raise SystemExit("host_overhead: the decoder layers are not checkpointed")
            self.saved.append((layer, fn))
            layer._gradient_checkpointing_func = self._wrap(i, fn)

    def _wrap(self, index: int, checkpoint_fn):
        def checkpointed(fn, *args, **kwargs):
            def body(*a, **k):
                phase = "recompute" if torch._C._current_autograd_node() is not None else "forward"
                self.stack.append((index, phase))
                if self.on_enter:
                    self.on_enter(index, phase, a)
                out = None
                try:
                    out = fn(*a, **k)
                    return out
                finally:  # (the recomputation ends early, by an exception, once it has what backward needs)
                    self.stack.pop()
                    if self.on_exit:
                        self.on_exit(index, phase, out)
            return checkpoint_fn(body, *args, **kwargs)
        return checkpointed

    def current(self) -> tuple[int, str] | None:
        return self.stack[-1] if self.stack else None

    def close(self) -> None:
        for layer, fn in self.saved:
            layer._gradient_checkpointing_func = fn


# ------------------------------------------------------------------------------------------------------ categories

def module_areas(model) -> dict[int, tuple[str, str]]:
    """id(module) -> (area, default sub-category) for the modules whose ops are told apart."""
    from moefit.models.layers import MoefitLinear
    from moefit.moe.block import MoefitMoE
    from moefit.moe.experts import MoefitExperts

    areas = {}
    for name, m in model.hf.model.layers.named_modules():
        if isinstance(m, MoefitLinear):
            where = "attn" if "attn" in name else "shared" if "shared" in name else "mlp"
            areas[id(m)] = (where, "lora")
        elif isinstance(m, MoefitExperts):
            areas[id(m)] = ("experts", "glue")
        elif isinstance(m, MoefitMoE):
            areas[id(m)] = ("moe", "route+dispatch")
        elif type(m).__name__.endswith("RMSNorm"):
            areas[id(m)] = ("norm", "")
        elif name.endswith(("self_attn", "attention")):
            areas[id(m)] = ("attn", "core")
        elif name.count(".") == 0 and name:
            areas[id(m)] = ("layer", "residual")
        elif name.endswith(("shared_expert", "shared_experts", "mlp", "feed_forward")):  # the MLP itself
            areas[id(m)] = ("shared" if "shared" in name else "mlp", "act")
    return areas


# innermost-first: a frame whose qualified name starts with one of these decides the sub-category
FRAME_SUBS = (("NF4Weight.", "decode"), ("FrozenWeight.dequantize", "decode"),
              ("_GroupedMM.", "lora"), ("_GroupedLoRA.", "lora"), ("grouped_matmul", "lora"),
              ("grouped_lora", "lora"), ("MoefitExperts._lora", "lora"),
              ("_FrozenExpertMatmul.", "frozen"), ("_KnownFrozenExpertMatmul.", "frozen"), ("_apply", "frozen"),
              ("frozen_expert_matmul", "frozen"), ("_FrozenLinear.", "frozen"), ("frozen_linear", "frozen"),
              ("_Discarded.", "frozen"), ("MoefitExperts._frozen", "frozen"),
              ("RoutingRule.route", "route"))
FRAME_STOPS = ("MoefitExperts.forward", "MoefitLinear.forward", "MoefitMoE.forward", "checkpoint")


def frame_sub() -> str | None:
    f = sys._getframe(2)
    for _ in range(40):
        if f is None:
            return None
        q = getattr(f.f_code, "co_qualname", f.f_code.co_name)
        if q.startswith(FRAME_STOPS):
            return None
        for prefix, sub in FRAME_SUBS:
            if q.startswith(prefix):
                return sub
        f = f.f_back
    return None


class Categorizer:
    def __init__(self, model, layers: LayerContext):
        self.areas = module_areas(model)
        self.layers = layers
        self.stack: list[int] = []
        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
                        torch.nn.modules.module.register_module_forward_hook(self._post)]

    def _pre(self, module, args):
        if id(module) in self.areas:
            self.stack.append(id(module))

    def _post(self, module, args, out):
        if id(module) in self.areas and self.stack and self.stack[-1] == id(module):
            self.stack.pop()

    def forward_category(self) -> str:
        if not self.stack:
            return "layer.residual"
        area, sub = self.areas[self.stack[-1]]
        if area in ("attn", "shared", "mlp", "experts") and sub not in ("core",):
            sub = frame_sub() or sub
        return f"{area}.{sub}" if sub else area

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class NodeTagger(torch.overrides.TorchFunctionMode):
    """Tags each autograd node the first pass builds with (layer, category) in its metadata, so backward's ops
    can be attributed to where their forward ran: the nodes of torch functions as they return, those of custom
    autograd Functions (which no function mode sees) as `Function.apply` returns."""

    def __init__(self, layers: LayerContext, cats: Categorizer, counts):
        super().__init__()
        self.layers, self.cats, self.counts = layers, cats, counts
        self.original_apply = torch.autograd.Function.__dict__["apply"]  # the classmethod itself

    def __enter__(self):
        original, tagger = self.original_apply.__func__, self

        def apply(cls, *args, **kwargs):
            out = original(cls, *args, **kwargs)
            tagger.tag(out)
            return out

        torch.autograd.Function.apply = classmethod(apply)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.autograd.Function.apply = self.original_apply
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tag(out)
        return out

    def tag(self, out) -> None:
        ctx = self.layers.current()
        if ctx is not None and ctx[1] == "forward":
            tag = (ctx[0], self.cats.forward_category())
            todo = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
            while todo:
                node = todo.pop()
                if node is None or "host_tag" in node.metadata:
                    continue
                node.metadata["host_tag"] = tag
                self.counts[(ctx[0], "forward", "autograd nodes")] += 1
                todo.extend(n for n, _ in node.next_functions)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


class OpCounter(TorchDispatchMode):
    def __init__(self, layers: LayerContext, cats: Categorizer, counts, detail):
        super().__init__()
        self.layers, self.cats, self.counts, self.detail = layers, cats, counts, detail

    def where(self) -> tuple[int | None, str, str]:
        ctx = self.layers.current()
        if ctx is not None:
            return ctx[0], ctx[1], self.cats.forward_category()
        node = torch._C._current_autograd_node()
        if node is None:
            return None, "forward", "outside"
        layer, cat = node.metadata.get("host_tag", (None, "outside"))
        area = cat.split(".")[0]
        if area in ("attn", "shared", "mlp", "experts"):
            sub = frame_sub()
            if sub is not None:
                cat = f"{area}.{sub}"
        return layer, "backward", cat

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        layer, phase, cat = self.where()
        name = func.overloadpacket.__name__
        kind = "view" if name in VIEW_OPS else "op"
        self.counts[(layer, phase, f"{kind}:{cat}")] += 1
        self.detail[(layer, phase, name)] += 1
        return func(*args, **(kwargs or {}))


class PyCalls:
    """Python function calls (sys.setprofile 'call' events, this file's own functions left out), per layer and
    pass: forward and recompute by the layer context, backward by the gradient hooks on the layer outputs (layer
    i's backward runs from the gradient of its output to that of its input)."""

    def __init__(self, model, counts):
        self.counts = counts
        self.backward_layer: int | None = None
        self.layers = LayerContext(model, on_exit=self._exit)

    def _exit(self, i, phase, out):
        t = out[0] if isinstance(out, tuple) else out
        if phase == "forward" and isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g, i=i: setattr(self, "backward_layer", i))

    def __call__(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename != __file__:
            ctx = self.layers.current()
            if ctx is None:
                ctx = (self.backward_layer, "backward" if torch._C._current_autograd_node() is not None
                       else "forward")
            self.counts[(*ctx, "python calls")] += 1

    def __enter__(self):
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        self.layers.close()


def py_calls_step(model, ids, counts) -> None:
    with torch.autograd.set_multithreading_enabled(False), PyCalls(model, counts):
        micro_step(model, ids)


@contextlib.contextmanager
def _causal_bias_outside_modes():
    """torch's CausalBias (gpt-oss's sink attention) is a Tensor subclass that cannot be made under a dispatch
    mode: make it outside."""
    from torch.nn.attention import bias
    from torch.utils._python_dispatch import _disable_current_modes

    original = bias.causal_lower_right

    def causal_lower_right(*args):
        with _disable_current_modes():
            return original(*args)

    bias.causal_lower_right = causal_lower_right
    try:
        yield
    finally:
        bias.causal_lower_right = original


@contextlib.contextmanager
def _counting_saved_tensors(layers: LayerContext, cats: Categorizer, counts):
    """Counts the tensors each layer's first pass saves for backward: checkpointing packs each one there, again in
    the recomputation, and unpacks it in backward, in Python (torch.utils.checkpoint's hooks). Counted through
    the metadata function its pack hook calls once per saved tensor."""
    from torch.utils import checkpoint

    table = checkpoint._allowed_determinism_checks_to_fns
    original = table["default"]

    def metadata(x):
        ctx = layers.current()
        layer = ctx[0] if ctx else None
        counts[(layer, "forward", "saved tensors")] += 1
        counts[(layer, "forward", f"saved:{cats.forward_category()}")] += 1
        return original(x)

    table["default"] = metadata
    try:
        yield
    finally:
        table["default"] = original


def count_step(model, ids) -> tuple[dict, dict]:
    counts: collections.Counter = collections.Counter()
    detail: collections.Counter = collections.Counter()
    layers = LayerContext(model)
    cats = Categorizer(model, layers)
    ops = OpCounter(layers, cats, counts, detail)
    try:
        # backward on the calling thread (on CUDA it otherwise runs on the device's own autograd thread, which
        # sys.setprofile does not see)
        with torch.autograd.set_multithreading_enabled(False), _causal_bias_outside_modes(), \
                _counting_saved_tensors(layers, cats, counts), NodeTagger(layers, cats, counts), ops:
            micro_step(model, ids)
    finally:
        cats.close()
        layers.close()
    return counts, detail


# -------------------------------------------------------------------------------------------------------- timing

def time_steps(model, ids, steps: int, clock=time.perf_counter) -> dict[int, dict[str, list[float]]]:
    """Host seconds per layer and pass over `steps` micro-steps (no device sync inside a step). `clock`: on CPU
    time.thread_time (this thread's CPU time: other processes sharing the cores do not count; backward of a CPU
    graph runs on this thread too), on CUDA wall time."""
    times: dict[int, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    start: dict[tuple[int, str], float] = {}
    grad_at: dict[int, float] = {}

    def enter(i, phase, args):
        start[(i, phase)] = clock()

    def leave(i, phase, out):
        now = clock()
        times[i][phase].append(now - start[(i, phase)])
        if phase == "forward":
            t = out[0] if isinstance(out, tuple) else out
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g, i=i: grad_at.__setitem__(i, clock()))

    layers = LayerContext(model, on_enter=enter, on_exit=leave)
    cuda = ids.device.type == "cuda" or model.device.type == "cuda"
    try:
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            grad_at.clear()
            micro_step(model, ids)
            n = len(decoder_layers(model))
            for i in range(1, n):
                if i in grad_at and i - 1 in grad_at:
                    recompute = times[i]["recompute"][-1] if times[i]["recompute"] else 0.0
                    times[i]["backward"].append(grad_at[i - 1] - grad_at[i] - recompute)
    finally:
        layers.close()
        if cuda:
            torch.cuda.synchronize()
    return times


# ---------------------------------------------------------------------------------------------------- kernel stubs

@contextlib.contextmanager
def stubbed_kernels():
    """CPU only, for the timed steps: the kernels that do arithmetic (NF4 decode, grouped and dense GEMMs, flash
    attention, dropout's random mask) return zeros (ones for the mask) of their result's shape, still one
    dispatched op each, so that the CPU's bf16 arithmetic, which the GPU does in microseconds, is not timed as host
    work. (Zeros keep denormals out of what follows; the decoded weights, which only stubbed GEMMs read, are left
    uninitialized: no memset of whole banks.)"""
    import warnings

    import moefit.quant.nf4  # noqa: F401  (registers bitsandbytes' ops)

    z, e = torch.zeros, torch.empty

    def grouped_mm(a, b, offs=None, bias=None, out_dtype=None):
        shape = (a.shape[0], b.shape[-1]) if b.dim() == 3 else (offs.shape[0], a.shape[0], b.shape[-1])
        return z(shape, dtype=out_dtype or a.dtype)

    def flash(q, k, v, dropout_p=0.0, is_causal=False, attn_mask=None, scale=None):
        b, h, n, _ = q.shape
        return (z(b, n, h, v.shape[-1], dtype=q.dtype).transpose(1, 2), z(b, h, n, dtype=torch.float32))

    def flash_backward(grad, q, k, v, out, lse, dropout_p, is_causal, attn_mask=None, scale=None):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    stubs = {
        ("bitsandbytes", "dequantize_4bit"): lambda A, absmax, bs, qt, shape, dtype: e(shape, dtype=dtype),
        ("bitsandbytes", "dequantize_blockwise"): lambda A, absmax, code, bs, dtype: e(A.shape, dtype=dtype),
        ("aten", "_grouped_mm"): grouped_mm,
        ("aten", "mm"): lambda a, b: z(a.shape[0], b.shape[1], dtype=a.dtype),
        ("aten", "addmm"): lambda c, a, b, beta=1, alpha=1: z(a.shape[0], b.shape[1], dtype=a.dtype),
        ("aten", "bmm"): lambda a, b: z(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype),
        ("aten", "bernoulli_.float"): lambda self, p=0.5, generator=None: self.fill_(1.0),
        ("aten", "_scaled_dot_product_flash_attention_for_cpu"): flash,
        ("aten", "_scaled_dot_product_flash_attention_for_cpu_backward"): flash_backward,
    }
    libs = {ns: torch.library.Library(ns, "IMPL") for ns in ("bitsandbytes", "aten")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for (ns, op), fn in stubs.items():
            libs[ns].impl(op, fn, "CPU")
    try:
        yield
    finally:
        for lib in libs.values():
            lib._destroy()


# ------------------------------------------------------------------------------------------------------- report

def summarize(counts, detail, times, moe_layers: list[int]) -> dict:
    measured = [i for i in moe_layers if i > 0] or moe_layers
    per_pass: dict[str, dict] = {}
    for phase in PASSES:
        cats: dict[str, float] = collections.defaultdict(float)
        for (layer, ph, key), n in counts.items():
            if layer in measured and ph == phase:
                cats[key] += n / len(measured)
        ops = {k.split(":", 1)[1]: v for k, v in cats.items() if k.startswith("op:")}
        views = sum(v for k, v in cats.items() if k.startswith("view:"))
        ms = [statistics.median(times[i][phase]) * 1e3 for i in measured if times.get(i, {}).get(phase)]
        top = collections.Counter()
        for (layer, ph, name), n in detail.items():
            if layer in measured and ph == phase:
                top[name] += n / len(measured)
        saved = {k.split(":", 1)[1]: v for k, v in cats.items() if k.startswith("saved:")}
        per_pass[phase] = {"ops": sum(ops.values()), "views": views, "ops_by_category": dict(sorted(ops.items())),
                           "saved_by_category": dict(sorted(saved.items())),
                           "python_calls": cats.get("python calls", 0.0),
                           "autograd_nodes": cats.get("autograd nodes", 0.0),
                           "saved_tensors": cats.get("saved tensors", 0.0),
                           "host_ms": statistics.mean(ms) if ms else None,
                           "top_ops": dict(top.most_common())}
    outside = sum(n for (layer, _, key), n in counts.items() if layer is None and key.startswith("op:"))
    total_ms = sum(p["host_ms"] or 0.0 for p in per_pass.values())
    return {"layers_measured": measured, "passes": per_pass, "ops_outside_layers": outside,
            "host_ms_per_layer": total_ms, "ops_per_layer": sum(p["ops"] for p in per_pass.values())}


def print_family(name: str, res: dict, detail_n: int) -> None:
    p = res["passes"]
    print(f"\n== {name}: per MoE layer (layers {res['layers_measured']}), {res['ops_per_layer']:.0f} ops, "
          f"{res['host_ms_per_layer']:.2f} host ms over the three passes")
    cats = sorted({c for ph in PASSES for c in p[ph]["ops_by_category"]})
    print(f"  {'':28s}" + "".join(f"{ph:>11s}" for ph in PASSES))
    for c in cats:
        print(f"  {c:28s}" + "".join(f"{p[ph]['ops_by_category'].get(c, 0):11.1f}" for ph in PASSES))
    for label, key, fmt in (("ops (launch-like)", "ops", "{:11.1f}"), ("views, allocations", "views", "{:11.1f}"),
                            ("autograd nodes built", "autograd_nodes", "{:11.1f}"),
                            ("tensors saved (checkpoint)", "saved_tensors", "{:11.1f}"),
                            ("python calls", "python_calls", "{:11.0f}"), ("host ms", "host_ms", "{:11.3f}")):
        print(f"  {label:28s}" + "".join(fmt.format(p[ph][key]) if p[ph][key] is not None else f"{'-':>11s}"
                                         for ph in PASSES))
    if detail_n:
        print("  tensors saved by part: " + ", ".join(f"{k} {v:.0f}"
                                                   for k, v in p["forward"]["saved_by_category"].items()))
        for ph in PASSES:
            top = list(p[ph]["top_ops"].items())[:detail_n]
            print(f"  {ph} ops: " + ", ".join(f"{k} {v:.0f}" for k, v in top))


def _run(args, grouped) -> dict:
    from moefit.train.metrics import versions

    cpu = not args.device.startswith("cuda")
    grouped.GROUPED_ON_CPU = cpu and not args.no_grouped_on_cpu
    stub = cpu and not args.no_stub_kernels and grouped.GROUPED_ON_CPU
    results = {"command": args.command, "device": args.device,
               "device_name": torch.cuda.get_device_name(args.device) if not cpu else "cpu",
               "width": args.width, "seq_len": args.seq_len, "dropout": args.dropout, "engine": args.engine, "grouped_on_cpu":
               grouped.GROUPED_ON_CPU, "stub_kernels": stub, "threads": args.threads, "versions": versions(),
               "clock": "thread_time" if cpu else "perf_counter", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "families": {}}
    print(f"host_overhead: {args.device}, {args.width} widths, seq {args.seq_len}, LoRA dropout {args.dropout}, "
          f"grouped-on-cpu {grouped.GROUPED_ON_CPU}, stub kernels {stub}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families.split(","):
            torch.manual_seed(0)
            model = build(name, layers=args.layers, width=args.width, device=args.device, dropout=args.dropout,
                          tmp=Path(tmp))
            ids = torch.randint(3, model.config.vocab_size, (1, args.seq_len),
                                generator=torch.Generator().manual_seed(0))
            counts, detail = collections.Counter(), collections.Counter()
            if not args.no_counts:  # (real kernels: a stub's own ops would be counted)
                counts, detail = count_step(model, ids)
            with stubbed_kernels() if stub else contextlib.nullcontext():
                for _ in range(2):
                    micro_step(model, ids)
                times = time_steps(model, ids, args.steps, time.thread_time if cpu else time.perf_counter)
                if not args.no_counts:
                    py_calls_step(model, ids, counts)
            res = summarize(counts, detail, times, moe_layer_indices(model))
            results["families"][name] = res
            print_family(name, res, args.detail)
            del model
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--layers", type=int, default=3, help="MoE layers built (GLM-4.5 adds its dense first layer)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (moefit bench's default: 0.05)")
    ap.add_argument("--steps", type=int, default=5, help="timed micro-steps (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--no-grouped-on-cpu", action="store_true", help="CPU: the per-expert loop path instead")
    ap.add_argument("--no-stub-kernels", action="store_true", help="CPU: real NF4 decode and grouped GEMMs")
    ap.add_argument("--no-counts", action="store_true", help="time only")
    ap.add_argument("--detail", type=int, default=0, help="print the N commonest ops of each pass")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine setting for the whole run, e.g. --engine rms_norm=fused (moefit bench's flag)")
    args = ap.parse_args(argv)
    args.command = " ".join(["python benchmarks/host_overhead.py", *(sys.argv[1:] if argv is None else argv)])

    import moefit.moe.grouped as grouped
    from moefit import engine_switches

    threads, flag = torch.get_num_threads(), grouped.GROUPED_ON_CPU
    torch.set_num_threads(args.threads)
    previous = engine_switches.use(engine_switches.parse(args.engine))
    try:
        _run(args, grouped)
    finally:
        torch.set_num_threads(threads)
        grouped.GROUPED_ON_CPU = flag
        engine_switches.use(previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

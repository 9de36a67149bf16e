"""transformers' RMS norms computed by `torch.nn.functional.rms_norm` (`engine.rms_norm: fused`).

transformers writes each family's RMSNorm as elementwise ops: a cast to fp32, pow, mean, add, rsqrt, mul, a cast
back and the weight: about 8 kernels forward and 14 backward on CUDA, each a launch the host must issue (a Qwen3
MoE layer runs four such norms: a fifth of its kernels). `F.rms_norm` is one op; on CUDA torch runs it as one
fused kernel forward and one backward, computing in fp32 for a bf16 input.

The families differ in where the weight goes: most cast the normalized fp32 values to the input dtype and then
multiply by the weight (Llama, Llama 4, Qwen3, Mixtral, GLM-4.5, DeepSeek-V3); gpt-oss multiplies in fp32 and
casts after; Llama 4's qk-norm has no weight. Which form a norm class uses is not read off its name: each
candidate is run against the class's own forward on a probe input (bf16 and fp32, on the CPU, where
F.rms_norm is the same ops in the same order) and the class is replaced only by a form that gives the same bits
there. On CUDA the fused kernel sums the squares in another order, so the values agree to rounding, not to the
bit.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NORM_CLASS = re.compile(r"(RMS|L2)Norm$")
FORMS = ("no_weight", "weight_after_cast", "weight_before_cast")
_form_of_class: dict[tuple[type, float, bool], str | None] = {}


class FusedRMSNorm(nn.Module):
    """y = RMSNorm(x) as the replaced module computes it (`form`), in one F.rms_norm call. Keeps the replaced
    module's `weight` parameter (the checkpoint fills it by the same name)."""

    def __init__(self, weight: nn.Parameter | None, eps: float, form: str):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown RMSNorm form {form!r}")
        self.weight = weight
        self.eps = float(eps)
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(self.form, x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, form={self.form}"


def _apply(form: str, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    shape = (x.shape[-1],)
    if form == "no_weight":
        return F.rms_norm(x, shape, None, eps)
    if form == "weight_after_cast":
        return weight * F.rms_norm(x, shape, None, eps)
    return F.rms_norm(x.float(), shape, weight.float(), eps).to(x.dtype)


def _eps_of(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _weight_of(module: nn.Module) -> nn.Parameter | None:
    w = getattr(module, "weight", None)
    return w if isinstance(w, nn.Parameter) and w.dim() == 1 else None


def form_of(module: nn.Module) -> str | None:
    """The form of `module`'s norm that F.rms_norm reproduces bit for bit on the CPU, or None (then it is not
    replaced). Probed once per (class, eps, has weight)."""
    eps, weight = _eps_of(module), _weight_of(module)
    if eps is None or (weight is None and getattr(module, "weight", None) is not None):
        return None
    key = (type(module), eps, weight is not None)
    if key not in _form_of_class:
        _form_of_class[key] = _probe(module, eps, weight)
    return _form_of_class[key]


def _probe(module: nn.Module, eps: float, weight: nn.Parameter | None) -> str | None:
    width = weight.shape[0] if weight is not None else 64
    probe = copy.deepcopy(module)
    if weight is not None:
        probe.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    candidates = ("weight_after_cast", "weight_before_cast") if weight is not None else ("no_weight",)
    for form in candidates:
        if all(_same(probe, form, eps, dtype, width, gen) for dtype in (torch.bfloat16, torch.float32)):
            return form
    return None


def _same(probe: nn.Module, form: str, eps: float, dtype: torch.dtype, width: int, gen: torch.Generator) -> bool:
    if _weight_of(probe) is not None:
        probe.to(dtype)
        with torch.no_grad():
            probe.weight.copy_(1 + 0.1 * torch.randn(width, generator=gen))
    x = (3 * torch.randn(8, width, generator=gen)).to(dtype)
    with torch.no_grad():
        want = probe(x)
        got = _apply(form, x, _weight_of(probe), eps)
    return want.dtype == got.dtype and torch.equal(want, got)


def replace_rms_norms(model: nn.Module, report: Callable[[str], None] | None = None) -> int:
    """Every RMS / L2 norm of `model` whose form F.rms_norm reproduces -> FusedRMSNorm; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedRMSNorm) or not NORM_CLASS.search(type(module).__name__):
            continue
        form = form_of(module)
        if form is None:
            if report is not None:
                report(f"{name} ({type(module).__name__}) kept: F.rms_norm does not reproduce it")
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                FusedRMSNorm(_weight_of(module), _eps_of(module), form))
        count += 1
    return count

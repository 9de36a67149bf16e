"""Minimum / recommended / ideal hardware for a run, as the seed's post-mortem wanted it stated up front.

- minimum: the cheapest single GPU (per hour) on which the run fits at all;
- recommended: the single GPU with the lowest cost per run among those that keep at least
  RECOMMENDED_MARGIN of their memory free at the peak (room for the allocator's surprises);
- ideal: the fastest single GPU with that margin, on IDEAL_GPUS of them in data parallel (each holds the model).
"""

from __future__ import annotations

from dataclasses import dataclass

RECOMMENDED_MARGIN = 0.10
IDEAL_GPUS = 8


@dataclass
class HardwareChoice:
    tier: str
    gpu: str
    label: str
    num_gpus: int
    margin_bytes: int
    run_hours: float | None
    cost_usd: float | None
    why: str


def _margin_ok(fit) -> bool:
    return fit.fits and fit.margin_bytes >= RECOMMENDED_MARGIN * fit.gpu.memory_bytes


def choose_hardware(fits: list, ideal_fit=None, group: int = 1) -> list[HardwareChoice]:
    """`fits`: GpuFit per catalogue GPU on `group` GPUs (1, or the expert-parallel group a run needs at least);
    `ideal_fit`: callable(gpu_name, n) -> GpuFit on n GPUs."""
    out: list[HardwareChoice] = []
    ok = [f for f in fits if f.fits]
    if not ok:
        return out

    def choice(tier: str, f, why: str, n: int = group) -> HardwareChoice:
        return HardwareChoice(tier, f.gpu.name, f.gpu.label, n, f.margin_bytes, f.run_hours, f.cost_usd, why)

    priced = [f for f in ok if f.gpu.usd_per_hour is not None]
    cheapest = min(priced, key=lambda f: f.gpu.usd_per_hour) if priced else min(ok, key=lambda f: f.gpu.memory_bytes)
    out.append(choice("minimum", cheapest, "cheapest GPU per hour on which it fits"
                      + ("" if _margin_ok(cheapest) else " (thin margin: risky)")))
    safe = [f for f in ok if _margin_ok(f)]
    if safe:
        costed = [f for f in safe if f.cost_usd is not None]
        rec = min(costed, key=lambda f: f.cost_usd) if costed else min(safe, key=lambda f: f.gpu.memory_bytes)
        out.append(choice("recommended", rec, f"lowest cost per run with >= {RECOMMENDED_MARGIN:.0%} memory free"))
        timed = [f for f in safe if f.step is not None]
        if timed and ideal_fit is not None:
            fastest = max(timed, key=lambda f: f.step.tokens_per_s)
            n = max(IDEAL_GPUS // group, 1) * group
            multi = ideal_fit(fastest.gpu.name, n)
            out.append(choice("ideal", multi, f"fastest GPU with margin, {n} in data parallel", n))
    return out

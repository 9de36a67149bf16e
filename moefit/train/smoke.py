"""The smoke run's verdict: a few steps before the long run, failing loudly when the loss does not fall,
when a loss is NaN, or when memory goes past the limit (the seed's lesson: test before renting for days)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .progress import fmt_bytes


@dataclass
class SmokeCheck:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


@dataclass
class SmokeResult:
    checks: list[SmokeCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def lines(self) -> list[str]:
        return [c.line() for c in self.checks]

    def failure_message(self) -> str:
        failed = [c for c in self.checks if not c.passed]
        return "smoke run failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failed) + "."

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [c.__dict__ for c in self.checks]}

    @classmethod
    def from_dict(cls, d: dict) -> SmokeResult:
        """The verdict as report.json holds it (`to_dict`)."""
        return cls([SmokeCheck(c["name"], c["passed"], c["detail"]) for c in d.get("checks", [])])


def judge_smoke(losses: list[float], peak_bytes: int, max_bytes: int | None, min_loss_drop: float,
                limit_source: str = "smoke.max_memory_gib") -> SmokeResult:
    """Compare the mean loss of the first and last quarter of the steps (at least one step each)."""
    result = SmokeResult()
    bad = [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)]
    result.checks.append(SmokeCheck(
        "finite loss", not bad,
        f"all {len(losses)} step losses are finite" if not bad
        else f"{len(bad)} of {len(losses)} steps had a NaN/inf loss (first at step {bad[0]})",
    ))
    if len(losses) < 2:
        result.checks.append(SmokeCheck("loss falls", False, f"needs at least 2 steps, ran {len(losses)}"))
    elif not bad:
        q = max(1, len(losses) // 4)
        first = sum(losses[:q]) / q
        last = sum(losses[-q:]) / q
        drop = (first - last) / first if first > 0 else 0.0
        ok = drop > min_loss_drop
        result.checks.append(SmokeCheck(
            "loss falls", ok,
            f"mean of the first {q} step(s) {first:.4f} -> last {q} step(s) {last:.4f} "
            f"({drop * 100:+.1f} % drop; needs more than {min_loss_drop * 100:.1f} %)"
            + ("" if ok else ". Check the learning rate (train.lr, warmup) and that the data has label tokens"),
        ))
    if max_bytes is None:
        result.checks.append(SmokeCheck("peak memory", True, f"{fmt_bytes(peak_bytes)} (no limit set: "
                                        "smoke.max_memory_gib is empty and no plan applies on this device)"))
    else:
        ok = peak_bytes <= max_bytes
        result.checks.append(SmokeCheck(
            "peak memory", ok,
            f"{fmt_bytes(peak_bytes)} {'<=' if ok else '>'} limit {fmt_bytes(max_bytes)} ({limit_source})",
        ))
    return result

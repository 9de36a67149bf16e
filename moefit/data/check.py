"""`moefit data check`: validate a data file and summarise what training on it would see."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..labels import IGNORE_INDEX
from .dataset import Encoded, data_paths, encode_samples
from .formats import read_data, skipped_files_line
from .records import BadLine
from .report import no_sample_reason


@dataclass
class CheckReport:
    path: str
    max_length: int
    loss_on: str
    files: list[dict[str, Any]] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    encoded: list[Encoded] = field(default_factory=list, repr=False)

    @property
    def usable(self) -> int:
        """Samples training would keep: rendered, with at least one trained token after truncation."""
        return sum(1 for e in self.encoded if e.loss_tokens)

    @property
    def valid(self) -> bool:
        return not self.bad and self.usable > 0

    def problem(self) -> str | None:
        """Why the data is not valid, in words (None when it is)."""
        if not self.usable:
            dropped = sum(1 for e in self.encoded if not e.loss_tokens)
            return f"no usable sample: {no_sample_reason(self.files, dropped, self.max_length)}"
        return f"{len(self.bad)} bad record(s)" if self.bad else None

    @property
    def formats(self) -> list[str]:
        return sorted({f["format"] for f in self.files if f["format"]})

    def lengths(self) -> list[int]:
        return sorted(e.full_length for e in self.encoded)

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile of the sample lengths in tokens (before truncation)."""
        xs = self.lengths()
        if not xs:
            return 0
        return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]

    def to_dict(self) -> dict[str, Any]:
        enc = self.encoded
        truncated = [e for e in enc if e.full_length > self.max_length]
        dropped = [e for e in enc if e.loss_tokens == 0]
        return {
            "path": self.path,
            "valid": self.valid,
            "problem": self.problem(),
            "usable": self.usable,
            "formats": self.formats,
            "files": self.files,
            "samples": len(enc),
            "turns": sum(e.sample.turns for e in enc),
            "tokens": sum(e.full_length for e in enc),
            "loss_tokens": sum(e.full_loss_tokens for e in enc),
            "length": {"p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99),
                       "max": max((e.full_length for e in enc), default=0)},
            "max_length": self.max_length,
            "loss_on": self.loss_on,
            "truncated": len(truncated),
            "truncated_tokens": sum(e.full_length - self.max_length for e in truncated),
            "truncated_loss_tokens": sum(e.full_loss_tokens - e.loss_tokens for e in truncated),
            "would_drop": [{"file": e.sample.source, "line": e.sample.line} for e in dropped],
            "bad_lines": [b.to_dict() for b in self.bad],
            "bad_count": len(self.bad),
        }


def check_data(path: str | Path, tok: Any, fmt: str = "auto", max_length: int = 2048, loss_on: str = "assistant",
               system_prompt: str | None = None) -> CheckReport:
    """Read every record, render the valid ones; never stops on a bad record (they are all listed)."""
    report = CheckReport(path=str(path), max_length=max_length, loss_on=loss_on)
    for f in read_data(path, fmt):
        report.files.append(f.to_dict())
        encoded, render_bad = encode_samples(f.samples, tok, max_length, loss_on, system_prompt)
        report.encoded += encoded
        report.bad += sorted(f.errors + render_bad, key=lambda b: b.line)
        report.files[-1]["bad"] += len(render_bad)
        report.files[-1]["samples"] -= len(render_bad)
    return report


def check_config_data(cfg: Any, tok: Any = None) -> dict[str, CheckReport]:
    """`moefit data check run.yaml`: the data a run config names ({"train": ..., "eval": ...} when it has held-out
    data), checked as training reads it: the config's model tokenizer, max length, format, loss and system prompt."""
    from .tokenizer import load_tokenizer

    d = cfg.data
    tok = tok if tok is not None else load_tokenizer(cfg.model)
    train, held_out = data_paths(d)
    return {role: check_data(path, tok, d.format, cfg.train.max_length, d.loss_on, d.system_prompt)
            for role, path in (("train", train), ("eval", held_out)) if path is not None}


def summary_lines(report: CheckReport, max_listed: int = 50) -> list[str]:
    d = report.to_dict()
    lines = [f"{report.path}: {report.problem() or 'valid'}"]
    read = [f for f in report.files if not f.get("skipped")]
    for f in read:
        if len(read) > 1 or f["path"] != report.path:
            kind = "empty" if f.get("empty") else f["format"] or "unknown format"
            lines.append(f"  {f['path']}: {kind}, {f['samples']} samples, {f['bad']} bad")
    if skipped := skipped_files_line(report.files):
        lines.append(skipped)
    lines.append(f"format: {', '.join(report.formats) or 'unknown'}")
    lines.append(f"samples: {d['samples']}   turns: {d['turns']}   tokens: {d['tokens']} "
                 f"({d['loss_tokens']} trained, loss on {report.loss_on})")
    ln = d["length"]
    lines.append(f"length in tokens: p50 {ln['p50']}  p90 {ln['p90']}  p99 {ln['p99']}  max {ln['max']}")
    if d["truncated"]:
        lines.append(f"truncation at max length {report.max_length}: {d['truncated']} samples cut, "
                     f"{d['truncated_tokens']} tokens lost ({d['truncated_loss_tokens']} of them trained)")
    else:
        lines.append(f"truncation at max length {report.max_length}: none")
    if d["would_drop"]:
        many = len(report.files) > 1
        where = ", ".join((f"{w['file']} " if many else "") + f"line {w['line']}" for w in d["would_drop"][:max_listed])
        lines.append(f"would drop {len(d['would_drop'])} samples with no trained token left: {where}")
    if report.bad:
        lines.append(f"bad records ({len(report.bad)}; skipped only with data.skip_invalid: true):")
        lines += [f"  {b}" for b in report.bad[:max_listed]]
        if len(report.bad) > max_listed:
            lines.append(f"  ... and {len(report.bad) - max_listed} more (use --json for all)")
    return lines


def marked_text(tok: Any, encoded: Encoded, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The sample's text as the model sees it, with the trained spans wrapped in markers."""
    parts: list[str] = []
    run: list[int] = []
    trained = None
    for tid, lab in zip(encoded.input_ids, encoded.labels, strict=True):
        t = lab != IGNORE_INDEX
        if trained is not None and t != trained:
            parts.append(_piece(tok, run, trained, open_mark, close_mark))
            run = []
        run.append(tid)
        trained = t
    if run:
        parts.append(_piece(tok, run, bool(trained), open_mark, close_mark))
    text = "".join(parts)
    if encoded.full_length > len(encoded.input_ids):
        text += f"<<truncated: {encoded.full_length - len(encoded.input_ids)} more tokens>>"
    return text


def _piece(tok: Any, ids: list[int], trained: bool, open_mark: str, close_mark: str) -> str:
    s = tok.decode(ids, skip_special_tokens=False)
    return f"{open_mark}{s}{close_mark}" if trained else s


def show_lines(report: CheckReport, tok: Any, n: int, color: bool = False) -> list[str]:
    marks = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    lines = []
    for e in report.encoded[:n]:
        lines.append(f"--- {e.sample.source} line {e.sample.line} ({e.full_length} tokens, "
                     f"{e.loss_tokens} trained{' marked in green' if color else ' inside [[ ]]'})")
        lines.append(marked_text(tok, e, *marks))
    return lines

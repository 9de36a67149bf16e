"""What the data pipeline did with every record: read, skipped (file:line and why), truncated, dropped, kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .formats import skipped_files_line
from .records import BadLine


@dataclass
class SplitStats:
    samples: int = 0
    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"samples": self.samples, "sequences": self.sequences, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens}


@dataclass
class DataReport:
    files: list[dict[str, Any]] = field(default_factory=list)  # path, role (train/eval), format, samples, bad, blank
    samples_read: int = 0  # valid records
    skipped: list[BadLine] = field(default_factory=list)  # bad records (only with skip_invalid; else we stop)
    truncated: int = 0  # samples longer than max_length, cut at the end
    truncated_tokens: int = 0
    dropped_all_truncated: list[BadLine] = field(default_factory=list)  # no trained token left after truncation
    boundary_merges: int = 0  # samples whose mask came from character offsets (see render.py)
    max_length: int = 0
    packing: bool = True
    train: SplitStats = field(default_factory=SplitStats)
    eval: SplitStats = field(default_factory=SplitStats)

    @property
    def samples_kept(self) -> int:
        return self.train.samples + self.eval.samples

    @property
    def tokens(self) -> int:
        return self.train.tokens + self.eval.tokens

    @property
    def loss_tokens(self) -> int:
        return self.train.loss_tokens + self.eval.loss_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "samples_read": self.samples_read,
            "samples_kept": self.samples_kept,
            "skipped": [b.to_dict() for b in self.skipped],
            "skipped_count": len(self.skipped),
            "truncated": self.truncated,
            "truncated_tokens": self.truncated_tokens,
            "dropped_all_truncated": [b.to_dict() for b in self.dropped_all_truncated],
            "dropped_all_truncated_count": len(self.dropped_all_truncated),
            "boundary_merges": self.boundary_merges,
            "max_length": self.max_length,
            "packing": self.packing,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "train": self.train.to_dict(),
            "eval": self.eval.to_dict(),
        }

    def summary_lines(self, max_listed: int = 10) -> list[str]:
        lines = []
        for f in self.files:
            if f.get("skipped"):
                continue
            lines.append(f"data {f['role']}: {f['path']} ({'empty' if f.get('empty') else f['format'] or 'unknown format'}, "
                         f"{f['samples']} samples" + (f", {f['bad']} bad" if f["bad"] else "") + ")")
        for role in ("train", "eval"):
            if skipped := skipped_files_line([f for f in self.files if f["role"] == role]):
                lines.append(f"data {role}: {skipped}")
        occupancy = ""
        if self.packing and self.train.sequences:
            occupancy = f", {self.train.tokens / (self.train.sequences * self.max_length):.0%} of the packed rows filled"
        lines.append(f"samples: {self.samples_read} read, {self.samples_kept} kept; train {self.train.samples} samples "
                     f"in {self.train.sequences} sequences ({'packed' if self.packing else 'unpacked'}{occupancy}), "
                     f"eval {self.eval.samples} samples in {self.eval.sequences} sequences")
        lines.append(f"tokens: {self.tokens} ({self.loss_tokens} with loss); train {self.train.tokens}, "
                     f"eval {self.eval.tokens}")
        if self.truncated:
            lines.append(f"truncated: {self.truncated} samples longer than {self.max_length} tokens "
                         f"({self.truncated_tokens} tokens cut)")
        if self.dropped_all_truncated:
            lines.append(f"dropped: {len(self.dropped_all_truncated)} samples whose trained tokens were all "
                         "truncated away: " + _lines(self.dropped_all_truncated, max_listed))
        if self.skipped:
            lines.append(f"skipped: {len(self.skipped)} bad records: " + _lines(self.skipped, max_listed))
        if self.boundary_merges:
            lines.append(f"note: {self.boundary_merges} samples had a token spanning a trained/untrained boundary "
                         "(masked by character offsets)")
        return lines


def _lines(bad: list[BadLine], max_listed: int) -> str:
    shown = "; ".join(str(b) for b in bad[:max_listed])
    return shown + (f"; ... and {len(bad) - max_listed} more (see report.json)" if len(bad) > max_listed else "")


def no_sample_reason(files: list[dict[str, Any]], dropped: int, max_length: int) -> str:
    """Why the files (report entries) gave no usable sample, in words."""
    read = [f for f in files if not f.get("skipped")]
    bad = sum(f["bad"] for f in read)
    if all(f.get("empty") for f in read):
        return "the file is empty" if len(read) == 1 else f"all {len(read)} data files are empty"
    if bad and not any(f["samples"] for f in read):
        return f"all {bad} records are bad"
    if dropped:
        return f"{dropped} samples, none with a trained token left at max length {max_length}"
    return "no record in " + ("the file" if len(read) == 1 else "the files")

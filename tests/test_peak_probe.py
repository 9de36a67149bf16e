"""benchmarks/peak_probe.py's replay of an allocator trace (the GPU part runs on the device; the replay is pure)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _probe():
    spec = importlib.util.spec_from_file_location("peak_probe", ROOT / "benchmarks" / "peak_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ev(action, addr, size, where="moefit/models/layers.py", line=1, name="f"):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": "/x/torch/nn/functional.py", "line": 9, "name": "linear"},
                       {"filename": f"/site/{where}", "line": line, "name": name}]}


def test_the_peak_and_what_is_alive_then_by_site():
    probe = _probe()
    events = [_ev("alloc", 1, 100, name="weights"), _ev("alloc", 2, 50, name="act"),
              _ev("free_requested", 2, 50), _ev("free_completed", 2, 50),
              _ev("alloc", 3, 70, name="act"), _ev("alloc", 4, 10, name="grad"),  # peak: 180 = 100 + 70 + 10
              _ev("free_requested", 3, 70), _ev("free_requested", 99, 1000),  # (allocated before the recording)
              _ev("alloc", 5, 60, name="act")]
    peak, at, live = probe.live_at_peak(events)
    assert (peak, at, sorted(live)) == (180, 5, [1, 3, 4])
    groups = probe.group_by_site(live)
    assert [(g["bytes"], g["count"]) for g in groups] == [(100, 1), (70, 1), (10, 1)]
    assert groups[0]["site"] == "moefit/models/layers.py:1 weights"  # the innermost moefit frame, not torch's
    # a trace with completed frees only counts those
    peak, _, _ = probe.live_at_peak([_ev("alloc", 1, 5), _ev("free_completed", 1, 5), _ev("alloc", 2, 3)])
    assert peak == 5


def test_diff_lists_what_the_second_peak_holds_more():
    probe = _probe()
    before = {"peak_bytes": 2**30, "groups": [{"site": "a", "bytes": 2**29}, {"site": "b", "bytes": 2**29}]}
    after = {"peak_bytes": 2**30 + 2**28, "groups": [{"site": "a", "bytes": 2**29},
                                                     {"site": "b", "bytes": 2**29 + 2**28}]}
    lines = probe.diff(before, after)
    assert "+0.250" in lines[0] and lines[1].split() == ["+0.250", "GiB", "b"] and len(lines) == 2

"""The garbage collector kept off the model during the training loop (moefit.host_gc, engine.gc_freeze)."""

from __future__ import annotations

import gc

import pytest

from moefit.host_gc import frozen_heap


class _Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def _tracked(obj) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_objects_alive_at_the_start_are_out_of_reach_until_the_end():
    before = _Node()
    assert gc.get_freeze_count() == 0 and _tracked(before)
    with frozen_heap():
        assert gc.get_freeze_count() > 0 and not _tracked(before)
        during = _Node()
        assert _tracked(during)  # the loop's own objects are collected as before
    assert gc.get_freeze_count() == 0 and _tracked(before)


def test_garbage_present_at_the_start_is_collected_not_frozen():
    import weakref

    node = _Node()
    ref = weakref.ref(node)
    del node
    with frozen_heap():
        assert ref() is None


def test_disabled_or_nested_leaves_the_collector_alone():
    with frozen_heap(enabled=False):
        assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        # (frozen objects that die meanwhile leave the count: in the full suite a few do, so "about count")
        with frozen_heap():
            assert count - 100 <= gc.get_freeze_count() <= count
        assert count - 100 <= gc.get_freeze_count() <= count  # someone else's freeze is theirs to undo (not 0)
    finally:
        gc.unfreeze()


def test_unfrozen_when_the_loop_raises():
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("a NaN step or a preemption")
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("gc_freeze", [True, False])
def test_the_training_loop_runs_with_the_model_frozen(tmp_path, monkeypatch, gc_freeze):
    """`moefit train`: every optimizer step runs with the model out of the collector's reach (or not, with
    engine.gc_freeze false), and nothing stays frozen after the run."""
    from moefit.assets import tiny_model_dir
    from moefit.train import loop, train
    from tests.test_train import small

    seen = []
    take_step = loop.take_step

    def spy(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return take_step(*args, **kwargs)

    monkeypatch.setattr(loop, "take_step", spy)
    train(output_dir=tmp_path / "run", echo=False,
          **small(tiny_model_dir(), **{"train.max_steps": 2, "engine.gc_freeze": gc_freeze}))
    assert len(seen) == 2 and all((n > 0) == gc_freeze for n in seen)
    assert gc.get_freeze_count() == 0

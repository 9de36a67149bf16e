"""The Triton NF4 decoder is the default on GPUs; where it cannot run (its first use fails: a GPU or Triton it does
not compile for) bitsandbytes decodes instead, said once, and the run goes on. Once it has run, its errors are
not hidden. Exercised on the CPU with a stand-in decoder (the Triton path itself runs on CUDA only)."""

from __future__ import annotations

import logging

import pytest
import torch

from moefit.quant import nf4
from moefit.quant.nf4 import NF4Weight


class _StandIn:
    """A triton_nf4 stand-in: fails (or not) as told, counts its calls."""

    def __init__(self, fail: list[BaseException | None]):
        self.fail, self.calls = fail, 0

    def lookup_of(self, nf4_decoder: str) -> str:
        return "load"

    def decode(self, packed, absmax, code, blocksize, shape, dtype, out=None, lookup="load", double_quant=None):
        self.calls += 1
        error = self.fail[min(self.calls, len(self.fail)) - 1]
        if error is not None:
            raise error
        return torch.zeros(shape, dtype=dtype)


@pytest.fixture
def stand_in(monkeypatch):
    def install(fail):
        decoder = _StandIn(fail)
        monkeypatch.setattr(nf4, "_TRITON_FAILED", set())
        monkeypatch.setattr(nf4, "_TRITON_RAN", set())
        monkeypatch.setattr(nf4, "_triton_decoder",
                            lambda device, nf4_decoder=None: None if nf4._TRITON_FAILED else decoder)
        return decoder
    return install


def _weight() -> NF4Weight:
    torch.manual_seed(0)
    return NF4Weight((2, 32, 64), dtype=torch.float32).quantize_(torch.randn(2, 32, 64))


def test_a_decoder_that_fails_on_first_use_falls_back_to_bitsandbytes(stand_in, caplog):
    w = _weight()
    want = w.dequantize()  # (the stand-in is not installed yet: bitsandbytes)
    decoder = stand_in([RuntimeError("no kernel image for this GPU")])
    with caplog.at_level(logging.WARNING, logger="moefit.quant.nf4"):
        assert torch.equal(w.dequantize(), want)
        assert torch.equal(w.dequantize(expert=1), want[1])
    assert decoder.calls == 1  # tried once, then not again in this process
    warned = [r for r in caplog.records if "could not run on this GPU" in r.getMessage()]
    assert len(warned) == 1 and "no kernel image" in warned[0].getMessage()


def test_running_out_of_memory_is_not_taken_for_a_decoder_that_cannot_run(stand_in):
    stand_in([torch.OutOfMemoryError("CUDA out of memory")])
    with pytest.raises(torch.OutOfMemoryError):
        _weight().dequantize()
    assert not nf4._TRITON_FAILED


def test_a_decoder_that_has_run_keeps_its_later_errors(stand_in):
    decoder = stand_in([None, RuntimeError("device-side assert")])
    w = _weight()
    assert w.dequantize().abs().sum() == 0  # the stand-in's output
    with pytest.raises(RuntimeError, match="device-side assert"):
        w.dequantize()
    assert decoder.calls == 2 and not nf4._TRITON_FAILED


def test_threads_launch_the_triton_decoder_one_at_a_time(stand_in):
    """Triton compiles a kernel on its first launch without a lock: the merged export's worker threads would each
    compile it. Launches through moefit are one at a time (the decode itself is queued on the GPU, not waited for)."""
    import threading

    from tests.concurrency import Overlap

    decoder = stand_in([None])
    gauge, plain = Overlap(hold=0.02), decoder.decode

    def slow_launch(*args, **kwargs):  # a first launch that compiles
        with gauge:
            return plain(*args, **kwargs)

    decoder.decode = slow_launch
    w = _weight()
    threads = [threading.Thread(target=lambda: [w.dequantize() for _ in range(3)]) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert decoder.calls == 18 and gauge.most == 1

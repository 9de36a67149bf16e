"""A gauge of how many threads are inside a block at once, for tests of what runs concurrently."""

from __future__ import annotations

import threading
import time


class Overlap:
    """`with gauge.inside():` around the work of each thread; `gauge.most` is the most threads ever in it at once.
    `hold` seconds are spent inside, so that threads that can overlap do."""

    def __init__(self, hold: float = 0.0):
        self.hold, self.now, self.most, self._lock = hold, 0, 0, threading.Lock()

    def __enter__(self) -> Overlap:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.hold)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.now -= 1

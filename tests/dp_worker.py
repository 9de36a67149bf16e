"""Run `moefit.train(**kwargs)` in one process of a torchrun job (tests/test_data_parallel.py starts it):
the Python API under torchrun, with `stop_after` for the resume tests. argv[1]: the keyword arguments as JSON.
After the run, no gloo thread may be left: a process group that outlives the run is torn down at interpreter exit,
which now and then aborts the finished process (tests/test_dist_shutdown.py)."""

import json
import os
import sys

from moefit.train import train


def gloo_threads() -> list[str]:
    if not os.path.isdir("/proc/self/task"):
        return []
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    return sorted(n for n in names if "gloo" in n)


if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1])
    train(echo=False, **kwargs)
    left = gloo_threads()
    if left:
        sys.exit(f"the run's process groups outlived moefit.train: gloo threads {left}")

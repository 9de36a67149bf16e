"""Run `moefit.train(**kwargs)` in one process of a torchrun job (tests/test_data_parallel.py starts it):
the Python API under torchrun, with `stop_after` for the resume tests. argv[1]: the keyword arguments as JSON."""

import json
import sys

from moefit.train import train

if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1])
    train(echo=False, **kwargs)

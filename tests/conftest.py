"""Test-session settings that must be in place before torch is first imported."""

import os

# Same reason as in moefit/cli/__init__.py (the CLI sets it; importing moefit does not): bitsandbytes' and torch's OpenMP pools spin against each other on few
# cores unless the wait policy is passive; test modules import torch before moefit, so set it here too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One small run directory (config.yaml + final adapter) trained by hand, shared by the whole session: tests
    that read it must not change it (copy it first)."""
    from tests.test_export import make_run

    return make_run(tmp_path_factory.mktemp("tiny_run"))

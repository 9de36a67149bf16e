"""Test-session settings that must be in place before torch is first imported."""

import os

# Same reason as in moefit/__init__.py: bitsandbytes' and torch's OpenMP pools spin against each other on few
# cores unless the wait policy is passive; test modules import torch before moefit, so set it here too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

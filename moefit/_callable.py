"""`moefit.train(...)`, `moefit.plan(...)` and `moefit.export(...)` are functions of the public API, and also
subpackages. Importing a subpackage binds its module object to the parent package's attribute of the same name,
which would shadow the function; so each of those packages makes its own module object callable, forwarding to
its function. `moefit.train.loop` and friends still import as usual.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_module_callable(module_name: str, func: Callable[..., Any]) -> None:
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

    CallableModule.__call__.__doc__ = func.__doc__
    module.__class__ = CallableModule

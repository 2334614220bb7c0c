"""Package attributes imported on first use (PEP 562), so that importing one light module of the
package (an expert actor imports moe_router.routing.backends.ray) does not import torch through the
package's __init__."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module __getattr__ that imports `name` from the module `exports[name]` on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__

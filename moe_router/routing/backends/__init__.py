"""Expert backends: `local` (in-process FAISS, the default) and `ray` (experts in Ray actors, optional).

Ray is imported only when backend "ray" is asked for, so the core never needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

from moe_router.routing.backends.base import Answer, ExpertBackend, ExpertSource, VectorSource
from moe_router.routing.backends.local import LocalBackend

RAY_INSTALL = "pip install -e '.[ray]'"


def make_backend(name: str = "local", **options: Any) -> ExpertBackend:
    """The backend called `name` ('local' or 'ray'), built with `options` (RayBackend's arguments for 'ray')."""
    if name == "local":
        if options:
            raise ValueError(f"backend 'local' takes no options, got {sorted(options)}")
        return LocalBackend()
    if name == "ray":
        try:  # optional dependency: imported by name so that the core import path never reaches Ray
            module = importlib.import_module("moe_router.routing.backends.ray")
        except ImportError as exc:
            if exc.name is None or exc.name == "ray" or exc.name.startswith("ray."):
                raise ImportError(
                    f"backend='ray' needs Ray, which is not installed here ({exc}); install it with: {RAY_INSTALL}"
                ) from exc
            raise
        return module.RayBackend(**options)
    raise ValueError(f"backend must be 'local' or 'ray', got {name!r}")


__all__ = ["Answer", "ExpertBackend", "ExpertSource", "LocalBackend", "RAY_INSTALL", "VectorSource", "make_backend"]

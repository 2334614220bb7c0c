"""Routing: the Router (experts + gate: route, grouped search, stats, fork), backends, hierarchy."""

from moe_router.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {"Router": "moe_router.routing.router"})  # torch: only when asked for
__all__ = ["Router"]

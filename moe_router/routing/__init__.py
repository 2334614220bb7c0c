"""Routing: the Router (experts + gate: route, grouped search, stats, fork), hierarchy, calibration."""

from moe_router.routing.router import Router

__all__ = ["Router"]

"""Argument checks shared by every public entry point (one place for each message)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def check_int(value: Any, low: int, high: int, what: str, bound: str) -> int:
    """`value` as an int in [low, high], else a ValueError naming `what` and what `high` is (`bound`)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high} ({bound}), got {value}")
    return int(value)


def check_name(name: Any, what: str = "expert name") -> str:
    """A non-empty string, else a ValueError."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    return name


def check_new_name(name: Any, taken: Iterable[str], what: str) -> str:
    """A non-empty expert name not in `taken`, else a ValueError that starts with `what`."""
    check_name(name, f"{what}: expert name")
    if name in set(taken):
        raise ValueError(f"{what}: an expert named {name!r} already exists; expert names must be unique")
    return name


def ensure_unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate expert name {n!r}; expert names must be unique")
        seen.add(n)

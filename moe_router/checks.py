"""The one check of each argument kind and of each record (names the argument, says what was expected).

Records (types.SearchParams, types.ExpertSpec) call these once, when they are built; every layer
that takes options from outside (Router, CLI, HTTP, batcher, evaluation) builds a record and passes
it on, so nothing below re-validates with other rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

MAX_NAME_CHARS = 256  # expert names: shown in tables and URLs
MAX_SPECIALIZATION_CHARS = 1024


def check_int(value: Any, low: int, high: int, what: str, bound: str) -> int:
    """`value` as an int in [low, high], else a ValueError naming `what` and what `high` is (`bound`)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__} {value!r:.40}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be between {low} and {high} ({bound}), got {value}")
    return int(value)


def check_count(value: Any, what: str, low: int = 1) -> int:
    """An integer >= `low` (not a bool, not a float), else a ValueError naming `what`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {type(value).__name__} {value!r:.40}")
    return int(value)


def check_bool(value: Any, what: str) -> bool:
    """True or False (numpy's bool too); anything else, "no" and 1 included, is a ValueError."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be True or False, got {type(value).__name__} {value!r:.40}")
    return bool(value)


def check_real(value: Any, what: str, low: float = -math.inf, high: float = math.inf, expected: str = "") -> float:
    """A finite real number in [low, high] (not a bool, not a string), else a ValueError naming `what`."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        bounds = expected or f"a finite number in [{low}, {high}]"
        raise ValueError(f"{what} must be {bounds}, got {type(value).__name__} {value!r:.40}")
    return float(value)


def check_probability_mass(value: Any, what: str = "top_p") -> float:
    """A probability mass in (0, 1], else a ValueError naming `what`."""
    p = check_real(value, what, 0.0, 1.0, "a number in (0, 1] (the probability mass to cover)")
    if p == 0.0:
        raise ValueError(f"{what} must be a number in (0, 1] (the probability mass to cover), got {value!r}")
    return p


def check_prior_weight(value: Any) -> float:
    """A merge prior weight (hits merged by score + w * log p(expert)): a finite number >= 0."""
    return check_real(value, "prior_weight", 0.0, expected="a finite number >= 0 (0 = merge by score alone)")


def check_decide_weight(value: Any) -> float:
    """A re-decision weight (a merged search keeps one expert, re-decided from its hits): a finite number >= 0."""
    return check_real(
        value, "decide_weight", 0.0, expected="a finite number >= 0 (0 = merge every searched expert's hits)"
    )


def check_unicode(text: str, what: str) -> str:
    """`text` if it encodes as UTF-8 (no lone surrogates), else a ValueError naming `what`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode (character {exc.start} is a lone surrogate {text[exc.start]!r}); "
            "expected text that encodes as UTF-8"
        ) from None
    return text


def check_name(name: Any, what: str = "expert name") -> str:
    """An expert name: a string of 1 to 256 characters with no leading or trailing space, no control
    character, valid Unicode, and not '.' or '..' (a name must also be a path segment of the HTTP API)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty string, got {type(name).__name__} {name!r:.40}")
    if name != name.strip():
        raise ValueError(f"{what} must not start or end with white space, got {name!r:.60}")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{what} must be at most {MAX_NAME_CHARS} characters, got {len(name)}")
    if name in (".", ".."):
        raise ValueError(f"{what} cannot be {name!r} (it would not survive as a path segment)")
    bad = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"{what} must not hold control characters, got {bad!r} in {name!r:.60}")
    return check_unicode(name, what)


def check_new_name(name: Any, taken: Iterable[str], what: str) -> str:
    """A valid expert name not in `taken`, else a ValueError that starts with `what`."""
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


def check_specialization(value: Any, what: str = "specialization") -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} {value!r:.40}")
    if len(value) > MAX_SPECIALIZATION_CHARS:
        raise ValueError(f"{what} must be at most {MAX_SPECIALIZATION_CHARS} characters, got {len(value)}")
    return check_unicode(value, what)


def check_parent(parent: Any, name: str, what: str = "parent") -> str | None:
    """None, or a valid expert name other than the expert's own."""
    if parent is None:
        return None
    check_name(parent, what)
    if parent == name:
        raise ValueError(f"expert {name!r} cannot be its own parent")
    return parent

"""Structural changes are planned aside and swapped in: a failed change leaves the router as it was.

Every structural operation is a plan: a function of the router's parts (RouterParts) that validates
all of its inputs and returns a Change (the new parts plus the store moves that go with them)
without touching the router. Router.update runs the plan under the router's lock, applies the
store moves in one SQLite transaction and swaps the parts in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moe_router.index.expert import Expert
from moe_router.routing.parts import Change, RouterParts
from moe_router.routing.router import Router
from moe_router.types import ExpertSpec

FineTune = Callable[[Router, Sequence[str]], Any]  # (router, names of new experts) -> anything; sets the router's gate


def new_expert(parts: RouterParts, spec: ExpertSpec, xb: np.ndarray, ids: np.ndarray) -> Expert:
    """An expert holding xb (n, d) with ids, created by the parts' backend (where the others live)."""
    return parts.backend.create(spec, parts.dim, parts.metric, xb, ids)


def then(first: Change, second: Change) -> Change:
    """`second` (planned on first.parts) after `first`: one Change with both sets of store moves."""
    return Change(
        second.parts,
        (*first.item_moves, *second.item_moves),
        (*first.feedback_moves, *second.feedback_moves),
        (*first.created, *second.created),
    )


def view(parts: RouterParts) -> Router:
    """A router holding `parts` (a private copy of nothing: candidates are fine-tuned and measured on views)."""
    return Router.from_parts(parts)

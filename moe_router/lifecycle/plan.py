"""Structural changes are built aside and swapped in: a failed change leaves the router as it was.

Every structural operation validates all of its inputs, builds the new expert list, gate head and
store changes without touching the router, then hands them to Router.replace_parts, which applies
the store changes in one SQLite transaction and swaps the experts and the gate in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_router.gate.model import Gate
from moe_router.index.expert import Expert
from moe_router.routing.backends import ExpertBackend, LocalBackend
from moe_router.routing.router import Router
from moe_router.routing.stats import RoutingStats

FineTune = Callable[[Router, Sequence[str]], Any]  # (router, names of new experts) -> anything; updates router.gate


@dataclass
class State:
    """The parts of a router that a structural change replaces."""

    experts: list[Expert]
    gate: Gate | None
    stats: RoutingStats
    backend: ExpertBackend = field(default_factory=LocalBackend)  # where new experts are created


@dataclass
class Plan:
    """A new state plus the store changes that go with it (applied together by apply_plan)."""

    state: State
    item_moves: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (ids, new expert)
    feedback_moves: list[tuple[list[int], str]] = field(default_factory=list)  # (feedback seqs, new expert)
    created: list[str] = field(default_factory=list)


def state_of(router: Router) -> State:
    gate = router.gate
    if gate is not None and gate.num_experts != router.num_experts:
        raise RuntimeError(f"the gate has {gate.num_experts} outputs but the router has {router.num_experts} experts")
    return State(list(router.experts), gate, router.routing_stats.copy(), router.backend)


def apply_plan(router: Router, plan: Plan) -> None:
    """Store changes in one transaction, then experts, gate and stats swapped in (nothing changes if the store fails)."""
    router.replace_parts(plan.state.experts, plan.state.gate, plan.state.stats, plan.item_moves, plan.feedback_moves)


def view(router: Router, state: State) -> Router:
    """A fork of `router` holding `state` (its own copy of the gate): candidates are fine-tuned and measured on views."""
    out = router.fork()
    out.replace_parts(state.experts, copy.deepcopy(state.gate), state.stats)
    return out


def position(experts: Sequence[Expert], name: str) -> int:
    for i, e in enumerate(experts):
        if e.name == name:
            return i
    raise KeyError(f"unknown expert {name!r}; known experts: {[e.name for e in experts]}")


def new_expert(
    state: State, like: Expert, name: str, xb: np.ndarray, ids: np.ndarray, specialization: str, parent: str | None
) -> Expert:
    """An expert like `like` (dim, metric) holding xb (n, d) with ids, created by the state's backend."""
    return state.backend.create(name, like.dim, like.metric, specialization or name, parent, xb, ids)

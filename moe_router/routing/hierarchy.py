"""Parent groups of experts and two-level routing (groups first, then their children).

Dimension legend: nq queries, E experts, P parent groups, t experts searched per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_router.checks import check_int
from moe_router.index.expert import Expert
from moe_router.metrics import top_experts
from moe_router.routing.router import Router
from moe_router.types import Hit, SearchParams


def group_key(expert: Expert) -> str:
    """An expert's parent, or its own name when it has none (a group of one)."""
    return expert.parent if expert.parent is not None else expert.name


def hierarchy(router: Router) -> dict[str, list[str]]:
    """parent (or a parentless expert's own name) -> its children's names, in expert order."""
    out: dict[str, list[str]] = {}
    for e in router.experts:
        out.setdefault(group_key(e), []).append(e.name)
    return out


def group_by_parent(hits: Sequence[Hit]) -> dict[str, list[Hit]]:
    """Hits grouped by their expert's parent (a parentless expert is its own group), best group first."""
    out: dict[str, list[Hit]] = {}
    for h in hits:
        out.setdefault(h.parent if h.parent is not None else h.expert, []).append(h)
    return out


@dataclass(frozen=True)
class TwoLevelRouting:
    """Array form of two-level routing."""

    parents: list[str]  # (P,) parent group names
    probs: np.ndarray  # (nq, E) gate probabilities of the experts
    parent_probs: np.ndarray  # (nq, P) summed gate probability of each group's children
    top_parents: np.ndarray  # (nq, tp) group indices, best first
    top: np.ndarray  # (nq, t) expert indices, best first: children of the chosen groups first


def two_level_top(
    probs: np.ndarray, groups: np.ndarray, top_parents: int, top_children: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parent probs (nq, P), top parents (nq, tp), top experts (nq, t)) from leaf probs (nq, E).

    A group's probability is the sum of its children's. Experts are the most probable children
    of the chosen groups; when those have fewer than `top_children` children, the best other
    experts fill the row (so every row has t experts).
    """
    P = int(groups.max()) + 1
    member = np.zeros((probs.shape[1], P), dtype=probs.dtype)
    member[np.arange(probs.shape[1]), groups] = 1.0  # (E, P)
    pprobs = probs @ member  # (nq, P)
    tp = top_experts(pprobs, top_parents)  # (nq, tp)
    allowed = (groups[None, None, :] == tp[:, :, None]).any(axis=1)  # (nq, E)
    score = probs + 2.0 * allowed  # chosen groups' children first, each part ordered by probability
    return pprobs, tp, top_experts(score, top_children)


def route_two_level(
    router: Router, queries: Any, top_parents: int = 1, top_children: int = 2, record: bool = True
) -> TwoLevelRouting:
    """Route to parent groups first (summed child probability), then to the best children inside them."""
    names = list(hierarchy(router))
    if not 1 <= top_parents <= len(names):
        raise ValueError(
            f"top_parents must be between 1 and {len(names)} (the number of parent groups), got {top_parents}"
        )
    top_children = check_int(top_children, 1, router.num_experts, "top_children", "the number of experts")
    xq, _ = router.prepare(queries)
    probs = router.gate_probs(xq)
    groups = np.array([names.index(group_key(e)) for e in router.experts])
    pprobs, tp, top = two_level_top(probs, groups, top_parents, top_children)
    if record:
        router.record_routing(top, probs)
    return TwoLevelRouting(names, probs, pprobs, tp, top)


def search_two_level(
    router: Router,
    queries: Any,
    k: int = 10,
    top_parents: int = 1,
    top_children: int = 2,
    with_text: bool = True,
) -> list[Hit] | list[list[Hit]]:
    """Search the best `top_children` experts inside the best `top_parents` parent groups."""
    k = router.check_params(SearchParams(k=k)).k
    xq, single = router.prepare(queries)
    routing = route_two_level(router, xq, top_parents, top_children)
    out = router.hits(router.search_experts(xq, k, routing.top), routing.probs, with_text)
    return out[0] if single else out

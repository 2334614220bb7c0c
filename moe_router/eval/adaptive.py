"""Adaptive expert count in evaluation: prefix searches, baselines' probabilities, the quality-vs-cost frontier.

Top-k and top-p both search a prefix of each query's experts ordered by decreasing score, so a
selection is (order (n, E), count (n,)): query q searches order[q, :count[q]].
Dimension legend: n queries, E experts, k hits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moe_router.gate.confidence import fit_temperature, softmax
from moe_router.metrics import top_experts, top_p_experts
from moe_router.routing.router import Router

TOP_K = (1, 2, 3, 4)  # fixed expert counts on the frontier
P_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)  # probability masses on the frontier


def check_top_p(top_p: float, p_grid: Sequence[float]) -> None:
    """top_p and every p of the frontier grid in (0, 1], else a ValueError naming them."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be a probability mass in (0, 1], got {top_p!r}")
    if any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0 for p in p_grid):
        raise ValueError(f"p_grid values must be probability masses in (0, 1], got {list(p_grid)}")


@dataclass(frozen=True)
class Selection:
    """Which experts each query searches: a prefix of its experts ordered best first."""

    order: np.ndarray  # (n, E) expert indices, best first
    count: np.ndarray  # (n,) experts searched, 1..E

    @property
    def mean_experts(self) -> float:
        return float(self.count.mean())

    def mask(self, num_experts: int) -> np.ndarray:
        """(n, E) True where expert e is searched for query q."""
        out = np.zeros((len(self.order), num_experts), dtype=bool)
        inside = np.arange(self.order.shape[1])[None, :] < self.count[:, None]  # (n, t) within the prefix
        np.put_along_axis(out, self.order, inside, axis=1)
        return out


def top_k_selection(probs: np.ndarray, t: int) -> Selection:
    """The t best experts of every query."""
    return Selection(top_experts(probs, probs.shape[1]), np.full(len(probs), t, dtype=np.int64))


def top_p_selection(probs: np.ndarray, p: float, max_experts: int) -> Selection:
    """The smallest best-first set whose probability mass reaches p (at least 1, at most max_experts)."""
    _, count = top_p_experts(probs, p, max_experts)  # the router's own selection (metrics.top_p_experts)
    return Selection(top_experts(probs, probs.shape[1]), count)


def fixed_selection(experts: np.ndarray) -> Selection:
    """Each query searches exactly the experts in its row of `experts` (n, t), e.g. the gold one."""
    return Selection(np.asarray(experts, dtype=np.int64), np.full(len(experts), experts.shape[1], dtype=np.int64))


def prefix_search(
    router: Router,
    xq: np.ndarray,
    k: int,
    sel: Selection,
    probs: np.ndarray | None = None,
    prior_weight: float = 0.0,
    decide_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search each query's selected experts, merged: (ids (n, k) global ids, experts (n, k), scanned (n,)).

    Queries are grouped by how many experts they search, one routed search per group. With `probs`
    (n, E) and `prior_weight`, the merge weighs in the router's probabilities; with `decide_weight` > 0,
    a query that searches several experts keeps one's hits, re-decided from them (Router.search_experts).
    """
    ids = np.full((len(xq), k), -1, dtype=np.int64)
    owner = np.full((len(xq), k), -1, dtype=np.int64)
    scanned = np.zeros(len(xq), dtype=np.int64)
    for t in np.unique(sel.count):
        rows = np.nonzero(sel.count == t)[0]
        res = router.search_experts(
            xq[rows],
            k,
            sel.order[rows, :t],
            probs=None if probs is None else probs[rows],
            prior_weight=prior_weight,
            decide_weight=decide_weight if probs is not None else 0.0,
        )
        ids[rows], owner[rows], scanned[rows] = res.I, res.E, res.scanned
    return ids, owner, scanned


def baseline_probs(
    scores: np.ndarray, calib_scores: np.ndarray | None, calib_gold: np.ndarray | None
) -> tuple[np.ndarray, float]:
    """A baseline's scores as probabilities for top-p: softmax(scores / T), T fitted by NLL on calibration labels.

    Without calibration labels T = 1. Returns (probs (n, E), T).
    """
    if calib_scores is None or calib_gold is None or not (calib_gold >= 0).any():
        return softmax(scores.astype(np.float64)), 1.0
    t = fit_temperature(
        calib_scores.astype(np.float64), calib_gold, low=1e-3, high=1e3
    )  # baselines' score scales vary widely
    return softmax(scores.astype(np.float64), t), t


@dataclass(frozen=True)
class FrontierPoint:
    setting: str  # "top-2" or "p=0.9"
    experts: float  # mean experts searched per query
    scanned: float  # mean share of stored vectors compared per query
    quality: float


def frontier(
    probs: np.ndarray,
    quality: Callable[[Selection], tuple[float, float]],
    max_experts: int,
    top_k: Sequence[int] = TOP_K,
    p_grid: Sequence[float] = P_GRID,
) -> list[FrontierPoint]:
    """Quality and cost of top-k for each k and of top-p for each p; `quality(sel)` -> (quality, scanned share)."""
    E = probs.shape[1]
    settings = [(f"top-{t}", top_k_selection(probs, t)) for t in top_k if t <= E]
    settings += [(f"p={p:g}", top_p_selection(probs, p, min(max_experts, E))) for p in p_grid]
    points = []
    for name, sel in settings:
        value, scanned = quality(sel)
        points.append(FrontierPoint(name, sel.mean_experts, scanned, value))
    return points


def p_at_cost(
    probs: np.ndarray, target: float, max_experts: int, sizes: np.ndarray | None = None, steps: int = 40
) -> float:
    """The largest top-p mass whose mean cost stays within `target` (bisection; cost grows with p).

    Cost is the mean experts searched, or with `sizes` (E,) the mean share of stored vectors scanned.
    When even p = 1 stays within the target, returns 1.
    """
    max_experts = min(max_experts, probs.shape[1])

    def cost(p: float) -> float:
        sel = top_p_selection(probs, p, max_experts)
        if sizes is None:
            return sel.mean_experts
        return float((sel.mask(probs.shape[1]) * sizes[None, :]).sum(axis=1).mean() / sizes.sum())

    if cost(1.0) <= target:
        return 1.0
    low, high = 0.0, 1.0  # cost(low) <= target < cost(high); p -> 0 searches one expert each
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (mid, high) if mid > 0 and cost(mid) <= target else (low, mid)
    return max(low, 1e-6)


@dataclass(frozen=True)
class OperatingPoint:
    """One query-time setting of routed search and what it gave on a set of queries."""

    setting: str  # a frontier setting: "top-2" or "p=0.9"
    max_experts: int  # the cap of top-p (top-k ignores it)
    prior_weight: float  # merge by score + prior_weight * log p(expert)
    experts: float  # mean sources searched per query
    quality: float  # nDCG@10 (or another quality, higher is better)
    decide_weight: float = 0.0  # > 0: one searched expert's hits kept, re-decided from them (index.merge.redecide)


def cheapest_at_least(points: Sequence[OperatingPoint], reference: float, tol: float = 1e-9) -> OperatingPoint:
    """The point searching the fewest experts whose quality is at least `reference`; ties go to higher quality.

    When no point reaches it, the best-quality point (so a grid that holds the exhaustive setting always has an answer).
    """
    if not points:
        raise ValueError("cheapest_at_least needs at least one operating point")
    enough = [p for p in points if p.quality >= reference - tol]
    if not enough:
        return max(points, key=lambda p: (p.quality, -p.experts))
    return min(enough, key=lambda p: (p.experts, -p.quality))


def safest_within(points: Sequence[OperatingPoint], budget: float, tol: float = 1e-3) -> OperatingPoint:
    """Within `budget` mean experts, the best quality; of the points within `tol` of it, the one searching most.

    The rule for choosing on a few hundred queries: a difference under `tol` is noise there, and
    when the data cannot tell two settings apart the one that searches more is the safer bet (it
    misses fewer relevant documents on queries the data did not show). Ties in cost go to higher
    quality. When no point is within the budget, the cheapest point.
    """
    if not points:
        raise ValueError("safest_within needs at least one operating point")
    inside = [p for p in points if p.experts <= budget + 1e-9]
    if not inside:
        return min(points, key=lambda p: (p.experts, -p.quality))
    best = max(p.quality for p in inside)
    return max((p for p in inside if p.quality >= best - tol), key=lambda p: (p.experts, p.quality))

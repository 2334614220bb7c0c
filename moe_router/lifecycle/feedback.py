"""Feedback statistics per expert and the tutorial's retrain / merge / split recommendations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_router.index.expert import centroids
from moe_router.routing.router import Router
from moe_router.vectors import similarity


@dataclass(frozen=True)
class FeedbackStats:
    expert: str
    total: int
    positive: int
    success_rate: float | None  # positive / total; None without feedback


@dataclass(frozen=True)
class RecommendationRules:
    """The tutorial's rules: success below 50% over more than 10 queries -> retrain or merge;
    above 90% over more than 20 -> consider splitting."""

    low_success: float = 0.5  # success rate below this ...
    low_min_queries: int = 10  # ... over more than this many feedback records -> retrain or merge
    high_success: float = 0.9  # success rate above this ...
    high_min_queries: int = 20  # ... over more than this many -> consider splitting


@dataclass(frozen=True)
class Recommendation:
    expert: str
    action: str  # 'retrain_or_merge' | 'split'
    reason: str
    merge_with: str | None = None  # the most similar other expert (centroids), for 'retrain_or_merge'


def feedback_stats(router: Router) -> list[FeedbackStats]:
    """Per current expert: feedback records, positive ones and the success rate (from the SQLite store)."""
    counts: dict[str, tuple[int, int]] = {}
    for r in router.feedback():
        total, pos = counts.get(r.expert, (0, 0))
        counts[r.expert] = (total + 1, pos + int(r.positive))
    out = []
    for name in router.expert_names:
        total, pos = counts.get(name, (0, 0))
        out.append(FeedbackStats(name, total, pos, pos / total if total else None))
    return out


def nearest_expert(router: Router, name: str) -> str | None:
    """The other expert whose centroid is closest to `name`'s."""
    i = router.expert_indices([name])[0]
    if router.num_experts < 2:
        return None
    c = centroids(router.experts)  # (E, d)
    sim = similarity(c[i][None], c, router.metric)[0]
    sim[i] = -np.inf
    return router.experts[int(np.argmax(sim))].name


def recommendations(router: Router, rules: RecommendationRules = RecommendationRules()) -> list[Recommendation]:
    """Apply the feedback rules to every expert; experts that meet no rule get no recommendation."""
    out = []
    for s in feedback_stats(router):
        if s.success_rate is None:
            continue
        if s.success_rate < rules.low_success and s.total > rules.low_min_queries:
            out.append(
                Recommendation(
                    s.expert,
                    "retrain_or_merge",
                    f"success {100 * s.success_rate:.1f}% < {100 * rules.low_success:.0f}% over {s.total} > "
                    f"{rules.low_min_queries} queries",
                    nearest_expert(router, s.expert),
                )
            )
        elif s.success_rate > rules.high_success and s.total > rules.high_min_queries:
            out.append(
                Recommendation(
                    s.expert,
                    "split",
                    f"success {100 * s.success_rate:.1f}% > {100 * rules.high_success:.0f}% over {s.total} > "
                    f"{rules.high_min_queries} queries",
                )
            )
    return out

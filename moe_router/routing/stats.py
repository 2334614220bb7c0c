"""Routing statistics: how many queries each expert was chosen for, and with what confidence.

Dimension legend: nq queries, E experts, t experts chosen per query.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from moe_router.types import ExpertStats


@dataclass
class RoutingStats:
    """Per-expert counts of (query, expert) assignments and the sum of the gate's probability for them."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (E,)
    confidence_sums: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))  # (E,)

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64).copy()
        self.confidence_sums = np.asarray(self.confidence_sums, dtype=np.float64).copy()
        self._lock = threading.Lock()

    @classmethod
    def zeros(cls, num_experts: int) -> RoutingStats:
        return cls(np.zeros(num_experts, dtype=np.int64), np.zeros(num_experts, dtype=np.float64))

    def record(self, top: np.ndarray, probs: np.ndarray) -> None:
        """Count each query's chosen experts `top` (nq, t) with their probabilities from `probs` (nq, E); -1 = none."""
        chosen = np.take_along_axis(probs, np.maximum(top, 0), axis=1)
        real = top >= 0  # top-p rows are padded with -1
        with self._lock:
            np.add.at(self.counts, top[real], 1)
            np.add.at(self.confidence_sums, top[real], chosen[real])

    def copy(self) -> RoutingStats:
        with self._lock:
            return RoutingStats(self.counts, self.confidence_sums)

    def appended(self, n: int = 1) -> RoutingStats:
        """These stats with `n` new experts (never chosen yet) at the end."""
        with self._lock:
            return RoutingStats(
                np.append(self.counts, np.zeros(n, np.int64)), np.append(self.confidence_sums, np.zeros(n))
            )

    def without(self, i: int) -> RoutingStats:
        with self._lock:
            return RoutingStats(np.delete(self.counts, i), np.delete(self.confidence_sums, i))

    def merged(self, a: int, b: int) -> RoutingStats:
        """Experts a and b become one at min(a, b), carrying both histories."""
        lo, hi = min(a, b), max(a, b)
        with self._lock:
            counts, sums = self.counts.copy(), self.confidence_sums.copy()
        counts[lo], sums[lo] = counts[a] + counts[b], sums[a] + sums[b]
        return RoutingStats(np.delete(counts, hi), np.delete(sums, hi))

    def split(self, i: int, parts: int) -> RoutingStats:
        """Expert i becomes `parts` experts; its history cannot be attributed to them, so they start at zero."""
        with self._lock:
            counts, sums = self.counts, self.confidence_sums
            return RoutingStats(
                np.concatenate([counts[:i], np.zeros(parts, np.int64), counts[i + 1 :]]),
                np.concatenate([sums[:i], np.zeros(parts), sums[i + 1 :]]),
            )

    def since(self, earlier: RoutingStats) -> RoutingStats:
        """What was recorded after `earlier` was copied from these stats (same experts)."""
        with self._lock:
            return RoutingStats(self.counts - earlier.counts, self.confidence_sums - earlier.confidence_sums)

    def carried(self, delta: RoutingStats, delta_names: Sequence[str], names: Sequence[str]) -> RoutingStats:
        """These stats (of experts `names`) plus `delta` (of experts `delta_names`), matched by name.

        How counts recorded while a change was planned reach the changed router: an expert that kept
        its name keeps them; those of experts the change removed, merged or split are dropped.
        """
        where = {n: i for i, n in enumerate(names)}
        with self._lock:
            counts, sums = self.counts.copy(), self.confidence_sums.copy()
        for j, n in enumerate(delta_names):
            if n in where:
                counts[where[n]] += delta.counts[j]
                sums[where[n]] += delta.confidence_sums[j]
        return RoutingStats(counts, sums)

    def reset(self) -> None:
        with self._lock:
            self.counts[:] = 0
            self.confidence_sums[:] = 0.0

    def table(
        self, names: Sequence[str], specializations: Sequence[str], parents: Sequence[str | None], sizes: Sequence[int]
    ) -> list[ExpertStats]:
        """One ExpertStats per expert (the names and sizes given in expert order)."""
        with self._lock:
            counts, sums = self.counts.copy(), self.confidence_sums.copy()
        total = max(int(counts.sum()), 1)
        return [
            ExpertStats(n, s, p, int(v), int(c), float(c / total), float(m / c) if c else 0.0)
            for n, s, p, v, c, m in zip(names, specializations, parents, sizes, counts, sums)
        ]

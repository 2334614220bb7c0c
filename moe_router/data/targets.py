"""Routing targets: what the gate learns each training query should route to.

Dimension legend: n queries, nb stored vectors, d dim, E experts.
"""

from __future__ import annotations


import numpy as np

from moe_router.index.exact import neighbour_counts, neighbours_excluding_rows, stacked
from moe_router.routing.router import Router


def make_targets(
    kind: str, labels: np.ndarray, counts: np.ndarray | None, num_experts: int, label_weight: float = 0.5
) -> np.ndarray:
    """(n, E) target distributions: 'label' one-hot, 'neighbours' share of exact neighbours, or their 'mix'."""
    one_hot = np.eye(num_experts, dtype=np.float32)[labels]
    if kind == "label":
        return one_hot
    if counts is None:
        raise ValueError(f"targets {kind!r} need neighbour counts")
    shares = counts / counts.sum(axis=1, keepdims=True)
    if kind == "neighbours":
        return shares.astype(np.float32)
    if kind == "mix":
        if not 0.0 <= label_weight <= 1.0:
            raise ValueError(f"label_weight must be in [0, 1], got {label_weight}")
        return (label_weight * one_hot + (1.0 - label_weight) * shares).astype(np.float32)
    raise ValueError(f"targets must be 'label', 'neighbours' or 'mix', got {kind!r}")


def routing_pairs(router: Router, max_queries: int | None, neighbours: int, seed: int) -> tuple[np.ndarray, ...]:
    """Stored vectors as pseudo-queries: (xq, expert of each, neighbour counts per expert excluding itself).

    With max_queries, a seeded uniform sample of the stored vectors is used (for large collections).
    """
    xb, _, owner = stacked(router.experts)
    rows = np.arange(len(xb))
    if max_queries is not None and max_queries < len(xb):
        rows = np.sort(np.random.default_rng(seed).choice(len(xb), size=max_queries, replace=False))
    nbrs = neighbours_excluding_rows(xb[rows], xb, rows, neighbours, router.metric)
    return xb[rows], owner[rows], neighbour_counts(nbrs, owner, router.num_experts)

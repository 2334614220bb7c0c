"""Routing targets: what the gate learns each training query should route to.

Dimension legend: n queries, nb stored vectors, d dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_router.index.exact import exact_counts, neighbour_counts, neighbours_excluding_rows, stacked
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


@dataclass(frozen=True)
class Pairs:
    """Training queries (n, d) with their target distributions (n, E) over experts; `weight`: share of the loss."""

    x: np.ndarray
    target: np.ndarray
    weight: float


def query_targets(
    router: Router, xq: np.ndarray, gold: np.ndarray, exhaustive_weight: float = 0.0, neighbours: int = 10
) -> np.ndarray:
    """(n, E) targets of real queries: the gold source(s), mixed with the sources of their exhaustive top-k.

    `gold` is (n,) expert indices or (n, E) counts of each query's relevant documents per expert.
    With `exhaustive_weight` w > 0 the target is (1 - w) x gold shares + w x the share of the query's
    exact top-`neighbours` in each expert (the RAGRoute-style label: which sources supply its results).
    """
    if not 0.0 <= exhaustive_weight <= 1.0:
        raise ValueError(f"exhaustive_weight must be in [0, 1], got {exhaustive_weight}")
    gold = np.asarray(gold)
    if gold.ndim == 1:
        if len(gold) != len(xq) or ((gold < 0) | (gold >= router.num_experts)).any():
            raise ValueError(f"gold must hold {len(xq)} expert indices in [0, {router.num_experts})")
        shares = np.eye(router.num_experts, dtype=np.float32)[gold]  # (n, E)
    else:
        if gold.shape != (len(xq), router.num_experts) or (gold < 0).any() or (gold.sum(1) <= 0).any():
            raise ValueError(
                f"gold counts must have shape ({len(xq)}, {router.num_experts}), be >= 0 and "
                "name at least one relevant document per query"
            )
        shares = (gold / gold.sum(1, keepdims=True)).astype(np.float32)
    if exhaustive_weight == 0.0:
        return shares
    counts = exact_counts(router.experts, xq, neighbours)  # (n, E)
    return ((1.0 - exhaustive_weight) * shares + exhaustive_weight * counts / counts.sum(1, keepdims=True)).astype(
        np.float32
    )


def weighted_pairs(groups: list[Pairs]) -> tuple[np.ndarray, np.ndarray]:
    """One training set from groups of pairs: (x (n, d), target (n, E)) with each group carrying its weight.

    A row's target is scaled so that the group's rows sum to `weight` x n (the soft cross-entropy
    of GateModule is linear in the target, so this weights the loss; rows still average to 1).
    """
    groups = [g for g in groups if len(g.x) and g.weight > 0]
    if not groups:
        raise ValueError("no training pairs: every group is empty or has weight 0")
    if any(g.weight < 0 for g in groups):
        raise ValueError(f"pair weights must be >= 0, got {[g.weight for g in groups]}")
    n = sum(len(g.x) for g in groups)
    total = sum(g.weight for g in groups)
    x = np.concatenate([g.x for g in groups]).astype(np.float32)
    target = np.concatenate([g.target * (g.weight / total * n / len(g.x)) for g in groups]).astype(np.float32)
    return x, target

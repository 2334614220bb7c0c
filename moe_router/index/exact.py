"""Exact (exhaustive) search: the ground truth that routed search is measured against.

Dimension legend: nq queries, nb stored vectors, d dim, k neighbours, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from moe_router.index.expert import Expert
from moe_router.vectors import flat_index


def stacked(experts: Sequence[Expert]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every expert's vectors in one array: (xb (nb, d), global ids (nb,), owner expert index (nb,))."""
    if not experts:
        raise ValueError("no experts: there are no stored vectors")
    xb = np.concatenate([e.vectors() for e in experts])
    ids = np.concatenate([e.ids for e in experts])
    owner = np.concatenate([np.full(e.ntotal, i, dtype=np.int64) for i, e in enumerate(experts)])
    return xb, ids, owner


def exhaustive_index(experts: Sequence[Expert]) -> tuple[faiss.Index, np.ndarray]:
    """One flat index over every expert's vectors, and the global id of each of its rows."""
    index = flat_index(experts[0].dim, experts[0].metric)
    for e in experts:
        index.add(e.vectors())
    return index, np.concatenate([e.ids for e in experts])


def exact_ids(experts: Sequence[Expert], xq: np.ndarray, k: int) -> np.ndarray:
    """(nq, k) global ids of each query's exact top-k over all experts (-1 where fewer exist)."""
    index, ids = exhaustive_index(experts)
    _, rows = index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
    return np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


def exact_neighbours(
    xq: np.ndarray, xb: np.ndarray, k: int, metric: str = "ip", exclude_self: bool = False
) -> np.ndarray:
    """(nq, k) row indices into xb of each query's exact top-k (a query that is itself row i of xb skips i)."""
    index = flat_index(xb.shape[1], metric)
    index.add(np.ascontiguousarray(xb, dtype=np.float32))
    kk = min(k + int(exclude_self), xb.shape[0])
    _, I = index.search(np.ascontiguousarray(xq, dtype=np.float32), kk)
    if exclude_self:
        own = np.arange(xq.shape[0])[:, None]
        # Drop the query's own row (or, on exact duplicates, the last column), keeping k.
        is_self = I == own
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), kk - 1)
        keep = np.ones_like(I, dtype=bool)
        keep[np.arange(len(I)), drop] = False
        I = I[keep].reshape(len(I), kk - 1)
    return I[:, :k]


def neighbours_excluding_rows(xq: np.ndarray, xb: np.ndarray, rows: np.ndarray, k: int, metric: str) -> np.ndarray:
    """(nq, k) exact neighbours in xb of queries that are the rows `rows` of xb, each leaving itself out."""
    if len(rows) == len(xb):
        return exact_neighbours(xq, xb, k, metric, exclude_self=True)
    full = exact_neighbours(xq, xb, k + 1, metric)  # (nq, k+1)
    is_self = full == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(full, dtype=bool)
    keep[np.arange(len(full)), drop] = False
    return full[keep].reshape(len(full), full.shape[1] - 1)[:, :k]


def neighbour_counts(neighbours: np.ndarray, owner: np.ndarray, num_experts: int) -> np.ndarray:
    """(nq, E): how many of each query's neighbours (row indices) live in each expert (owner: expert of each row)."""
    experts = owner[neighbours]  # (nq, k)
    counts = np.zeros((neighbours.shape[0], num_experts), dtype=np.float32)
    np.add.at(counts, (np.repeat(np.arange(len(experts)), experts.shape[1]), experts.ravel()), 1.0)
    return counts


def exact_counts(experts: Sequence[Expert], xq: np.ndarray, k: int = 10) -> np.ndarray:
    """(nq, E) counts of each query's exhaustive top-k in each expert."""
    xb, _, owner = stacked(experts)
    return neighbour_counts(exact_neighbours(xq, xb, k, experts[0].metric), owner, len(experts))

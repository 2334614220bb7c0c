"""k-means for sharding and prototypes, with a size-capped variant, and nearest-centroid assignment.

Dimension legend: N vectors, n clusters, d dim.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from moe_router.checks import check_real
from moe_router.vectors import similarity


def kmeans(
    x: np.ndarray, n: int, metric: str = "ip", seed: int = 0, niter: int = 20, max_points_per_centroid: int = 256
) -> faiss.Kmeans:
    """FAISS k-means with n centroids trained on x (N, d); spherical for 'ip'. The one k-means of the project."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        n,
        niter=niter,
        seed=seed,
        spherical=metric == "ip",
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max_points_per_centroid,
    )
    km.train(x)
    return km


def kmeans_centroids(
    x: np.ndarray, m: int, metric: str = "ip", seed: int = 0, max_points_per_centroid: int = 256
) -> np.ndarray:
    """(min(m, N), d) k-means centroids of x (N, d): prototypes of a set of vectors; all of x when N <= m."""
    if len(x) <= m:
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(
        kmeans(x, m, metric, seed, max_points_per_centroid=max_points_per_centroid).centroids, dtype=np.float32
    )


def kmeans_assign(xb: np.ndarray, n: int, metric: str = "ip", seed: int = 0) -> np.ndarray:
    """(nb,) cluster of each vector under FAISS k-means with n centroids."""
    if not 1 <= n <= len(xb):
        raise ValueError(f"cannot cut {len(xb)} vectors into {n} k-means experts")
    km = kmeans(xb, n, metric, seed, niter=25, max_points_per_centroid=100_000)
    _, assign = km.index.search(np.ascontiguousarray(xb, dtype=np.float32), 1)
    return assign[:, 0]


def balanced_kmeans(
    x: np.ndarray,
    n: int,
    metric: str = "ip",
    seed: int = 0,
    max_imbalance: float | None = 1.5,
    niter: int = 20,
    rounds: int = 3,
) -> np.ndarray:
    """(N,) cluster of each row of x (N, d): FAISS k-means, then an assignment with a size cap.

    No cluster is empty, and with `max_imbalance` no cluster holds more than
    max(ceil(N / n), floor(max_imbalance * N / n)) rows: the largest is at most `max_imbalance`
    times the mean size (or one more row than an even split, when that bound is tighter).
    Rows go to their best-scoring cluster with room, most decided rows first; centroids are
    then re-estimated from the capped assignment `rounds` times.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    N = x.shape[0]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of clusters must be an integer >= 1, got {n!r}")
    if n > N:
        raise ValueError(f"cannot make {n} clusters from {N} vectors; expected at most {N}")
    if max_imbalance is not None:
        max_imbalance = check_real(
            max_imbalance,
            "max_imbalance",
            1.0,
            expected="a number >= 1 (the largest cluster over the mean size) or None",
        )
    if n == 1:
        return np.zeros(N, dtype=np.int64)
    cap = N if max_imbalance is None else max(math.ceil(N / n), math.floor(max_imbalance * N / n))
    centroids = kmeans(x, n, metric, seed, niter=niter, max_points_per_centroid=max(256, N)).centroids
    labels = np.zeros(N, dtype=np.int64)
    for _ in range(max(1, rounds)):
        labels = _capped_assignment(similarity(x, centroids, metric), cap)
        centroids = np.stack([x[labels == j].mean(0) for j in range(n)]).astype(np.float32)
        if metric == "ip":
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return labels


def _capped_assignment(scores: np.ndarray, cap: int) -> np.ndarray:
    """Each row to its best cluster with room (rows with the largest best-vs-second margin first); none empty."""
    N, n = scores.shape
    prefs = np.argsort(-scores, axis=1, kind="stable")  # (N, n)
    top2 = np.take_along_axis(scores, prefs[:, :2], axis=1)
    order = np.argsort(-(top2[:, 0] - top2[:, 1]), kind="stable")
    labels = np.empty(N, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    for r in order:
        for j in prefs[r]:
            if sizes[j] < cap:
                labels[r] = j
                sizes[j] += 1
                break
    for j in np.flatnonzero(sizes == 0):  # an empty cluster takes its closest row from a cluster of > 1
        movable = sizes[labels] > 1
        r = int(np.flatnonzero(movable)[np.argmax(scores[movable, j])])
        sizes[labels[r]] -= 1
        labels[r], sizes[j] = j, 1
    return labels


def nearest_centroid(xq: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
    """(nq,) index of the centroid closest to each query (the gold expert of a k-means partition)."""
    return np.argmax(similarity(xq, centroids, metric), axis=1)

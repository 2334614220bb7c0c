"""Merging per-expert hits into one ranked list per query, optionally weighted by the gate's log-prior.

Dimension legend: nq queries, t experts searched per query, k hits, E experts.
"""

from __future__ import annotations

import numpy as np

PRIOR_FLOOR = 1e-12  # log p is taken of max(p, this): an expert the gate gives 0 still ranks, last


def merge_hits(
    D: np.ndarray,
    I: np.ndarray,
    E: np.ndarray,
    k: int,
    metric: str,
    probs: np.ndarray | None = None,
    prior_weight: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k best of each query's hits from several experts: (D, I, E) of shape (nq, k), best first.

    D, I, E are (nq, m): scores, global ids (-1 = padding) and the expert index of each hit, the
    experts' own top-k lists side by side. Hits rank by similarity (the score for 'ip', minus the
    distance for 'l2'); with `probs` (nq, E) and `prior_weight` w > 0, by similarity +
    w * log p(expert): a hit from an expert the gate is sure of outranks a slightly closer one
    from an expert it doubts. Scores come back raw. Ties keep the input order (stable).
    """
    key = D if metric == "ip" else -D  # higher is better
    if prior_weight and probs is not None:
        p = np.take_along_axis(np.asarray(probs, dtype=np.float64), np.maximum(E, 0), axis=1)  # (nq, m)
        key = key + prior_weight * np.log(np.maximum(p, PRIOR_FLOOR))
    key = np.where(I >= 0, key, -np.inf)  # padding last
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]  # (nq, k)
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1), np.take_along_axis(E, order, 1)

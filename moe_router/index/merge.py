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


DECIDE_HITS = 3  # re-deciding reads each searched expert's mean similarity over its best this many hits


def hit_evidence(D: np.ndarray, I: np.ndarray, t: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per query and searched expert (nq, t): the mean similarity of its best DECIDE_HITS hits, and whether it has any.

    D, I (nq, t * k): the t experts' own top-k lists side by side, each best first (k >= 1).
    """
    nq, m = D.shape
    k = m // t
    sim = (D if metric == "ip" else -D).reshape(nq, t, k)[:, :, :DECIDE_HITS].astype(np.float64)
    valid = I.reshape(nq, t, k)[:, :, :DECIDE_HITS] >= 0
    n = valid.sum(axis=2)
    return np.where(valid, sim, 0.0).sum(axis=2) / np.maximum(n, 1), n > 0


def redecide(
    D: np.ndarray, I: np.ndarray, E: np.ndarray, t: int, metric: str, probs: np.ndarray, weight: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, per query, only the hits of the searched expert its hits and the gate favour most together.

    D, I, E (nq, t * k) hold the t searched experts' own top-k lists side by side, each best first
    (Router.search_experts before its merge; -1 = padding). Each searched expert scores
    log p(expert) + weight * (the mean similarity of its best DECIDE_HITS hits); the best-scoring
    one keeps its hits and every other hit becomes padding, so the merge that follows returns
    that expert's list alone. weight 0 keeps the gate's most probable searched expert; an expert
    slot with no hits never wins.
    """
    nq, m = D.shape
    k = m // t
    mean, found = hit_evidence(D, I, t, metric)
    owner = E.reshape(nq, t, k)[:, :, 0]  # the expert of each slot (-1: it found nothing)
    p = np.take_along_axis(np.asarray(probs, dtype=np.float64), np.maximum(owner, 0), axis=1)
    score = np.where(found, np.log(np.maximum(p, PRIOR_FLOOR)) + weight * mean, -np.inf)
    win = score.argmax(axis=1)  # (nq,)
    keep = np.zeros((nq, t, k), dtype=bool)
    keep[np.arange(nq), win] = True
    keep = keep.reshape(nq, m)
    return D, np.where(keep, I, -1), np.where(keep, E, -1)

"""Routing and retrieval metrics shared by training, evaluation and the benchmarks (plain numpy).

Dimension legend: n queries, E experts, t experts searched, k hits.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def top_experts(probs: np.ndarray, t: int) -> np.ndarray:
    """(n, t) expert indices by decreasing probability (ties broken by lower index)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, :t]


def accuracy_at_k(probs: np.ndarray, gold: np.ndarray, k: int) -> float:
    """Share of queries whose gold expert is among the top k (gold -1 = no such expert: a miss)."""
    top = top_experts(probs, k)
    return float((top == gold[:, None]).any(axis=1).mean())


def overlap_from_counts(top: np.ndarray, counts: np.ndarray, k: int = 10) -> float:
    """overlap_at_k of a routed search, from neighbour counts (n, E) of the exhaustive top-k.

    Exact: a true top-k neighbour inside a searched expert is always in the routed top-k
    (at most k-1 vectors anywhere outrank it), and nothing outside the searched experts is.
    """
    reached = np.take_along_axis(counts, top, axis=1).sum(axis=1, dtype=np.float64)  # (n,) whatever counts' dtype
    return float(reached.mean() / k)


def overlap_at_k(routed_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """recall@k against exhaustive search: mean |routed ∩ exact| / k, from two (n, k) id arrays (-1 = no hit).

    Not recall against relevance judgments: that is eval.ir.recall_at_k.
    """
    k = exact_ids.shape[1]
    hits = [len(set(r[r >= 0].tolist()) & set(e[e >= 0].tolist())) for r, e in zip(routed_ids, exact_ids)]
    return float(np.mean(hits) / k)


VAL_ACC1 = "val/acc@1"  # the validation routing accuracy (the gold expert first)


def val_recall(k: int) -> str:
    """The key of the validation recall@k against exhaustive search: it names its neighbour count."""
    return f"val/recall@{k}"


def validation_metrics(probs: np.ndarray, gold: np.ndarray, counts: np.ndarray, top: int, k: int) -> dict[str, float]:
    """val/acc@1 and val/recall@{k} at `top` experts searched (capped at E): what training validates and selects by.

    probs (n, E) routing scores, gold (n,) expert indices, counts (n, E) each query's exact top-k per expert.
    """
    searched = top_experts(probs, min(int(top), probs.shape[1]))  # (n, t)
    return {VAL_ACC1: accuracy_at_k(probs, gold, 1), val_recall(k): overlap_from_counts(searched, counts, k)}


def load_stats(top: np.ndarray, num_experts: int) -> dict[str, float | list[float]]:
    """Load over experts from (n, t) assignments: shares, max/mean, coefficient of variation, dead experts.

    An expert is dead when its share is below 1 / (4E).
    """
    counts = np.bincount(top.ravel(), minlength=num_experts).astype(np.float64)
    shares = counts / counts.sum()
    mean = 1.0 / num_experts
    return {
        "shares": shares.tolist(),
        "max_over_mean": float(shares.max() / mean),
        "cv": float(shares.std() / mean),
        "dead": int((shares < 1.0 / (4 * num_experts)).sum()),
    }


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    rank_sum = ranks[: len(pos)].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - mean confidence| weighted by bin size."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


class NoiseFloor(NamedTuple):
    mean: float  # mean ECE over the draws
    q90: float  # its 90th percentile


def ece_noise_floor(confidence: np.ndarray, bins: int = 15, draws: int = 1000, seed: int = 0) -> NoiseFloor:
    """(mean, 90th percentile) ECE of a perfectly calibrated predictor with these confidences.

    Each draw makes query i correct with probability confidence[i] and measures the ECE: what
    sampling noise alone gives at this number of queries. A measured ECE inside this range cannot
    be told from perfect calibration; a goal below the mean cannot be checked on so few queries.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    if confidence.ndim != 1 or not len(confidence):
        raise ValueError(f"ece_noise_floor needs a non-empty 1-d array of confidences, got shape {confidence.shape}")
    rng = np.random.default_rng(seed)
    values = [
        expected_calibration_error(confidence, rng.random(len(confidence)) < confidence, bins) for _ in range(draws)
    ]
    return NoiseFloor(float(np.mean(values)), float(np.quantile(values, 0.9)))


def assign_with_capacity(probs: np.ndarray, t: int, capacity_factor: float) -> np.ndarray:
    """(n, t) experts per query such that no expert takes more than capacity_factor x the mean load.

    Each expert may take ceil(capacity_factor * n * t / E) (query, expert) assignments. The most
    confident choices are placed first; a query whose preferred expert is full overflows to its
    next-best expert that still has room (Switch Transformer capacity, with overflow re-routed
    rather than dropped).
    """
    n, num_experts = probs.shape
    if capacity_factor < 1.0:
        raise ValueError(f"capacity_factor must be >= 1 (1 = perfectly even load), got {capacity_factor}")
    if not 1 <= t <= num_experts:
        raise ValueError(f"t must be between 1 and {num_experts}, got {t}")
    # floor keeps max/mean <= capacity_factor; the bound keeps room for every assignment.
    capacity = max(int(np.floor(capacity_factor * n * t / num_experts)), int(np.ceil(n * t / num_experts)))
    room = np.full(num_experts, capacity)
    order = np.argsort(-probs, axis=1, kind="stable")  # (n, E) each query's experts, best first
    out = np.full((n, t), -1, dtype=np.int64)
    for slot in range(t):
        # Queries place their slot-th choice in order of confidence in their best remaining expert.
        for q in np.argsort(-probs[np.arange(n), order[:, slot]], kind="stable"):
            for e in order[q]:
                if room[e] > 0 and e not in out[q, :slot]:
                    out[q, slot] = e
                    room[e] -= 1
                    break
    return out


def top_p_experts(probs: np.ndarray, p: float, max_experts: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of experts per query whose probability mass reaches p (nucleus / top-p routing).

    Returns (experts (n, m) best first, padded with -1; counts (n,)), with 1 <= counts <= max_experts
    (default E) and m = counts.max(). A query stops at max_experts even if its mass is still below p.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape (n, E) with E >= 1, got {probs.shape}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    num_experts = probs.shape[1]
    cap = num_experts if max_experts is None else int(max_experts)
    if not 1 <= cap <= num_experts:
        raise ValueError(f"max_experts must be between 1 and {num_experts} (the number of experts), got {max_experts}")
    order = np.argsort(-probs, axis=1, kind="stable")  # (n, E)
    mass = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)  # (n, E) mass of the best j+1
    # Experts needed: 1 + how many prefixes stay below p (a tolerance so that p = 1 is reachable in floats).
    counts = np.minimum(1 + (mass < p - 1e-9).sum(axis=1), cap).astype(np.int64)  # (n,)
    m = int(counts.max()) if len(counts) else 1
    experts = np.where(np.arange(m)[None, :] < counts[:, None], order[:, :m], -1)  # (n, m)
    return experts.astype(np.int64), counts

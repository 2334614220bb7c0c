"""Confidence calibration: temperature (with per-expert offsets), abstention threshold, load floor, reliability bins.

Dimension legend: n queries, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (n, E) logits, shifted by each row's max so exp cannot overflow."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits / temperature))


def fit_temperature(logits: np.ndarray, gold: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T minimising the NLL of the gold experts under softmax(logits / T) (Guo et al. 2017).

    NLL is convex in 1/T, so a golden-section search over log T finds the minimum.
    """
    keep = gold >= 0
    logits, gold = logits[keep], gold[keep]
    if len(gold) == 0:
        raise ValueError("fit_temperature needs at least one query with a known gold expert")

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t))[np.arange(len(gold)), gold].mean())

    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(60):
        if nll(c) < nll(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    return float(np.exp((a + b) / 2))


class BiasTemperature(NamedTuple):
    bias: np.ndarray  # (E,) logit offset per expert, added after dividing by the temperature
    temperature: float


def fit_bias_temperature(
    logits: np.ndarray, gold: np.ndarray, l2: float = 1e-3, min_queries: int = 5
) -> BiasTemperature:
    """(bias (E,), T) minimising the NLL of the gold experts under softmax(logits / T + bias), + l2 * |bias|^2.

    Temperature scaling with one offset per expert (a prior correction): when the queries that
    reach each expert are not distributed like its stored vectors (classic: 82 documents but 20
    dev queries in adi), the offsets move the decision boundaries, the temperature the confidence.
    Experts with fewer than `min_queries` gold queries keep offset 0: a few queries say too little
    about how often an expert is asked, and none would push it to -inf. The objective is convex
    (in 1/T and bias); L-BFGS in float64.
    """
    keep = gold >= 0
    logits, gold = logits[keep], gold[keep]
    if len(gold) == 0:
        raise ValueError("fit_bias_temperature needs at least one query with a known gold expert")
    free = torch.from_numpy(np.bincount(gold, minlength=logits.shape[1])[: logits.shape[1]] >= min_queries)
    z = torch.from_numpy(logits.astype(np.float64))
    y = torch.from_numpy(gold.astype(np.int64))
    scale = torch.tensor(np.log(1.0 / fit_temperature(logits, gold)), dtype=torch.float64, requires_grad=True)
    raw = torch.zeros(logits.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [scale, raw], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        bias = raw * free
        loss = F.cross_entropy(z * scale.exp() + bias, y) + l2 * bias.square().sum()
        loss.backward()
        return loss

    opt.step(objective)
    return BiasTemperature((raw * free).detach().numpy(), float(np.exp(-scale.item())))


def choose_threshold(in_scope: np.ndarray, out_of_scope: np.ndarray) -> float:
    """Confidence threshold maximising balanced accuracy (in-scope kept, out-of-scope refused) on validation."""
    if len(in_scope) == 0 or len(out_of_scope) == 0:
        raise ValueError("choose_threshold needs in-scope and out-of-scope validation scores")
    candidates = np.unique(np.concatenate([in_scope, out_of_scope]))
    kept = (in_scope[None, :] >= candidates[:, None]).mean(axis=1)
    refused = (out_of_scope[None, :] < candidates[:, None]).mean(axis=1)
    return float(candidates[np.argmax(kept + refused)])


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (for a reliability diagram)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        sel = which == b
        out["count"].append(int(sel.sum()))
        out["confidence"].append(float(confidence[sel].mean()) if sel.any() else float((edges[b] + edges[b + 1]) / 2))
        out["accuracy"].append(float(correct[sel].mean()) if sel.any() else 0.0)
    return out


def load_floor_bias(
    logits: np.ndarray, floor: float, gold: np.ndarray | None = None, step: float = 0.02, max_steps: int = 500
) -> np.ndarray:
    """(E,) smallest logit offsets (on a `step` grid) that lift starving experts' top-1 share to a floor.

    logits: (n, E) gate logits of held-out queries. Expert i's target share is floor / E, or, with
    `gold` (n,) (each query's gold expert), the smaller of that and i's share of the gold: an
    expert few queries belong to is not pushed past them. Only experts under their target are
    raised, a step at a time, so well-used experts and the ranking among them are left alone.
    floor = 0.25 is the dead-expert line of the load metrics.
    """
    n, E = logits.shape
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor is a share of the even load 1/E, so it must be in [0, 1], got {floor}")
    if n == 0:
        raise ValueError("load_floor_bias needs at least one query")
    target = np.full(E, float(floor))
    if gold is not None:
        if len(gold) != n:
            raise ValueError(f"gold names {len(gold)} experts for {n} queries; expected one per query")
        target = np.minimum(target, np.bincount(gold[gold >= 0], minlength=E)[:E] * (E / n))
    bias = np.zeros(E)
    for _ in range(max_steps):
        shares = np.bincount((logits + bias).argmax(axis=1), minlength=E) * (E / n)
        low = shares < target - 1e-12
        if not low.any():
            break
        bias[low] += step
    return bias

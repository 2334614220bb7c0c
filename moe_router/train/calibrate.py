"""A trained router on its validation queries: calibration (load floor, temperature, abstention), its metrics."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from moe_router.checks import check_bool, check_real
from moe_router.embed.base import check_text_list
from moe_router.gate.confidence import choose_threshold, fit_bias_temperature, fit_temperature, load_floor_bias
from moe_router.gate.model import in_scope, infer
from moe_router.index.exact import exact_counts
from moe_router.index.merge import DECIDE_HITS, PRIOR_FLOOR, hit_evidence
from moe_router.metrics import validation_metrics
from moe_router.routing.parts import Change, check_abstain_threshold
from moe_router.routing.router import Router

MIN_BIAS_QUERIES = 5  # an expert with fewer gold queries gets no offset of its own (fit_bias_temperature)


def unjudged_at_mean(offsets: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """(E,) offsets with each expert of fewer than MIN_BIAS_QUERIES gold queries at the others' mean offset.

    Softmax ignores a common shift, so an offset of 0 means nothing by itself: fitted without any of
    its queries (an expert added after training), the others' offsets all rise to take probability
    from it. At their mean, it keeps its place among them.
    """
    judged = np.bincount(gold, minlength=len(offsets))[: len(offsets)] >= MIN_BIAS_QUERIES
    if judged.all() or not judged.any():
        return offsets
    out = np.array(offsets, dtype=np.float64)
    out[~judged] = out[judged].mean()
    return out


def calibrate_router(
    router: Router,
    queries: Any,
    experts: list[str],
    oos_texts: list[str],
    load_floor: float | None = None,
    bias: bool = False,
) -> dict[str, float]:
    """Fit the gate to validation queries (texts or vectors) after training; the fitted values by name.

    With `load_floor`, experts whose top-1 share of the queries is below load_floor / E (and below
    their share of the gold experts) get their logit raised just enough to reach it (see
    gate.confidence.load_floor_bias); then the temperature is fitted, with `bias` together with one
    logit offset per expert (gate.confidence.fit_bias_temperature: a prior correction for queries
    that do not reach the experts in proportion to their stored vectors); with out-of-scope
    queries, the abstain threshold is set.

    Everything is fitted on a copy of the gate and checked before the router changes, in one step:
    a refused argument or a failed fit leaves the router as it was.
    """
    if router.gate is None:
        raise RuntimeError("calibrate_router needs a trained gate; the router has none")
    xv, _ = router.prepare(queries)
    if isinstance(experts, (str, bytes)) or len(experts) != len(xv):
        raise ValueError(f"calibrate_router: {len(xv)} queries but {len(experts)} gold experts; expected one per query")
    gold = router.expert_indices(experts)  # unknown names: KeyError
    oos = check_text_list(oos_texts, "calibrate_router: oos_texts") if len(oos_texts) else []
    if load_floor is not None:
        load_floor = check_real(
            load_floor, "load_floor", 0.0, expected="a number >= 0 (a share of the mean load) or None"
        )
    bias = check_bool(bias, "bias")
    xo = router.prepare(oos)[0] if oos else None
    gate = copy.deepcopy(router.gate)  # the router's gate is never changed in place
    out: dict[str, float] = {}
    if load_floor:
        lift = load_floor_bias(infer(gate, xv, "logits"), load_floor, gold)
        gate.shift_bias(lift)
        out["load_floor_experts_raised"] = int((lift > 0).sum())
    if bias:
        offsets, temperature = fit_bias_temperature(infer(gate, xv, "logits"), gold, min_queries=MIN_BIAS_QUERIES)
        offsets = unjudged_at_mean(offsets, gold)
        gate.shift_bias(offsets * temperature)  # logits / T + b = (logits + b * T) / T
        out["bias_max_abs"] = float(np.abs(offsets).max())
    else:
        temperature = fit_temperature(infer(gate, xv, "logits"), gold)
    gate.set_temperature(temperature)
    out["temperature"] = temperature
    threshold = router.abstain_threshold
    if xo is not None:
        threshold = out["abstain_threshold"] = choose_threshold(in_scope(gate, xv), in_scope(gate, xo))
    defects = gate.defects()
    if defects:
        raise ValueError(f"calibrate_router: the fitted gate cannot route ({'; '.join(defects)}); nothing changed")
    threshold = check_abstain_threshold(threshold)
    router.update(lambda parts: Change(parts.replace(gate=gate.eval(), abstain_threshold=threshold)))
    return out


def router_validation(
    router: Router, queries: Any, experts: list[str], neighbours: int, top_k: int
) -> dict[str, float]:
    """val/acc@1 and val/recall@{neighbours} (at top_k experts) of the router's gate, as the training loop logs them."""
    xv, _ = router.prepare(queries)
    counts = exact_counts(router.experts, xv, neighbours)  # (n, E)
    return validation_metrics(router.gate_probs(xv), router.expert_indices(experts), counts, top_k, neighbours)


DECIDE_WEIGHT_MAX = 200.0  # the fit's upper bound: similarities are cosines, so 200 already lets hits overrule p


def fit_decide_weight(router: Router, xq: np.ndarray, gold: np.ndarray, experts: int = 2) -> float | None:
    """The decide_weight that best predicts judged queries' gold expert among the gate's top `experts`.

    Per query, each of the gate's top `experts` experts scores log p(expert) + w * the mean
    similarity of its best DECIDE_HITS hits (index.merge.redecide); w >= 0 minimises the
    cross-entropy of the gold expert under the softmax of those scores, over the queries whose
    gold expert is among them (the others cannot be re-decided right). The loss is convex in w,
    so a golden-section search on [0, DECIDE_WEIGHT_MAX] finds it. None: no query can tell
    (fewer than two experts, or no gold expert in reach with a rival beside it).
    """
    xq = np.asarray(xq, dtype=np.float32)
    gold = np.asarray(gold, dtype=np.int64)
    if xq.ndim != 2 or len(xq) != len(gold):
        raise ValueError(f"need one gold expert per query: {len(xq)} queries, {len(gold)} gold experts")
    t = min(int(experts), router.num_experts)
    if t < 2 or not len(xq):
        return None
    probs = router.gate_probs(xq)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :t]  # (n, t)
    res = router.search_experts(xq, DECIDE_HITS, top, merge=False)
    mean, found = hit_evidence(res.D, res.I, t, router.metric)
    logp = np.log(np.maximum(np.take_along_axis(probs.astype(np.float64), top, axis=1), PRIOR_FLOOR))
    hit = top == gold[:, None]
    rows = hit.any(axis=1) & found.all(axis=1)
    if not rows.any():
        return None
    logp, mean, target = logp[rows], mean[rows], hit[rows].argmax(axis=1)

    def loss(w: float) -> float:
        z = logp + w * mean
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[np.arange(len(z)), target] - np.log(np.exp(z).sum(axis=1))).mean())

    lo, hi = 0.0, DECIDE_WEIGHT_MAX
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):  # the bracket shrinks to 200 * 0.618^60: far below any weight that matters
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    w = float((lo + hi) / 2.0)
    return 0.0 if loss(0.0) <= loss(w) else w

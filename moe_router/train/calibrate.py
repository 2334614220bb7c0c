"""A trained router on its validation queries: calibration (load floor, temperature, abstention), its metrics."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from moe_router.gate.confidence import choose_threshold, fit_bias_temperature, fit_temperature, load_floor_bias
from moe_router.gate.model import infer
from moe_router.index.exact import exact_counts
from moe_router.metrics import validation_metrics
from moe_router.routing.router import Router


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
    """
    xv, _ = router.prepare(queries)
    gold = router.expert_indices(experts)
    gate = copy.deepcopy(router.gate)  # the router's gate is never changed in place
    out: dict[str, float] = {}
    if load_floor:
        lift = load_floor_bias(infer(gate, xv, "logits"), float(load_floor), gold)
        gate.shift_bias(lift)
        out["load_floor_experts_raised"] = int((lift > 0).sum())
    if bias:
        offsets, temperature = fit_bias_temperature(infer(gate, xv, "logits"), gold)
        gate.shift_bias(offsets * temperature)  # logits / T + b = (logits + b * T) / T
        out["bias_max_abs"] = float(np.abs(offsets).max())
    else:
        temperature = fit_temperature(infer(gate, xv, "logits"), gold)
    gate.set_temperature(temperature)
    router.set_gate(gate)
    out["temperature"] = temperature
    if oos_texts:
        xo, _ = router.prepare(oos_texts)
        router.abstain_threshold = choose_threshold(router.in_scope_scores(xv), router.in_scope_scores(xo))
        out["abstain_threshold"] = router.abstain_threshold
    return out


def router_validation(
    router: Router, queries: Any, experts: list[str], neighbours: int, top_k: int
) -> dict[str, float]:
    """val/acc@1 and val/recall@{neighbours} (at top_k experts) of the router's gate, as the training loop logs them."""
    xv, _ = router.prepare(queries)
    counts = exact_counts(router.experts, xv, neighbours)  # (n, E)
    return validation_metrics(router.gate_probs(xv), router.expert_indices(experts), counts, top_k, neighbours)

"""The gate and a logistic regression as one router: the regression installed as the gate's linear head.

Cross-validation on the intent sets (reports/cv) found a logistic regression on the same
embeddings ahead of the gate on acc@1 on some data and behind it on others; the two together
(the product of their calibrated probabilities) beat either alone there. Installing the
regression's logits into the gate (Gate.with_linear) serves that product from one module, which
every lifecycle operation (adding, removing, merging experts; fine-tuning; checkpoints) treats as
any gate. Dimension legend: n validation queries, d dim, E experts.
"""

from __future__ import annotations

import math

import numpy as np

from moe_router.gate.confidence import fit_temperature
from moe_router.gate.linear import fit_linear, training_rows
from moe_router.gate.model import Gate, infer
from moe_router.index.expert import labelled_sample
from moe_router.routing.router import Router

PER_EXPERT = 5000  # stored vectors per expert the regression trains on (the evaluation's logistic baseline's sample)


def check_linear_weight(value: object) -> float:
    """A linear-head weight: a finite number >= 0 (0 = no linear head)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"linear_weight must be a finite number >= 0 (0 = no linear head), got {value!r}")
    return float(value)


def add_linear_head(
    router: Router,
    val: tuple[np.ndarray, np.ndarray],
    queries: tuple[np.ndarray, np.ndarray] | None,
    weight: float,
    query_weight: float = 0.5,
    seed: int = 0,
) -> dict[str, float]:
    """Fit a logistic regression and install it in the router's gate so its probabilities become
    p_gate * p_linear^weight (each at the temperature that calibrates it on `val`), renormalised.

    The regression trains as the evaluation's logistic baseline does: a seeded sample of the stored
    vectors labelled with their expert, plus the labelled training `queries` (xq (m, d), gold (m,))
    at `query_weight` of the loss, its L2 penalty chosen by cross-validation on those rows. `val`
    (x (n, d), gold (n,)) are the validation queries that then calibrate the whole gate (the
    caller recalibrates afterwards). Returns what was fitted, for the training metrics.
    """
    gate, facts = _with_fitted_linear(router, router.gate, val, queries, weight, query_weight, seed)
    router.set_gate(gate)
    return facts


def refit_linear_head(router: Router, val: tuple[np.ndarray, np.ndarray], seed: int = 0) -> dict[str, float]:
    """Fit the router's linear head again over its current experts, as training fitted it; recalibrate after.

    After an expert is added (or others removed, merged, split), the regression is refitted on a
    seeded sample of every expert's stored vectors (the new one's too) and installed in place of
    the old one at the weight training used (router.config's linear_weight, else 1), each model
    temperature-scaled on `val` (x (n, d), gold (n,): the router's judged queries). The MLP and the
    prototypes are left as they are. A router does not keep the data's training queries; the intent
    sets and the retrieval benchmarks have none, so stored vectors are what training fitted it on too.
    Classic, 8 sources, med or cran left out and added, 2 dev folds (docs/lifecycle.md): this, then
    the recalibration, cost the old sources at most 0.95 points of acc@1 and 1.00 of nDCG@10 with
    the new source at 0.96 to 1.00, where the gradient fine-tune cost them 3.4 to 6.7 points of acc@1.
    """
    gate = router.gate
    if gate is None or not gate.linear_head:
        raise ValueError("refit_linear_head needs a router whose gate has a linear head (linear_weight > 0)")
    weight = router.config.get("linear_weight") or 1.0
    gate, facts = _with_fitted_linear(router, gate.without_linear(), val, None, weight, 0.5, seed)
    router.set_gate(gate)
    return facts


def _with_fitted_linear(
    router: Router,
    gate: Gate,
    val: tuple[np.ndarray, np.ndarray],
    queries: tuple[np.ndarray, np.ndarray] | None,
    weight: float,
    query_weight: float,
    seed: int,
) -> tuple[Gate, dict[str, float]]:
    """`gate` with a regression over the router's experts installed (add_linear_head), and what was fitted."""
    weight = check_linear_weight(weight)
    x_val, gold = val
    if not (np.asarray(gold) >= 0).any():
        raise ValueError("a linear head needs validation queries with a known expert to weigh it against the gate")
    rows = training_rows(labelled_sample(router.experts, PER_EXPERT, seed), queries, query_weight)
    fit = fit_linear(*rows, router.num_experts, seed=seed)
    t_gate = fit_temperature(infer(gate, x_val, "logits").astype(np.float64), gold)
    t_linear = fit_temperature(fit.logits(x_val), gold, low=1e-3, high=1e3)
    # Raw logits z_gate + s * z_linear with s = weight * t_gate / t_linear: at the gate's temperature
    # that is z_gate / t_gate + weight * z_linear / t_linear, the weighted product of the calibrated models.
    return gate.with_linear(fit.W, fit.b, weight * t_gate / t_linear), {
        "linear/l2": fit.l2,
        "linear/cv_acc@1": fit.cv_accuracy[fit.l2],
        "linear/weight": weight,
        "linear/own_temperature": t_linear,
    }


def query_labels(router: Router, texts: list[str], experts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The data's labelled training queries as (xq (m, d), gold (m,)); None when it has none."""
    if not texts:
        return None
    return router.prepare(texts)[0], router.expert_indices(experts)

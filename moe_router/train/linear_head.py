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

from moe_router.gate.confidence import fit_temperature, log_softmax
from moe_router.gate.linear import fit_linear, training_rows
from moe_router.gate.model import Gate, infer
from moe_router.index.expert import labelled_sample
from moe_router.routing.router import Router

PER_EXPERT = 5000  # stored vectors per expert the regression trains on (the evaluation's logistic baseline's sample)
# The weights a refit may fit (refit_linear_head(weight="fit")): a doubling grid, each at its own fitted temperature.
FIT_WEIGHTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


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


def check_refit_weight(value: object) -> float | str | None:
    """A refit's head weight: None (training's), "fit" (fitted on the judged queries) or a number > 0."""
    if value is None or (isinstance(value, str) and value == "fit"):
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"the refitted head's weight must be None (training's), 'fit' or a finite number > 0, got {value!r}"
        )
    return float(value)


def fit_head_weight(gate_logits: np.ndarray, linear_logits: np.ndarray, gold: np.ndarray) -> float:
    """The weight w of FIT_WEIGHTS whose softmax((gate_logits + w * linear_logits) / T), T fitted for each w,
    gives the gold experts the lowest NLL; the logits (n, E) each already at their own temperature."""
    keep = np.asarray(gold) >= 0
    zg, zl, gold = gate_logits[keep].astype(np.float64), linear_logits[keep].astype(np.float64), gold[keep]
    rows = np.arange(len(gold))

    def nll(w: float) -> float:
        z = zg + w * zl
        return float(-log_softmax(z / fit_temperature(z, gold, low=1e-3, high=1e3))[rows, gold].mean())

    losses = [nll(w) for w in FIT_WEIGHTS]
    return float(FIT_WEIGHTS[int(np.argmin(losses))])


def refit_linear_head(
    router: Router, val: tuple[np.ndarray, np.ndarray], seed: int = 0, weight: float | str | None = None
) -> dict[str, float]:
    """Fit the router's linear head again over its current experts, as training fitted it; recalibrate after.

    After an expert is added (or others removed, merged, split), the regression is refitted on a
    seeded sample of every expert's stored vectors (the new one's too) and installed in place of
    the old one at `weight`: None = the weight training used (router.config's linear_weight, else 1),
    "fit" = the one of FIT_WEIGHTS that best predicts `val`'s gold experts (fit_head_weight), each model
    temperature-scaled on `val` (x (n, d), gold (n,): the router's judged queries). The MLP and the
    prototypes are left as they are. Adding an expert the MLP never trained on, its pull on the
    others' queries is what a fitted weight counters: stackoverflow20 (trained at 0.5), wordpress
    added, test split, one run (docs/lifecycle.md): the old intents -2.7 points of acc@1 at 0.5, level
    at the fitted 2; on classic (trained at 1, med added) the fit chose 0.5 and 0.125 and did worse.
    A router does not keep the data's training queries; the intent sets and the retrieval benchmarks
    have none, so stored vectors are what training fitted it on too.
    Classic, 8 sources, med or cran left out and added, 2 dev folds (docs/lifecycle.md): this, then
    the recalibration, cost the old sources at most 0.95 points of acc@1 and 1.00 of nDCG@10 with
    the new source at 0.96 to 1.00, where the gradient fine-tune cost them 3.4 to 6.7 points of acc@1.
    """
    gate = router.gate
    if gate is None or not gate.linear_head:
        raise ValueError("refit_linear_head needs a router whose gate has a linear head (linear_weight > 0)")
    weight = check_refit_weight(weight)
    if weight is None:
        weight = router.config.get("linear_weight") or 1.0
    gate, facts = _with_fitted_linear(router, gate.without_linear(), val, None, weight, 0.5, seed)
    router.set_gate(gate)
    return facts


def _with_fitted_linear(
    router: Router,
    gate: Gate,
    val: tuple[np.ndarray, np.ndarray],
    queries: tuple[np.ndarray, np.ndarray] | None,
    weight: float | str,
    query_weight: float,
    seed: int,
) -> tuple[Gate, dict[str, float]]:
    """`gate` with a regression over the router's experts installed (add_linear_head), and what was fitted;
    `weight` "fit": the head's weight fitted on `val` (fit_head_weight)."""
    if weight != "fit":
        weight = check_linear_weight(weight)
    x_val, gold = val
    if not (np.asarray(gold) >= 0).any():
        raise ValueError("a linear head needs validation queries with a known expert to weigh it against the gate")
    rows = training_rows(labelled_sample(router.experts, PER_EXPERT, seed), queries, query_weight)
    fit = fit_linear(*rows, router.num_experts, seed=seed)
    gate_logits, linear_logits = infer(gate, x_val, "logits").astype(np.float64), fit.logits(x_val)
    t_gate = fit_temperature(gate_logits, gold)
    t_linear = fit_temperature(linear_logits, gold, low=1e-3, high=1e3)
    if weight == "fit":
        weight = fit_head_weight(gate_logits / t_gate, linear_logits / t_linear, np.asarray(gold))
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

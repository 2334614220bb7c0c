"""Multinomial logistic regression on query embeddings: the linear router a user tries first.

One home for it: the evaluation's logistic-regression baseline (eval.baselines) and the gate's
linear head (Gate.with_linear, fitted by train.pipeline) are both fitted here. Dimension legend:
m training rows, d dim, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # L2 penalties on the weights tried by cross-validation (per unit of mean NLL)


@dataclass(frozen=True)
class LinearFit:
    """A fitted multinomial logistic regression: logits = x @ W.T + b."""

    W: torch.Tensor  # (E, d)
    b: torch.Tensor  # (E,)
    l2: float  # the penalty cross-validation chose
    cv_accuracy: dict[float, float]  # {l2: held-out weighted accuracy}; NaN when the grid had one value

    def logits(self, xq: np.ndarray) -> np.ndarray:
        """(n, E) float64 logits of query vectors xq (n, d)."""
        x = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32))
        return (x @ self.W.T + self.b).numpy().astype(np.float64)


def training_rows(
    stored: tuple[np.ndarray, np.ndarray],
    queries: tuple[np.ndarray, np.ndarray] | None = None,
    query_weight: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (m, d), y (m,), w (m,)): stored vectors labelled with their expert, plus labelled queries.

    The queries (xq, gold; gold -1 = unknown, left out) take `query_weight` of the total weight,
    as the gate's judged training queries take targets.query_weight of its loss.
    """
    if not 0.0 <= query_weight < 1.0:
        raise ValueError(f"query_weight is a share of the loss in [0, 1), got {query_weight}")
    x, y = stored
    w = np.full(len(x), 1.0 / max(len(x), 1))
    if queries is not None:
        xq, gold = queries
        keep = np.asarray(gold) >= 0
        if keep.any() and query_weight > 0:
            x, y = np.concatenate([x, xq[keep]]), np.concatenate([y, np.asarray(gold)[keep]])
            w = np.concatenate([w * (1.0 - query_weight), np.full(keep.sum(), query_weight / keep.sum())])
    return x.astype(np.float32), y.astype(np.int64), w.astype(np.float32)


def fit_softmax(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 200,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (E, d), b (E,)) minimising sum_i w_i NLL_i / sum_i w_i + l2 |W|^2: full-batch L-BFGS from zero or `init`.

    x (m, d), y (m,) class index, w (m,) row weights. The objective is strictly convex, so the
    result depends on the data alone (no seed); `init` only warm-starts the search.
    """
    W = torch.zeros(num_classes, x.shape[1], dtype=x.dtype) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    share = w / w.sum()
    opt = torch.optim.LBFGS(
        [W, b], max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.cross_entropy(x @ W.T + b, y, reduction="none") * share).sum() + l2 * W.square().sum()
        loss.backward()
        return loss

    opt.step(objective)
    return W.detach(), b.detach()


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    num_classes: int,
    l2_grid: Sequence[float] = L2_GRID,
    folds: int = 3,
    max_iter: int = 200,
    seed: int = 0,
) -> LinearFit:
    """Logistic regression whose L2 penalty is chosen from `l2_grid` by `folds`-fold cross-validation.

    Held-out weighted accuracy decides (ties go to the stronger penalty); the chosen model is then
    refitted on all rows. x (m, d) float32, y (m,) class index, w (m,) row weights.
    """
    if not len(l2_grid) or min(l2_grid) < 0:
        raise ValueError(f"l2_grid must be non-empty penalties >= 0, got {list(l2_grid)}")
    if len(x) != len(y) or len(x) != len(w) or not len(x):
        raise ValueError(
            f"logistic regression needs as many labels and weights as rows (>= 1): {len(x)}, {len(y)}, {len(w)}"
        )
    X, Y, Wt = (
        torch.from_numpy(np.ascontiguousarray(a))
        for a in (x.astype(np.float32), y.astype(np.int64), w.astype(np.float32))
    )
    grid = sorted(l2_grid, reverse=True)
    cv = _cross_validate(X, Y, Wt, num_classes, grid, folds, max_iter, seed)
    l2 = max(cv, key=lambda p: (cv[p], p))  # ties: the stronger penalty
    W, b = fit_softmax(X, Y, Wt, num_classes, l2, max_iter)
    return LinearFit(W, b, l2, cv)


def _cross_validate(
    X: torch.Tensor,
    Y: torch.Tensor,
    Wt: torch.Tensor,
    num_classes: int,
    grid: list[float],
    folds: int,
    max_iter: int,
    seed: int,
) -> dict[float, float]:
    """{l2: held-out weighted accuracy} over `folds` seeded folds (no fit when the grid has one value)."""
    if len(grid) == 1:
        return {grid[0]: float("nan")}
    if not 2 <= folds <= len(X):
        raise ValueError(f"cross-validation needs 2 <= folds <= {len(X)} training rows, got folds={folds}")
    fold = torch.from_numpy(np.random.default_rng(seed).permutation(len(X)) % folds)
    hits = dict.fromkeys(grid, 0.0)
    for f in range(folds):
        train, held = fold != f, fold == f
        init = None
        for l2 in grid:  # strongest penalty first: each fit warm-starts the next, weaker one
            init = fit_softmax(X[train], Y[train], Wt[train], num_classes, l2, max_iter, init)
            right = ((X[held] @ init[0].T + init[1]).argmax(1) == Y[held]).to(Wt.dtype)
            hits[l2] += float((right * Wt[held]).sum())
    return {l2: h / float(Wt.sum()) for l2, h in hits.items()}

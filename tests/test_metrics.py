"""Metrics against hand-computed cases, and overlap_from_counts against an actual routed search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_router import Router
from moe_router.index.exact import exact_neighbours, neighbour_counts
from moe_router.metrics import (
    accuracy_at_k,
    auroc,
    ece_noise_floor,
    expected_calibration_error,
    load_stats,
    overlap_at_k,
    overlap_from_counts,
    top_experts,
    validation_metrics,
)

PROBS = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])


def test_top_experts__orders_by_probability_and_breaks_ties_by_lower_index() -> None:
    np.testing.assert_array_equal(top_experts(PROBS, 2), [[1, 2], [0, 1], [2, 1], [0, 1]])


def test_accuracy_at_k__hand_computed() -> None:
    gold = np.array([1, 1, 0, -1])  # -1: the router has no such expert, always a miss
    assert accuracy_at_k(PROBS, gold, 1) == 0.25
    assert accuracy_at_k(PROBS, gold, 2) == 0.5
    assert accuracy_at_k(PROBS, gold, 3) == 0.75


def test_overlap_at_k__hand_computed_with_padding() -> None:
    routed = np.array([[1, 2, 3], [4, -1, -1], [7, 8, 9]])
    exact = np.array([[3, 2, 9], [4, 5, 6], [1, 2, 3]])
    assert overlap_at_k(routed, exact) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)


def test_overlap_from_counts__hand_computed() -> None:
    counts = np.array([[6.0, 3.0, 1.0], [0.0, 0.0, 10.0]])
    assert overlap_from_counts(np.array([[0], [0]]), counts, k=10) == pytest.approx(0.3)
    assert overlap_from_counts(np.array([[0, 1], [2, 1]]), counts, k=10) == pytest.approx(0.95)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("t", [1, 2, 3])
def test_overlap_from_counts__equals_overlap_at_k_of_an_actual_routed_search(metric: str, t: int) -> None:
    rng = np.random.default_rng(11)
    d, k = 16, 10
    router = Router(d, metric)
    for e in range(5):  # overlapping clusters, so neighbours straddle experts
        router.add_expert(f"e{e}", rng.normal(size=d) * 0.5 + rng.normal(size=(60 + 10 * e, d)))
    xq, _ = router.prepare(rng.normal(size=(200, d)))
    probs = rng.dirichlet(np.ones(5), size=len(xq))  # any routing decision will do
    top = top_experts(probs, t)

    xb = np.concatenate([e.vectors() for e in router.experts])
    ids = np.concatenate([e.ids for e in router.experts])
    owner = np.concatenate([np.full(e.ntotal, i) for i, e in enumerate(router.experts)])
    rows = exact_neighbours(xq, xb, k, metric)
    routed = router.search_experts(xq, k, top)

    expected = overlap_at_k(routed.I, ids[rows])
    assert overlap_from_counts(top, neighbour_counts(rows, owner, 5), k) == pytest.approx(
        expected, abs=1e-6
    )  # float32 counts
    assert 0.0 < expected < 1.0  # a case where routing loses some neighbours, not a trivial one


def test_validation_metrics__key_names_k_and_equal_acc_at_1_and_overlap_at_top_t() -> None:
    counts = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])  # exact top-3 per expert
    gold = np.array([1, 1, 2, 0])
    out = validation_metrics(PROBS, gold, counts, top=2, k=3)
    assert out == {
        "val/acc@1": accuracy_at_k(PROBS, gold, 1),
        "val/recall@3": overlap_from_counts(top_experts(PROBS, 2), counts, 3),
    }
    assert out["val/recall@3"] == pytest.approx((1 / 3 + 0 + 2 / 3 + 1) / 4)  # top 2 of PROBS: [1 2] [0 1] [2 1] [0 1]
    assert validation_metrics(PROBS, gold, counts, top=5, k=3)["val/recall@3"] == 1.0  # capped at E: exhaustive


def test_load_stats__hand_computed_with_dead_expert() -> None:
    top = np.array([[0], [0], [0], [0], [1], [1], [1], [2]])  # shares 0.5, 0.375, 0.125, 0
    stats = load_stats(top, 4)
    assert stats["shares"] == [0.5, 0.375, 0.125, 0.0]
    assert stats["max_over_mean"] == pytest.approx(2.0)
    assert stats["cv"] == pytest.approx(math.sqrt((0.25**2 + 0.125**2 + 0.125**2 + 0.25**2) / 4) / 0.25)
    assert stats["dead"] == 1  # only the expert with share 0 is below 1 / (4 * 4)


def test_load_stats__dead_rule_is_strictly_below_one_over_four_e() -> None:
    at_threshold = np.array([[0]] * 7 + [[1]])  # E = 2: share 1/8 is exactly 1/(4E): alive
    assert load_stats(at_threshold, 2)["dead"] == 0
    below = np.array([[0]] * 9 + [[1]])  # share 1/10 < 1/8: dead
    assert load_stats(below, 2)["dead"] == 1
    uniform = load_stats(np.array([[0, 1], [2, 3], [1, 2], [3, 0]]), 4)  # (n, t) with t = 2
    assert uniform["max_over_mean"] == 1.0 and uniform["cv"] == 0.0 and uniform["dead"] == 0


@pytest.mark.parametrize(
    "pos, neg, expected",
    [
        ([3.0, 4.0], [1.0, 2.0], 1.0),
        ([1.0], [2.0, 3.0], 0.0),
        ([1.0, 2.0], [2.0, 0.0], 0.625),  # pairs: (1,2)=0, (1,0)=1, (2,2)=0.5 tie, (2,0)=1
        ([0.5, 0.5], [0.5, 0.5, 0.5], 0.5),  # all tied
        ([0.9, 0.4, 0.6], [0.5, 0.1], 5 / 6),
    ],
)
def test_auroc__hand_computed_including_ties(pos: list, neg: list, expected: float) -> None:
    assert auroc(np.array(pos), np.array(neg)) == pytest.approx(expected)


def test_auroc__equals_pairwise_probability_on_random_scores_with_ties() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, size=40).astype(float), rng.integers(0, 5, size=30).astype(float)
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(pos, neg) == pytest.approx(pairwise)


def test_auroc_without_positives_or_negatives__raises() -> None:
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auroc(np.array([]), np.array([0.3]))


def test_expected_calibration_error__hand_computed() -> None:
    confidence = np.array([0.95, 0.95, 0.25, 0.25])
    correct = np.array([1, 0, 0, 0])  # bin 0.9-1.0: |0.5 - 0.95|; bin 0.2-0.3: |0 - 0.25|; each half the data
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.25)


def test_expected_calibration_error__zero_when_calibrated_and_includes_edges() -> None:
    assert expected_calibration_error(np.array([1.0, 1.0, 0.0]), np.array([1, 1, 0])) == 0.0
    assert expected_calibration_error(np.array([0.75] * 4), np.array([1, 1, 1, 0]), bins=4) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([0, 1])) == pytest.approx(1.0)


def test_ece_noise_floor__shrinks_with_queries_and_holds_a_calibrated_predictor() -> None:
    rng = np.random.default_rng(5)
    small, large = rng.uniform(0.4, 1.0, 300), rng.uniform(0.4, 1.0, 30_000)
    mean_small, q90_small = ece_noise_floor(small, draws=300)
    mean_large, _ = ece_noise_floor(large, draws=30)
    assert mean_large < mean_small / 5 and mean_small < q90_small  # noise ~ 1 / sqrt(n)
    # A calibrated predictor's measured ECE lands inside the floor's range about 90% of the time.
    inside = [expected_calibration_error(small, rng.random(300) < small) <= q90_small for _ in range(400)]
    assert 0.82 < np.mean(inside) < 0.97
    assert ece_noise_floor(np.ones(50), draws=20) == (0.0, 0.0)  # always sure and always right: no noise
    assert ece_noise_floor(small, draws=50, seed=1) == ece_noise_floor(small, draws=50, seed=1)
    with pytest.raises(ValueError, match="non-empty 1-d array"):
        ece_noise_floor(np.array([]))

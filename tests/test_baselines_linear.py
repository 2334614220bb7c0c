"""The logistic-regression baseline: it learns what is learnable and nothing else, its own calibration, its rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_router import HashingEmbedder, Router
from moe_router.data.beir import load_beir
from moe_router.data.datasets import load_dataset
from moe_router.eval.baselines import BASELINES, LogisticRegressionRouter
from moe_router.eval.intents import evaluate_intents
from moe_router.eval.report import markdown_table, retrieval_table
from moe_router.eval.retrieval import evaluate_retrieval
from moe_router.gate import initial_gate
from moe_router.gate.confidence import fit_temperature, softmax
from moe_router.metrics import expected_calibration_error
from moe_router.train.build import router_from_dataset
from moe_router.vectors import prepare
from tests.helpers import clusters, write_beir, write_jsonl
from tests.test_training import compose_config

D = 32
NAME = LogisticRegressionRouter.name


def cluster_router(xs: list[np.ndarray], stored: int) -> Router:
    """One expert per cluster holding its first `stored` (normalised) rows."""
    router = Router(D, "ip")
    for i, x in enumerate(xs):
        router.add_expert(f"e{i}", x[:stored])
    return router


def held_out(xs: list[np.ndarray], start: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, gold) of every cluster's rows from `start` on: rows no expert stores."""
    x = np.concatenate([c[start:] for c in xs])
    return prepare(x, D, "ip"), np.repeat(np.arange(len(xs)), [len(c) - start for c in xs])


def test_logreg__separates_separable_clusters() -> None:
    xs = clusters(4, 120, D, seed=0, noise=0.6)
    lr = LogisticRegressionRouter(cluster_router(xs, 80), seed=0)
    x, gold = held_out(xs, 80)
    assert float((lr.scores(x).argmax(1) == gold).mean()) >= 0.97
    assert lr.facts["cv_acc@1"] >= 0.95 and lr.l2 in lr.cv_accuracy


def test_logreg__on_shuffled_labels_stays_at_chance() -> None:
    xs = clusters(4, 120, D, seed=0, noise=0.6)
    pool = np.concatenate([c[:80] for c in xs])
    rng = np.random.default_rng(1)
    shuffled = [part for part in np.array_split(pool[rng.permutation(len(pool))], 4)]  # expert unrelated to cluster
    lr = LogisticRegressionRouter(cluster_router(shuffled, 80), seed=0)
    x, gold = held_out(xs, 80)
    acc = float((lr.scores(x).argmax(1) == gold).mean())
    assert acc < 0.4  # chance is 0.25 (160 queries: 0.4 is 4 standard deviations above it)
    assert lr.facts["cv_acc@1"] < 0.4  # cross-validation sees no signal either


def test_logreg__calibration_fits_the_temperature_and_lowers_ece_of_an_overconfident_fit() -> None:
    xs = clusters(4, 240, D, seed=2, noise=2.5)  # overlapping clusters; no penalty: an overconfident fit
    router = cluster_router(xs, 40)
    calib = held_out([c[40:140] for c in xs], 0)
    x, gold = held_out([c[140:] for c in xs], 0)
    raw = LogisticRegressionRouter(router, l2_grid=[0.0], max_iter=500)
    cal = LogisticRegressionRouter(router, calib=calib, l2_grid=[0.0], max_iter=500)

    def ece(lr: LogisticRegressionRouter) -> float:
        p = softmax(lr.scores(x).astype(np.float64))
        return expected_calibration_error(p.max(1), p.argmax(1) == gold)

    assert cal.temperature > 1.5 and ece(cal) < 0.5 * ece(raw)
    assert np.array_equal(cal.scores(x).argmax(1), raw.scores(x).argmax(1))  # a temperature keeps the ranking
    # calibrated scores are at the NLL optimum on the calibration queries: refitting finds T = 1
    assert fit_temperature(cal.scores(calib[0]).astype(np.float64), calib[1]) == pytest.approx(1.0, abs=0.02)
    with_bias = LogisticRegressionRouter(router, calib=calib, bias=True, l2_grid=[0.0], max_iter=500)
    assert with_bias.offsets.shape == (4,) and with_bias.temperature > 1.5


def test_logreg__is_deterministic_under_its_seed() -> None:
    xs = clusters(3, 200, D, seed=3, noise=1.5)
    router = cluster_router(xs, 150)
    x, _ = held_out(xs, 150)
    grid = [1e-4, 1e-2]
    a, b = (LogisticRegressionRouter(router, l2_grid=grid, per_expert=100, seed=7) for _ in range(2))
    assert np.array_equal(a.scores(x), b.scores(x)) and a.cv_accuracy == b.cv_accuracy
    c = LogisticRegressionRouter(router, l2_grid=grid, per_expert=100, seed=8)  # another sample of 100 of 150
    assert not np.array_equal(a.scores(x), c.scores(x))


def test_logreg__judged_queries_move_it_where_the_queries_go() -> None:
    xs = clusters(2, 100, D, seed=4, noise=0.6)
    router = cluster_router(xs, 60)
    x, gold = held_out(xs, 60)
    plain = LogisticRegressionRouter(router, l2_grid=[1e-4])
    told = LogisticRegressionRouter(
        router, x, 1 - gold, query_weight=0.9, l2_grid=[1e-4]
    )  # a query log that says the opposite
    assert float((plain.scores(x).argmax(1) == gold).mean()) == 1.0
    assert float((told.scores(x).argmax(1) == 1 - gold).mean()) >= 0.9


def test_logreg__bad_input_is_named() -> None:
    xs = clusters(2, 30, D, seed=0)
    router = cluster_router(xs, 30)
    lr = LogisticRegressionRouter(router, l2_grid=[1e-4])
    with pytest.raises(ValueError, match=r"queries: expected an \(n, 32\) array, got shape \(5, 16\)"):
        lr.scores(np.zeros((5, 16), np.float32))
    with pytest.raises(ValueError, match="needs stored vectors to train on; the router has none"):
        LogisticRegressionRouter(Router(D, "ip"))
    with pytest.raises(ValueError, match=r"one gold expert in \[0, 2\) per training query .*got 4 queries and 3"):
        LogisticRegressionRouter(router, np.zeros((4, D), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"training queries: expected an \(n, 32\) array"):
        LogisticRegressionRouter(router, np.zeros((4, 8), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="l2_grid must be non-empty"):
        LogisticRegressionRouter(router, l2_grid=[])
    with pytest.raises(ValueError, match="query_weight is a share of the loss"):
        LogisticRegressionRouter(router, query_weight=1.5)


def test_logreg__is_a_default_baseline_of_the_evaluation_config() -> None:
    assert BASELINES["logreg"] is LogisticRegressionRouter
    assert "logreg" in compose_config("eval", []).baselines


def test_logreg_row__in_the_intent_report_with_its_calibration(tmp_path: Path) -> None:
    data = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", train=30, val=8, test=10)))
    router = router_from_dataset(data, HashingEmbedder(dim=64, seed=0))
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    report, scores = evaluate_intents(
        router, data, "test", experts_searched=[1, 2], speed_batches=[], capacity_factor=None, baselines=["logreg"]
    )
    row = report["routers"][NAME]
    xq = router.prepare(data.queries("test"))[0]
    gold = np.array([router.expert_names.index(e) for e in data.gold_experts("test")])
    assert row["acc@1"] == pytest.approx(float((scores[NAME].argmax(1) == gold).mean()))
    assert {"recall@10@1", "recall@10@2", "recall@10@adaptive", "ece", "l2", "own_temperature"} <= set(row)
    assert 0.0 <= row["ece"] <= 1.0 and row["scans_everything"] is False
    # the same model, rebuilt by hand on the gate's validation queries, gives the same scores
    xv = router.prepare(data.queries("val"))[0]
    gv = np.array([router.expert_names.index(e) for e in data.gold_experts("val")])
    assert np.array_equal(scores[NAME], LogisticRegressionRouter(router, calib=(xv, gv)).scores(xq))
    assert NAME in markdown_table(report, [1, 2], 10) and "| ECE |" in markdown_table(report, [1, 2], 10)


def test_logreg_row__in_the_retrieval_report_at_the_same_settings(tmp_path: Path) -> None:
    data = load_beir(write_beir(tmp_path / "beir", docs=20, queries={"train": 4, "dev": 4, "test": 5}))
    router = router_from_dataset(data, HashingEmbedder(dim=64, seed=0))
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    report, _ = evaluate_retrieval(router, data, "test", p_grid=[0.5, 0.99], baselines=["logreg"])
    row, gate = report["routers"][NAME], report["routers"]["gate (ours)"]
    for key in ("source_acc@1", "ece", "ndcg@10@1", "ndcg@10@2", "ndcg@10@adaptive", "ndcg@10@1.5_sources"):
        assert key in row and key in gate, key
    assert row["sources@1"] == 1.0 and row["sources@2"] == 2.0
    assert [p["setting"] for p in report["frontier"][NAME]] == [p["setting"] for p in report["frontier"]["gate (ours)"]]
    assert NAME in retrieval_table(report)

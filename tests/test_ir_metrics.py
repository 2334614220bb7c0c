"""IR metrics against relevance judgments: hand-computed cases and the ranx reference library."""

from __future__ import annotations

from math import log2

import numpy as np
import pytest

from moe_router.eval.ir import ir_metrics, mrr_at_k, ndcg_at_k, recall_at_k

# q1: graded judgments, one judged-irrelevant doc (c, score 0); q2: one relevant doc, found first;
# q3: judged but absent from the run (scores 0); q4: only a zero judgment, so it is not counted.
QRELS = {"q1": {"a": 3, "b": 1, "c": 0, "d": 2}, "q2": {"e": 1}, "q3": {"f": 1}, "q4": {"g": 0}}
RUN = {"q1": ["x", "a", "c", "b", "y"], "q2": ["e", "z"], "q4": ["g"]}


def test_ndcg__hand_computed_graded_case() -> None:
    q1 = (3 / log2(3) + 1 / log2(5)) / (3 / log2(2) + 2 / log2(3) + 1 / log2(4))  # ranks 2 and 4; ideal 3, 2, 1
    assert ndcg_at_k(RUN, QRELS, 10) == pytest.approx((q1 + 1.0 + 0.0) / 3)
    # at k = 1 only rank 1 counts: q1 has x there (gain 0); the ideal is a single 3
    assert ndcg_at_k(RUN, QRELS, 1) == pytest.approx((0.0 + 1.0 + 0.0) / 3)


def test_recall__hand_computed_case() -> None:
    assert recall_at_k(RUN, QRELS, 10) == pytest.approx((2 / 3 + 1 + 0) / 3)  # q1 finds a, b of {a, b, d}
    assert recall_at_k(RUN, QRELS, 2) == pytest.approx((1 / 3 + 1 + 0) / 3)  # q1's top 2 holds only a
    assert recall_at_k(RUN, QRELS, 100) == recall_at_k(RUN, QRELS, 10)  # nothing more in the run


def test_mrr__hand_computed_case() -> None:
    assert mrr_at_k(RUN, QRELS, 10) == pytest.approx((1 / 2 + 1 + 0) / 3)  # q1's first relevant doc is at rank 2
    assert mrr_at_k(RUN, QRELS, 1) == pytest.approx((0 + 1 + 0) / 3)


def test_metrics__a_repeated_doc_counts_once() -> None:
    qrels = {"q": {"a": 1, "b": 1}}
    assert recall_at_k({"q": ["a", "a", "b"]}, qrels, 2) == 1.0  # the duplicate does not push b out of the top 2
    assert ndcg_at_k({"q": ["a", "a"]}, qrels, 10) == pytest.approx(1 / (1 + 1 / log2(3)))


def test_metrics__perfect_run_scores_one_and_empty_run_zero() -> None:
    qrels = {"q1": {"a": 2, "b": 1}, "q2": {"c": 1}}
    perfect = {"q1": ["a", "b"], "q2": ["c"]}
    assert ir_metrics(perfect, qrels) == {"ndcg@10": 1.0, "recall@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    assert ir_metrics({}, qrels) == {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}


def test_metrics__bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ndcg_at_k(RUN, QRELS, 0)
    with pytest.raises(ValueError, match="no query with a relevant document"):
        recall_at_k(RUN, {"q": {"a": 0}}, 10)
    with pytest.raises(ValueError, match=r"run\['q1'\] must be a ranked sequence"):
        mrr_at_k({"q1": "abc"}, QRELS, 10)


def _random_case(seed: int) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """Seeded run and graded qrels over a 300-doc pool: 40 queries, 0-12 judgments each (some grade 0)."""
    rng = np.random.default_rng(seed)
    run, qrels = {}, {}
    for q in range(40):
        judged = rng.choice(300, size=int(rng.integers(1, 13)), replace=False)
        grades = rng.integers(0, 4, size=len(judged))
        if not (grades > 0).any():
            grades[0] = 1
        qrels[f"q{q}"] = {f"d{d}": int(g) for d, g in zip(judged, grades)}
        # a ranking of up to 150 docs that favours judged ones, so the metrics are far from 0 and 1
        pool = np.concatenate([judged, rng.choice(300, size=200)])
        order = np.argsort(-(rng.random(len(pool)) + 0.6 * (np.arange(len(pool)) < len(judged))))
        run[f"q{q}"] = [f"d{d}" for d in dict.fromkeys(pool[order].tolist())][:150]
    return run, qrels


@pytest.mark.slow  # ranx compiles its metrics with numba on first use (~20 s)
def test_metrics__match_ranx() -> None:
    ranx = pytest.importorskip("ranx")
    for seed in range(3):
        run, qrels = _random_case(seed)
        ours = ir_metrics(run, qrels)
        scored = {
            q: {d: float(len(docs) - r) for r, d in enumerate(docs)} for q, docs in run.items()
        }  # distinct, descending
        theirs = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(scored), ["ndcg@10", "recall@10", "recall@100", "mrr@10"])
        for key, value in theirs.items():
            assert ours[key] == pytest.approx(float(value), abs=1e-9), (seed, key)
        assert 0.1 < ours["ndcg@10"] < 0.9 and 0.1 < ours["mrr@10"] < 0.9, ours  # the case is not degenerate

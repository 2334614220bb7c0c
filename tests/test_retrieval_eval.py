"""Retrieval evaluation against qrels, the adaptive (top-p) rows and frontier, the new baselines.

Oracles: a brute-force numpy search over the documents a setting may see, scored with the IR metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_router import Router
from moe_router.apps.evaluate import evaluate_checkpoint
from moe_router.apps.train import train
from moe_router.data.beir import BeirDataset, load_beir
from moe_router.data.datasets import load_dataset
from moe_router.embed.hashing import HashingEmbedder
from moe_router.eval.adaptive import (
    Selection,
    fixed_selection,
    p_at_cost,
    prefix_search,
    top_k_selection,
    top_p_selection,
)
from moe_router.eval.baselines import GATE, KnnVoteRouter, RagRouteStyle, ReddeStyle
from moe_router.eval.intents import evaluate_intents
from moe_router.eval.ir import ir_metrics
from moe_router.eval.retrieval import EXHAUSTIVE, ORACLE, evaluate_retrieval
from moe_router.gate import initial_gate
from moe_router.metrics import overlap_at_k, top_experts
from moe_router.train.build import router_from_dataset
from moe_router.vectors import prepare
from tests.helpers import clusters, write_beir, write_jsonl
from tests.test_training import _train_overrides, compose_config

METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


@pytest.fixture
def beir(tmp_path: Path) -> tuple[Router, BeirDataset]:
    """Three sources of 20 documents, a hashing embedder and a linear gate at the centroids."""
    data = load_beir(write_beir(tmp_path / "beir", docs=20, queries={"train": 4, "dev": 4, "test": 5}))
    router = router_from_dataset(data, HashingEmbedder(dim=64, seed=0))
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    return router, data


def brute_force_run(
    router: Router, data: BeirDataset, split: str, allowed: np.ndarray, bonus: np.ndarray | None = None
) -> dict[str, list[str]]:
    """Top-100 doc ids per query of an exact numpy search over only the sources allowed[q] (n, E) True,
    each document's similarity plus bonus[q, its source] when given."""
    names = router.expert_names
    doc_ids = [i for s in names for i in data.docs[s].ids]
    owner = np.array([names.index(s) for s in names for _ in data.docs[s].ids])
    xb = prepare(router.embedder.encode([t for s in names for t in data.documents(s)]), router.dim, "ip")
    xq = prepare(router.embedder.encode(data.queries(split)), router.dim, "ip")
    sims = xq.astype(np.float64) @ xb.T.astype(np.float64) + (0.0 if bonus is None else bonus[:, owner])  # (n, docs)
    scores = np.where(allowed[:, owner], sims, -np.inf)
    run = {}
    for qid, row, ok in zip(data.query_ids(split), scores, allowed[:, owner]):
        order = np.argsort(-row, kind="stable")[:100]
        run[qid] = [doc_ids[j] for j in order if ok[j]]
    return run


def brute_force_metrics(router: Router, data: BeirDataset, split: str, allowed: np.ndarray) -> dict[str, float]:
    """IR metrics of an exact numpy search per query over only the sources allowed[q] (n, E) True."""
    return ir_metrics(brute_force_run(router, data, split, allowed), data.qrels(split))


def test_exhaustive_row__equals_a_brute_force_numpy_search(beir: tuple[Router, BeirDataset]) -> None:
    router, data = beir
    report, _ = evaluate_retrieval(router, data, "test", baselines=["centroid"])
    expected = brute_force_metrics(router, data, "test", np.ones((15, 3), dtype=bool))
    for m in METRICS:
        assert report[f"{m}@exhaustive"] == pytest.approx(expected[m]), m
    assert report["sources@exhaustive"] == 3.0 and report["scanned@exhaustive"] == 1.0


def test_oracle_row__searches_only_the_gold_source(beir: tuple[Router, BeirDataset]) -> None:
    router, data = beir
    report, _ = evaluate_retrieval(router, data, "test", baselines=[])
    gold = np.array([router.expert_indices([s])[0] for s in data.gold_sources("test")])
    allowed = np.eye(3, dtype=bool)[gold]  # (n, E): only the gold source
    expected = brute_force_metrics(router, data, "test", allowed)
    for m in METRICS:
        assert report[f"{m}@oracle"] == pytest.approx(expected[m]), m
    assert report["relevant_share@oracle"] == 1.0 and report["sources@oracle"] == 1.0
    sizes = np.array([e.ntotal for e in router.experts])
    assert report["scanned@oracle"] == pytest.approx(sizes[gold].mean() / sizes.sum())
    xq = router.prepare(data.queries("test"))[0]
    _, owner, _ = prefix_search(router, xq, 10, fixed_selection(gold[:, None]))
    assert (owner == gold[:, None]).all()  # every hit comes from the query's gold source


def test_gate_rows__equal_brute_force_over_the_gates_sources(beir: tuple[Router, BeirDataset]) -> None:
    router, data = beir
    report, scores = evaluate_retrieval(router, data, "test", baselines=[])
    probs = scores[GATE]
    for setting, sel in (
        ("1", top_k_selection(probs, 1)),
        ("2", top_k_selection(probs, 2)),
        ("adaptive", top_p_selection(probs, 0.9, 3)),
    ):
        expected = brute_force_metrics(router, data, "test", sel.mask(3))
        for m in METRICS:
            assert report[f"{m}@{setting}"] == pytest.approx(expected[m]), (setting, m)
        assert report[f"sources@{setting}"] == pytest.approx(sel.mean_experts)
    gold = np.array([router.expert_indices([s])[0] for s in data.gold_sources("test")])
    assert report["source_acc@1"] == pytest.approx(float((probs.argmax(1) == gold).mean()))
    assert report["relevant_share@1"] == pytest.approx(
        report["source_acc@1"]
    )  # every query's relevant docs lie in one source


def test_retrieval_report__baseline_rows_and_frontier(beir: tuple[Router, BeirDataset]) -> None:
    router, data = beir
    report, _ = evaluate_retrieval(router, data, "dev", p_grid=[0.5, 0.99], baselines=["centroid", "ragroute", "redde"])
    assert set(report["routers"]) == {
        GATE,
        "centroid",
        "RAGRoute style (relevance MLP)",
        "ReDDE style (300-vector sample/expert)",
        EXHAUSTIVE,
        ORACLE,
    }
    for name, points in report["frontier"].items():
        assert [p["setting"] for p in points] == ["top-1", "top-2", "top-3", "p=0.5", "p=0.99"], name
        top3 = points[2]
        assert top3["experts"] == 3.0 and top3["quality"] == pytest.approx(
            report["ndcg@10@exhaustive"]
        )  # all = exhaustive
        assert points[0]["quality"] == pytest.approx(report["routers"][name]["ndcg@10@1"])
        assert 1.0 <= points[3]["experts"] <= points[4]["experts"] <= 3.0  # more mass, never fewer sources


def test_retrieval_bad_arguments__are_named(beir: tuple[Router, BeirDataset]) -> None:
    router, data = beir
    with pytest.raises(ValueError, match=r"top_p must be a probability mass in \(0, 1\], got 1.5"):
        evaluate_retrieval(router, data, "test", top_p=1.5)
    with pytest.raises(ValueError, match="no judged 'train' queries"):
        evaluate_retrieval(router, load_beir(write_beir(data.root.parent / "b2", queries={"dev": 2})), "train")
    with pytest.raises(ValueError, match=r"unknown baseline\(s\) \['nope'\]"):
        evaluate_retrieval(router, data, "test", baselines=["nope"])


def test_evaluate_script_form__writes_the_checked_keys(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir", docs=20)
    train(compose_config("train", [*_train_overrides(tmp_path), "data=beir", f"data.root={root}"]))
    cfg = compose_config(
        "eval",
        [
            "data=beir",
            f"data.root={root}",
            f"ckpt={tmp_path}/ckpt",
            "split=test",
            f"report={tmp_path}/R.json",
            f"cache_dir={tmp_path}/cache",
            f"++out_dir={tmp_path}/out",
        ],
    )
    evaluate_checkpoint(cfg)
    report = json.loads((tmp_path / "R.json").read_text())
    for key in ("source_acc@1", "ndcg@10@1", "ndcg@10@2", "ndcg@10@adaptive", "ndcg@10@exhaustive", "ndcg@10@oracle"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 1.0, key
    assert isinstance(report["sources@adaptive"], float) and 1.0 <= report["sources@adaptive"] <= 3.0
    assert report["queries"] == 9 and report["split"] == "test"
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    assert "oracle source" in (tmp_path / "out" / "table.md").read_text()

    # Router.search with top_p on the loaded checkpoint: hits name their documents, and scored against the
    # judgments they give the report's adaptive row (same selection, same merge)
    router = Router.load(tmp_path / "ckpt", cache_dir=tmp_path / "cache")
    data = load_beir(root)
    hits = router.search(data.queries("test"), k=10, top_p=0.9)
    docs = {i: s for s in data.sources for i in data.docs[s].ids}
    assert all(docs[h.metadata["_id"]] == h.expert for row in hits for h in row)
    run = {q: [h.metadata["_id"] for h in row] for q, row in zip(data.query_ids("test"), hits)}
    ours = ir_metrics(run, data.qrels("test"))
    for m in ("ndcg@10", "recall@10", "mrr@10"):
        assert report[f"{m}@adaptive"] == pytest.approx(ours[m]), m


# ---------------------------------------------------------------- adaptive selection and the intent report


def test_top_p_selection__minimal_prefix_reaching_the_mass() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(6, 0.5), size=200)  # (n, E)
    for p in (0.3, 0.7, 0.9, 0.99):
        sel = top_p_selection(probs, p, 4)
        mass = np.take_along_axis(probs, sel.order, 1).cumsum(1)  # (n, E)
        reached = mass[np.arange(200), sel.count - 1]
        assert ((reached >= p - 1e-9) | (sel.count == 4)).all() and (1 <= sel.count).all() and (sel.count <= 4).all()
        shorter = np.where(sel.count > 1, mass[np.arange(200), np.maximum(sel.count - 2, 0)], -1.0)
        assert (shorter < p).all()  # one expert fewer would not reach p: the set is minimal
        assert (sel.order[:, 0] == probs.argmax(1)).all()
        assert (sel.mask(6).sum(1) == sel.count).all()


def test_p_at_cost__largest_mass_within_the_budget() -> None:
    probs = np.random.default_rng(1).dirichlet(np.full(8, 0.3), size=500)  # (n, E)
    sizes = np.arange(1, 9, dtype=np.float64) * 10
    for target, by in ((1.5, None), (2.5, None), (0.3, sizes)):
        p = p_at_cost(probs, target, 4, by)

        def cost(q: float, by: np.ndarray | None = by) -> float:
            sel = top_p_selection(probs, q, 4)
            return sel.mean_experts if by is None else float((sel.mask(8) * by).sum(1).mean() / by.sum())

        assert cost(p) <= target + 1e-12 and cost(min(1.0, p + 1e-4)) > target, (target, p)
    assert p_at_cost(probs, 4.0, 4) == 1.0  # even p = 1 stays within 4 experts


def test_prefix_search__equals_search_experts_per_count(router_ip: Router, queries: np.ndarray) -> None:
    probs = router_ip.gate_probs(queries)
    sel = Selection(top_experts(probs, 4), np.arange(len(queries)) % 3 + 1)  # 1, 2 or 3 experts by row
    ids, owner, scanned = prefix_search(router_ip, queries, 5, sel)
    for q in range(len(queries)):
        res = router_ip.search_experts(queries[q : q + 1], 5, sel.order[q : q + 1, : sel.count[q]])
        assert (ids[q] == res.I[0]).all() and (owner[q] == res.E[0]).all() and scanned[q] == res.scanned[0]


def test_intent_report__adaptive_rows_and_frontier_agree_with_top_k(tmp_path: Path) -> None:
    data = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", train=30, val=8, test=10)))
    router = router_from_dataset(data, HashingEmbedder(dim=64, seed=0))
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    report, scores = evaluate_intents(
        router,
        data,
        "test",
        experts_searched=[1, 2],
        speed_batches=[],
        capacity_factor=None,
        baselines=["centroid", "ragroute", "redde"],
        p_grid=[0.6, 0.95],
    )
    for name, points in report["frontier"].items():
        by = {p["setting"]: p for p in points}
        assert by["top-1"]["quality"] == pytest.approx(report["routers"][name]["recall@10@1"]), name
        assert by["top-2"]["quality"] == pytest.approx(report["routers"][name]["recall@10@2"]), name
        assert by["top-3"]["quality"] == 1.0 and by["top-3"]["scanned"] == 1.0  # every expert = exhaustive
    xq = router.prepare(data.queries("test"))[0]
    sel = top_p_selection(scores[GATE], 0.9, 3)
    exact = brute_force_ids(router, xq, 10)
    assert report["recall@10@adaptive"] == pytest.approx(overlap_at_k(prefix_search(router, xq, 10, sel)[0], exact))
    assert report["experts@adaptive"] == pytest.approx(sel.mean_experts)
    assert "recall@10@1.5_experts" in report and "recall@10@top2_scanned" in report


def brute_force_ids(router: Router, xq: np.ndarray, k: int) -> np.ndarray:
    """(n, k) global ids of the exact top-k over every stored vector (numpy, float64)."""
    xb = np.concatenate([e.vectors() for e in router.experts]).astype(np.float64)
    ids = np.concatenate([e.ids for e in router.experts])
    return ids[np.argsort(-(xq.astype(np.float64) @ xb.T), axis=1, kind="stable")[:, :k]]


# ---------------------------------------------------------------- the new baselines


def test_redde_with_the_whole_collection_as_sample__votes_like_exact_knn(
    router_ip: Router, queries: np.ndarray
) -> None:
    redde = ReddeStyle(router_ip, sample=10**6, top=10)  # sample = everything: weight 1, votes = exact top-10 counts
    knn = KnnVoteRouter(router_ip, k=10)
    assert (redde.scores(queries).argmax(1) == knn.scores(queries).argmax(1)).all()
    assert redde.scanned == router_ip.ntotal


def test_redde_sample__is_seeded_and_weighted_by_source_size(router_ip: Router, queries: np.ndarray) -> None:
    a, b = ReddeStyle(router_ip, sample=5, seed=3), ReddeStyle(router_ip, sample=5, seed=3)
    assert np.array_equal(a.scores(queries), b.scores(queries)) and a.scanned == 3 + 5 * 3  # the 3-vector expert whole
    sizes = np.array([e.ntotal for e in router_ip.experts])
    assert np.allclose(np.unique(a.weight), np.unique(sizes / np.minimum(sizes, 5)))


def test_ragroute__learns_the_sources_of_labelled_queries(router_ip: Router) -> None:
    xs = clusters(4, 120, 32, seed=0, noise=0.6)  # the clusters make_router's experts are drawn from
    train_x = np.concatenate([x[80:110] for x in xs])  # rows no expert stores
    test_x = np.concatenate([x[110:] for x in xs])
    gold = np.repeat(np.arange(4), 30)
    rag = RagRouteStyle(router_ip, train_x, gold, steps=300, seed=0)
    acc = float((rag.scores(test_x).argmax(1) == np.repeat(np.arange(4), 10)).mean())
    assert acc >= 0.9
    with pytest.raises(ValueError, match="needs labelled queries: got 120 vectors and 3 labels"):
        RagRouteStyle(router_ip, train_x, gold[:3])

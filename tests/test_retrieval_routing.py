"""Routing real questions: prior correction, the untrained gate as a candidate, prior-weighted merging, dev folds."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from moe_router import Gate, Router
from moe_router.apps.train import train
from moe_router.data.beir import load_beir
from moe_router.embed.hashing import HashingEmbedder
from moe_router.eval.adaptive import prefix_search, top_k_selection
from moe_router.eval.baselines import GATE
from moe_router.eval.ir import ir_metrics
from moe_router.eval.retrieval import DocLookup, evaluate_retrieval
from moe_router.gate import initial_gate, with_prototypes
from moe_router.gate.confidence import fit_bias_temperature, fit_temperature, softmax
from moe_router.index.exact import stacked
from moe_router.index.merge import DECIDE_HITS, redecide
from moe_router.metrics import accuracy_at_k
from moe_router.train.build import router_from_dataset
from moe_router.train.calibrate import DECIDE_WEIGHT_MAX, fit_decide_weight
from moe_router.train.fit import fit_router
from moe_router.train.module import GateModule
from moe_router.train.pipeline import resolve_monitor
from tests.helpers import brute_force, make_router, write_beir
from tests.test_retrieval_eval import brute_force_run
from tests.test_training import _train_overrides, compose_config


def _nll(logits: np.ndarray, gold: np.ndarray) -> float:
    return float(-np.log(logits[np.arange(len(gold)), gold]).mean())


# ---------------------------------------------------------------- prior correction


def test_fit_bias_temperature__recovers_a_prior_shift_and_beats_temperature_alone() -> None:
    # Logits that know nothing of the prior; the queries come 70/20/10 from three experts.
    rng = np.random.default_rng(0)
    gold = rng.choice(3, size=3000, p=[0.7, 0.2, 0.1])
    logits = rng.normal(size=(3000, 3)) * 0.5
    logits[np.arange(3000), gold] += 1.0
    bias, t = fit_bias_temperature(logits, gold)
    assert bias[0] > bias[1] > bias[2]  # the frequent expert is lifted, the rare one lowered
    # The Bayes-optimal offsets are log priors up to a constant: their differences are recovered.
    assert abs((bias[0] - bias[2]) - np.log(7.0)) < 0.3
    with_bias = softmax(logits / t + bias)
    alone = softmax(logits, fit_temperature(logits, gold))
    assert _nll(with_bias, gold) < _nll(alone, gold) - 0.05
    assert accuracy_at_k(with_bias, gold, 1) > accuracy_at_k(alone, gold, 1)


def test_fit_bias_temperature__experts_with_few_queries_keep_offset_zero() -> None:
    rng = np.random.default_rng(1)
    gold = np.r_[np.zeros(50, int), np.ones(50, int), np.full(3, 2)]  # expert 2: 3 queries (< 5)
    logits = rng.normal(size=(len(gold), 4))
    bias, _ = fit_bias_temperature(logits, gold, min_queries=5)
    assert bias[2] == 0.0 and bias[3] == 0.0  # 3 queries, and none: not pushed towards -inf
    with pytest.raises(ValueError, match="at least one query"):
        fit_bias_temperature(logits, np.full(len(gold), -1))


def test_train_on_beir__installs_the_prior_correction_in_the_gate(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir", docs=12, queries={"train": 4, "dev": 6})
    cfg = compose_config("train", [*_train_overrides(tmp_path), "data=beir", f"data.root={root}"])
    train(cfg)
    router = Router.load(tmp_path / "ckpt")
    m = router.metrics
    assert "bias_max_abs" in m and m["temperature"] == pytest.approx(float(router.gate.temperature))
    assert router.prior_weight == pytest.approx(0.1)  # prior_weight=auto on BEIR data
    cfg = compose_config(
        "train",
        [*_train_overrides(tmp_path), "data=beir", f"data.root={root}", "calibrate_bias=false", "prior_weight=0.25"],
    )
    train(cfg)
    router = Router.load(tmp_path / "ckpt")
    assert "bias_max_abs" not in router.metrics and router.prior_weight == 0.25


def test_resolve_monitor__auto_takes_the_data_default_and_the_recall_key_names_its_k() -> None:
    assert resolve_monitor("auto", "acc@1", 10) == "val/acc@1"
    assert resolve_monitor("auto", "recall", 10) == "val/recall@10"
    assert resolve_monitor("auto", "recall", 5) == "val/recall@5"
    assert resolve_monitor("val/recall@10", "acc@1", 10) == "val/recall@10"
    with pytest.raises(ValueError, match="monitor must be 'auto', 'val/acc@1' or 'val/recall@5', got 'val/recall@10'"):
        resolve_monitor("val/recall@10", "recall", 5)  # a recall key that does not name targets.neighbours
    with pytest.raises(ValueError, match="monitor must be 'auto'"):
        resolve_monitor("val/loss", "recall", 10)


# ---------------------------------------------------------------- the untrained gate is a candidate


def test_fit_router__never_installs_a_gate_worse_on_validation_than_the_untrained_one() -> None:
    # A prototype gate starts as a working router; a learning rate that wrecks it must not win.
    router = make_router(gate=False)
    rng = np.random.default_rng(3)
    x, _, owner = stacked(router.experts)
    pick = rng.choice(len(x), size=80, replace=False)
    xq, gold = x[pick] + 0.05 * rng.normal(size=(80, x.shape[1])).astype(np.float32), owner[pick]
    gate = with_prototypes(
        Gate(router.dim, router.num_experts, hidden_dims=[16], prototypes_per_expert=8), router.experts
    )
    router.set_gate(gate)
    before = accuracy_at_k(router.gate_probs(router.prepare(xq)[0]), gold, 1)
    wreck = GateModule(gate, optimizer=lambda p: torch.optim.SGD(p, lr=1e4))
    result = fit_router(
        router,
        xq,
        [router.expert_names[g] for g in gold],
        module=wreck,
        monitor="val/acc@1",
        trainer=L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ),
    )
    after = accuracy_at_k(router.gate_probs(router.prepare(xq)[0]), gold, 1)
    assert after >= before > 0.5
    assert result.metrics.get("untrained_kept") == 1.0 and result.metrics["val/acc@1"] == pytest.approx(before)
    # Without the candidate (validation rows that are stored vectors), the wrecked gate stays.
    gate = with_prototypes(
        Gate(router.dim, router.num_experts, hidden_dims=[16], prototypes_per_expert=8), router.experts
    )
    router.set_gate(gate)
    result = fit_router(
        router,
        xq,
        [router.expert_names[g] for g in gold],
        monitor="val/acc@1",
        module=GateModule(gate, optimizer=lambda p: torch.optim.SGD(p, lr=1e4)),
        untrained_candidate=False,
        trainer=L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ),
    )
    assert "untrained_kept" not in result.metrics
    assert accuracy_at_k(router.gate_probs(router.prepare(xq)[0]), gold, 1) < before


# ---------------------------------------------------------------- prior-weighted merging


def test_search_experts_prior_weight__ranks_by_score_plus_weighted_log_probability() -> None:
    router = make_router()
    rng = np.random.default_rng(0)
    xq = router.prepare(rng.normal(size=(7, router.dim)).astype(np.float32))[0]
    probs = router.gate_probs(xq)
    top = np.argsort(-probs, 1)[:, :3]
    k, w = 5, 0.3
    res = router.search_experts(xq, k, top, probs=probs, prior_weight=w)
    for q in range(len(xq)):  # oracle: every hit of the 3 experts, keyed by hand
        cand = []
        for e in top[q]:
            ex = router.experts[e]
            D, I = brute_force(xq[q : q + 1], ex.vectors(), ex.ids, k, "ip")
            cand += [(float(d) + w * np.log(probs[q, e]), int(i), int(e), float(d)) for d, i in zip(D[0], I[0])]
        cand.sort(key=lambda c: -c[0])
        assert [c[1] for c in cand[:k]] == res.I[q].tolist()
        np.testing.assert_allclose(res.D[q], [c[3] for c in cand[:k]], rtol=1e-5)  # raw scores come back
    plain = router.search_experts(xq, k, top)
    np.testing.assert_array_equal(router.search_experts(xq, k, top, probs=probs, prior_weight=0.0).I, plain.I)


def test_router_prior_weight__is_saved_used_by_search_and_checked(tmp_path: Path) -> None:
    router = make_router()
    rng = np.random.default_rng(1)
    xq = rng.normal(size=(5, router.dim)).astype(np.float32)
    router.prior_weight = 0.5
    router.save(tmp_path / "ck")
    loaded = Router.load(tmp_path / "ck")
    assert loaded.prior_weight == 0.5
    a = loaded.search(xq, k=6, top_experts=3)
    b = loaded.search(xq, k=6, top_experts=3, prior_weight=0.5)
    c = router.search(xq, k=6, top_experts=3)
    assert [[h.id for h in r] for r in a] == [[h.id for h in r] for r in b] == [[h.id for h in r] for r in c]
    for bad in (-0.1, float("nan"), "x", True):
        with pytest.raises(ValueError, match="prior_weight must be a finite number >= 0"):
            loaded.search(xq, k=6, prior_weight=bad)


# ---------------------------------------------------------------- re-deciding the source from its hits


def test_redecide__keeps_the_expert_its_hits_and_the_gate_favour_together() -> None:
    # Two queries, two searched experts of k=3 hits each (slot 0 = the gate's first choice).
    D = np.array([[0.5, 0.4, 0.3, 0.9, 0.8, 0.7], [0.9, 0.8, 0.7, 0.2, -1.0, -1.0]], dtype=np.float32)
    I = np.array([[1, 2, 3, 11, 12, 13], [1, 2, 3, 11, -1, -1]])
    E = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, -1, -1]])
    probs = np.array([[0.6, 0.4], [0.6, 0.4]])
    # query 0: expert 0 scores log 0.6 + w*0.4, expert 1 log 0.4 + w*0.8: expert 1 wins once w > 1.01
    _, I2, E2 = redecide(D, I, E, 2, "ip", probs, 5.0)
    assert I2[0].tolist() == [-1, -1, -1, 11, 12, 13] and E2[0].tolist() == [-1, -1, -1, 1, 1, 1]
    assert I2[1].tolist() == [1, 2, 3, -1, -1, -1]  # the gate's expert's hits are also the closer ones
    _, I3, _ = redecide(D, I, E, 2, "ip", probs, 0.5)
    assert I3[0].tolist() == [1, 2, 3, -1, -1, -1]  # a small weight: the gate's choice stands
    empty = np.array([[0.5, 0.4, 0.3, -1.0, -1.0, -1.0]], dtype=np.float32)
    _, I4, _ = redecide(
        empty,
        np.array([[1, 2, 3, -1, -1, -1]]),
        np.array([[0, 0, 0, -1, -1, -1]]),
        2,
        "ip",
        np.array([[0.01, 0.99]]),
        100.0,
    )
    assert I4[0].tolist() == [1, 2, 3, -1, -1, -1]  # a slot with no hits never wins, however probable
    # l2: the similarity is minus the distance; expert 1's hits are nearer
    _, I5, _ = redecide(-D[:1], I[:1], E[:1], 2, "l2", probs[:1], 5.0)
    assert I5[0].tolist() == [-1, -1, -1, 11, 12, 13]


def test_search_with_decide_weight__returns_one_searched_expert_chosen_by_hand_oracle(tmp_path: Path) -> None:
    router = make_router()
    rng = np.random.default_rng(3)
    xq = router.prepare(rng.normal(size=(9, router.dim)).astype(np.float32))[0]
    probs = router.gate_probs(xq)
    top = np.argsort(-probs, 1, kind="stable")[:, :2]
    k, w = 6, 3.0
    res = router.search_experts(xq, k, top, probs=probs, decide_weight=w)
    winners = set()

    def ids(rows: np.ndarray) -> list[list[int]]:
        return [[int(i) for i in r if i >= 0] for r in rows]

    for q in range(len(xq)):  # oracle: each searched expert's best hits by brute force, scored by hand
        lists = {}
        for e in top[q]:
            ex = router.experts[e]
            lists[e] = brute_force(xq[q : q + 1], ex.vectors(), ex.ids, k, "ip")
        score = {e: np.log(probs[q, e]) + w * float(D[0][:DECIDE_HITS].mean()) for e, (D, _) in lists.items()}
        win = max(top[q], key=lambda e: score[e])
        winners.add(int(win != top[q][0]))
        assert res.I[q].tolist() == lists[win][1][0].tolist() and set(res.E[q][res.I[q] >= 0].tolist()) == {win}
    assert winners == {0, 1}  # the hits overruled the gate on some queries and not on others
    router.decide_weight = w
    router.save(tmp_path / "ck")
    loaded = Router.load(tmp_path / "ck")
    assert loaded.decide_weight == w
    hits = loaded.search(xq, k=k, top_experts=2)
    assert [[h.id for h in r] for r in hits] == ids(res.I)  # the saved weight is the search's default
    merged = loaded.search(xq, k=k, top_experts=2, decide_weight=0.0)
    assert [[h.id for h in r] for r in merged] == ids(router.search_experts(xq, k, top).I)  # 0 = merge all
    one = loaded.search(xq, k=k, top_experts=1)
    assert [[h.id for h in r] for r in one] == ids(router.search_experts(xq, k, top[:, :1]).I)  # nothing to decide
    for bad in (-1.0, float("inf"), "2", False):
        with pytest.raises(ValueError, match="decide_weight must be a finite number >= 0"):
            loaded.search(xq, k=k, decide_weight=bad)
        with pytest.raises(ValueError, match="decide_weight must be a finite number >= 0"):
            loaded.decide_weight = bad
    assert loaded.decide_weight == w  # a refused value changes nothing


def test_fit_decide_weight__positive_where_hits_tell_the_source_zero_where_they_mislead() -> None:
    router = make_router()
    rng = np.random.default_rng(4)
    # Queries near each expert's stored vectors: their hits say the source; a gate that is only
    # slightly right (and often wrong) leaves the hits something to add.
    gold = rng.integers(0, router.num_experts, size=60)
    xq = np.stack([router.experts[g].vectors()[rng.integers(router.experts[g].ntotal)] for g in gold])
    xq = router.prepare(xq + 0.05 * rng.normal(size=xq.shape).astype(np.float32))[0]
    w = fit_decide_weight(router, xq, gold)
    assert w is not None and w > 1.0
    probs = router.gate_probs(xq)
    top = np.argsort(-probs, 1, kind="stable")[:, :2]
    decided = router.search_experts(xq, 3, top, probs=probs, decide_weight=w).E[:, 0]
    reach = (top == gold[:, None]).any(1)
    assert (decided == gold)[reach].mean() >= (top[:, 0] == gold)[reach].mean()  # never worse on what it fitted
    # "gold" = whichever searched expert the hits do not favour: then the hits only mislead
    near = router.search_experts(xq, 3, top, probs=probs, decide_weight=DECIDE_WEIGHT_MAX).E[:, 0]
    liar = np.where(near == top[:, 0], top[:, 1], top[:, 0])
    assert fit_decide_weight(router, xq, liar) == 0.0
    one = Router(router.dim)
    one.add_expert("only", router.experts[0].vectors())
    one.set_gate(initial_gate(one.experts, hidden_dims=[8], dropout=0.0))
    assert fit_decide_weight(one, xq, np.zeros(len(xq), int)) is None  # one expert: nothing to decide between
    with pytest.raises(ValueError, match="one gold expert per query"):
        fit_decide_weight(router, xq, gold[:3])


def test_train_decide_weight__fit_on_val_is_saved_a_number_is_kept_and_a_bad_one_refused_before_training(
    tmp_path: Path,
) -> None:
    root = write_beir(tmp_path / "beir", docs=12, queries={"train": 4, "dev": 6})
    base = [*_train_overrides(tmp_path), "data=beir", f"data.root={root}"]
    train(compose_config("train", [*base, "decide_weight=fit"]))
    router = Router.load(tmp_path / "ckpt")
    val = load_beir(root).queries("dev")
    gold = router.expert_indices(load_beir(root).gold_sources("dev"))
    want = fit_decide_weight(router, router.prepare(val)[0], gold)  # the same fit on the saved gate
    assert (
        router.decide_weight == pytest.approx(want or 0.0) and router.metrics["decide_weight"] == router.decide_weight
    )
    train(compose_config("train", [*base, "decide_weight=2.5"]))
    assert Router.load(tmp_path / "ckpt").decide_weight == 2.5
    for bad in ("-1", "often"):
        with pytest.raises(ValueError, match="decide_weight must be a finite number >= 0"):
            train(compose_config("train", [*base, f"decide_weight={bad}", f"out={tmp_path}/never"]))
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- cross-validation on dev


def test_holdout_folds__split_dev_into_disjoint_per_source_folds(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir", docs=12, queries={"dev": 6, "test": 2})
    full = load_beir(root)
    parts = [load_beir(root, holdout_folds=3, holdout_fold=f) for f in range(3)]
    held = [set(p.query_ids("heldout")) for p in parts]
    assert set.union(*held) == set(full.query_ids("dev")) and sum(map(len, held)) == len(full.query_ids("dev"))
    for p, h in zip(parts, held):
        assert set(p.query_ids("val")) == set(full.query_ids("dev")) - h  # training validates on the rest
        assert sorted(set(p.gold_sources("heldout"))) == full.sources  # every source in every fold (2 each)
        assert p.qrels("heldout") == {q: full.qrels("dev")[q] for q in h}
        assert p.query_ids("test") == full.query_ids("test")
    with pytest.raises(ValueError, match="split 'heldout' exists only"):
        full.queries("heldout")
    with pytest.raises(ValueError, match="holdout_fold must be"):
        load_beir(root, holdout_folds=2, holdout_fold=2)
    with pytest.raises(ValueError, match="holdout_folds must be"):
        load_beir(root, holdout_folds=1)


def test_gate_rows_with_prior_weight__equal_a_brute_force_fused_ranking(tmp_path: Path) -> None:
    data = load_beir(write_beir(tmp_path / "beir", docs=20, queries={"dev": 4, "test": 5}))
    router = router_from_dataset(data, HashingEmbedder(dim=64, seed=0))
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    router.prior_weight = 5.0  # large: the top source's hits first (the ranking must differ from by-score)
    report, scores = evaluate_retrieval(router, data, "test", baselines=[])
    probs = scores[GATE]
    assert report["prior_weight"] == 5.0
    allowed = top_k_selection(probs, 2).mask(3)
    fused = brute_force_run(router, data, "test", allowed, bonus=5.0 * np.log(probs))
    assert fused != brute_force_run(router, data, "test", allowed)  # the weight changes the merged ranking here
    assert report["ndcg@10@2"] == pytest.approx(ir_metrics(fused, data.qrels("test"))["ndcg@10"])
    rows, _, _ = prefix_search(
        router,
        router.prepare(data.queries("test"))[0],
        10,
        top_k_selection(probs, 2),
        probs,
        router.prior_weight,
    )  # what the report's rows were built from
    lookup = DocLookup(router)
    assert lookup.run(data.query_ids("test"), rows) == {q: docs[:10] for q, docs in fused.items()}


def test_evaluate_on_heldout__scores_only_the_held_out_fold(tmp_path: Path) -> None:
    data = load_beir(write_beir(tmp_path / "beir", docs=20, queries={"dev": 6}), holdout_folds=2, holdout_fold=1)
    router = router_from_dataset(data, HashingEmbedder(dim=64, seed=0))
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    report, _ = evaluate_retrieval(router, data, "heldout", baselines=["centroid"])
    assert report["split"] == "heldout" and report["queries"] == len(data.query_ids("heldout")) == 9


def test_retrieval_data__selects_512_prototypes_per_source_unless_told_otherwise() -> None:
    assert compose_config("train", ["data=classic"]).model.prototypes_per_expert == 512
    assert compose_config("train", ["data=beir", "data.root=/x"]).model.prototypes_per_expert == 512
    assert compose_config("train", ["data=classic", "model.prototypes_per_expert=7"]).model.prototypes_per_expert == 7
    assert compose_config("train", ["data=classic", "model=mlp"]).model.prototypes_per_expert == 0
    assert compose_config("train", ["data=clinc150"]).model.prototypes_per_expert == 64

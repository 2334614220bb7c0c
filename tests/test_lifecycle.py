"""Expert lifecycle invariants (moe_router.lifecycle): merge, split, auto-create, remove, add, hierarchy,
feedback rules, load analysis, optimize_routing, and that every change survives save/load.

Seeded synthetic clusters; no Lightning (fine-tunes are tested in test_lifecycle_adaptation.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_router import HashingEmbedder, Router
from moe_router import lifecycle as lc
from moe_router.eval.plots import plot_load
from moe_router.gate import initial_gate
from moe_router.index.clustering import balanced_kmeans
from moe_router.metrics import overlap_at_k, top_experts
from moe_router.routing.parts import Change
from moe_router.routing.stats import RoutingStats
from tests.helpers import DIM, REPO, assert_same_topk, brute_force, clusters, make_router


@pytest.fixture(params=["ip", "l2", "hybrid"])
def router(request: pytest.FixtureRequest) -> Router:
    """The shared seeded router with an MLP gate (metric ip or l2), or with a prototype gate ('hybrid', ip)."""
    return hybrid_router() if request.param == "hybrid" else make_router(request.param)


def hybrid_router() -> Router:
    r = make_router("ip", gate=False)
    torch.manual_seed(0)
    r.set_gate(
        initial_gate(r.experts, hidden_dims=[64], dropout=0.0, prototypes_per_expert=4)
    )  # k-means prototypes; expert0 has 3
    return r


def snapshot(router: Router) -> dict:
    """Everything an operation could change: experts, their vectors and ids, gate weights, store rows, stats."""
    return {
        "experts": [
            (e.name, e.specialization, e.parent, e.ids.tolist(), e.vectors().tobytes()) for e in router.experts
        ],
        "gate": {k: v.clone() for k, v in router.gate.state_dict().items()} if router.gate is not None else None,
        "items": router.parts()
        .store.conn.execute("SELECT id, expert, text, payload FROM items ORDER BY id")
        .fetchall(),
        "feedback": router.parts()
        .store.conn.execute("SELECT seq, expert, positive FROM feedback ORDER BY seq")
        .fetchall(),
        "stats": router.stats(),
    }


def assert_unchanged(router: Router, before: dict) -> None:
    after = snapshot(router)
    assert after["experts"] == before["experts"]
    assert after["items"] == before["items"] and after["feedback"] == before["feedback"]
    assert after["stats"] == before["stats"]
    assert after["gate"].keys() == before["gate"].keys()
    for k in before["gate"]:
        assert torch.equal(after["gate"][k], before["gate"][k]), k


def probe(seed: int = 5, per: int = 25) -> np.ndarray:
    """(4 * per, DIM) queries around make_router's four clusters (seed 0 centres, fresh noise)."""
    rng = np.random.default_rng(seed)
    centres = np.stack([c.mean(0) for c in clusters(4, 200, DIM, seed=0, noise=0.0)])
    return np.concatenate([c + 0.4 * rng.normal(size=(per, DIM)) / np.sqrt(DIM) for c in centres]).astype(np.float32)


# ---------------------------------------------------------------- merge


def test_merge__searching_merged_expert_equals_searching_both(router: Router) -> None:
    a, b = router.expert("expert1"), router.expert("expert2")
    xq = probe()
    Da, Ia = a.search(xq, 10)
    Db, Ib = b.search(xq, 10)
    merged = lc.merge_experts(router, "expert1", "expert2")
    D, I = merged.search(xq, 10)
    # Oracle: exact top-10 over the union of the two experts' vectors.
    xb = np.concatenate([a.vectors(), b.vectors()])
    D_ref, I_ref = brute_force(xq, xb, np.concatenate([a.ids, b.ids]), 10, router.metric)
    assert_same_topk(D, I, D_ref, I_ref)
    # ... which is also the merge of the two old experts' top-10 lists.
    both_D, both_I = np.concatenate([Da, Db], 1), np.concatenate([Ia, Ib], 1)
    order = np.argsort(-both_D if router.metric == "ip" else both_D, axis=1, kind="stable")[:, :10]
    assert_same_topk(D, I, np.take_along_axis(both_D, order, 1), np.take_along_axis(both_I, order, 1))


def test_merge__keeps_ids_metadata_and_feedback_and_sums_probability(router: Router) -> None:
    a, b = router.expert("expert1"), router.expert("expert2")
    ids = np.concatenate([a.ids, b.ids])
    meta = router.parts().store.get(ids.tolist())
    fid = router.record_feedback(a.vectors()[0], "expert1", True)
    xb = np.concatenate([a.vectors(), b.vectors()])
    p_before = router.gate_probs(xb)
    merged = lc.merge_experts(router, "expert1", "expert2", name="merged")
    assert router.expert_names == ["expert0", "merged", "expert3"] and router.gate.num_experts == 3
    assert sorted(merged.ids.tolist()) == sorted(ids.tolist())
    assert router.parts().store.get(ids.tolist()) == meta
    assert set(router.parts().store.experts_of(ids).values()) == {"merged"}
    assert [r.seq for r in router.parts().store.feedback("merged")] == [fid]
    # The merged row carries (about) the two old rows' summed probability on their vectors.
    p_after = router.gate_probs(xb)
    np.testing.assert_allclose(p_after[:, 1], p_before[:, 1] + p_before[:, 2], atol=0.05)
    assert np.array_equal(
        p_after.argmax(1), np.where(p_before.argmax(1) >= 2, p_before.argmax(1) - 1, p_before.argmax(1))
    )


@pytest.mark.parametrize(
    "args, error, match",
    [
        (("expert1", "nope"), KeyError, "unknown expert 'nope'"),
        (("ghost", "expert1"), KeyError, "unknown expert 'ghost'"),
        (("expert1", "expert1"), ValueError, "with itself"),
        (("expert1", "expert2", "expert3"), ValueError, "'expert3' already exists"),
        (("expert1", "expert2", ""), ValueError, "non-empty string"),
    ],
)
def test_merge__bad_input_is_a_clear_error_and_changes_nothing(router_ip: Router, args, error, match) -> None:
    before = snapshot(router_ip)
    with pytest.raises(error, match=match):
        lc.merge_experts(router_ip, *args)
    assert_unchanged(router_ip, before)


# ---------------------------------------------------------------- split


def test_split__preserves_every_id_and_vector(router: Router) -> None:
    old = router.expert("expert3")
    ids, xb = old.ids.copy(), old.vectors()
    meta = router.parts().store.get(ids.tolist())
    parts = lc.split_expert(router, "expert3", 3, seed=1)
    assert [p.name for p in parts] == ["expert3/0", "expert3/1", "expert3/2"]
    assert router.expert_names == ["expert0", "expert1", "expert2", "expert3/0", "expert3/1", "expert3/2"]
    got = np.concatenate([p.ids for p in parts])
    assert sorted(got.tolist()) == sorted(ids.tolist()) and len(set(got.tolist())) == len(ids)  # a partition
    by_id = {int(i): v for p in parts for i, v in zip(p.ids, p.vectors())}
    np.testing.assert_array_equal(np.stack([by_id[int(i)] for i in ids]), xb)
    assert all(p.ntotal > 0 for p in parts) and router.gate.num_experts == 6
    assert router.parts().store.get(ids.tolist()) == meta
    owners = router.parts().store.experts_of(ids)
    assert all(owners[int(i)] == p.name for p in parts for i in p.ids)


def test_split__parts_share_the_old_experts_probability(router: Router) -> None:
    xb = np.concatenate([e.vectors() for e in router.experts])  # the split expert's vectors and everyone else's
    ids = np.concatenate([e.ids for e in router.experts])
    own = np.isin(ids, router.expert("expert3").ids)
    p_before = router.gate_probs(xb)
    lc.split_expert(router, "expert3", 2)
    p_after = router.gate_probs(xb)
    diff = np.abs(p_after[:, 3:5].sum(1) - p_before[:, 3])  # a fitted approximation, not exact
    assert diff.mean() < 0.03 and diff.max() < 0.1
    # On the old expert's vectors, the part holding a vector outscores the other part.
    in_second = np.isin(ids, router.expert("expert3/1").ids)
    assert ((p_after[own, 4] > p_after[own, 3]) == in_second[own]).mean() > 0.8


def test_split__gives_every_part_prototypes_even_when_the_expert_has_too_few() -> None:
    router = hybrid_router()
    owner_before = router.gate.prototype_owner.clone()
    parts = lc.split_expert(router, "expert1", 6)  # expert1 has 4 prototypes: 2 parts get their centroid
    owner = router.gate.prototype_owner
    assert sorted(set(owner.tolist())) == list(range(router.num_experts))
    assert int((owner_before == 1).sum()) == 4 and int(((owner >= 1) & (owner <= 6)).sum()) == 6
    assert (owner == 0).sum() == (owner_before == 0).sum() and (owner == 7).sum() == (owner_before == 2).sum()
    assert all(p.ntotal >= 1 for p in parts)


def test_split__moves_feedback_to_the_nearest_part(router_ip: Router) -> None:
    xb = router_ip.expert("expert3").vectors()
    seqs = [router_ip.record_feedback(x, "expert3", True) for x in xb[:6]]
    parts = lc.split_expert(router_ip, "expert3", 2)
    moved = {r.seq: r.expert for r in router_ip.parts().store.feedback()}
    for s, x in zip(seqs, xb[:6]):
        nearest = max(parts, key=lambda p: float(p.centroid() @ x))
        assert moved[s] == nearest.name


def test_split__duplicate_vectors_still_give_non_empty_parts() -> None:
    router = Router(DIM, "ip")
    v = np.ones((3, DIM), np.float32)
    router.add_expert("dup", v)
    router.add_expert("other", -v)
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    parts = lc.split_expert(router, "dup", 3)
    assert [p.ntotal for p in parts] == [1, 1, 1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"name": "expert0", "parts": 4}, ValueError, "into 4 parts: it holds only 3 vectors"),
        ({"name": "expert9", "parts": 2}, KeyError, "unknown expert 'expert9'"),
        ({"name": "expert3", "parts": 1}, ValueError, "parts must be an integer >= 2"),
        ({"name": "expert3", "parts": 2, "names": ["x"]}, ValueError, "needs 2 names, got 1"),
        ({"name": "expert3", "parts": 2, "names": ["x", "expert1"]}, ValueError, "'expert1' already exists"),
        ({"name": "expert3", "parts": 2, "names": ["x", "x"]}, ValueError, "'x' already exists"),
    ],
)
def test_split__bad_input_is_a_clear_error_and_changes_nothing(router_ip: Router, kwargs, error, match) -> None:
    before = snapshot(router_ip)
    with pytest.raises(error, match=match):
        lc.split_expert(router_ip, **kwargs)
    assert_unchanged(router_ip, before)


def test_failed_store_write__leaves_router_unchanged(router_ip: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(router_ip)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(router_ip.parts().store, "apply_changes", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        lc.merge_experts(router_ip, "expert1", "expert2")
    with pytest.raises(RuntimeError, match="disk full"):
        lc.split_expert(router_ip, "expert3", 2)
    assert_unchanged(router_ip, before)


# ---------------------------------------------------------------- k-means with a size bound


@pytest.mark.parametrize("n, bound, seed", [(4, 1.2, 0), (7, 1.5, 1), (10, 1.1, 2), (5, 1.0, 3), (3, None, 4)])
def test_balanced_kmeans__respects_the_size_bound(n: int, bound: float | None, seed: int) -> None:
    # Skewed data: one dense cluster holds most vectors, so plain k-means would be far from balanced.
    xs = clusters(3, 300, DIM, seed=seed)
    x = np.concatenate([xs[0], xs[1][:40], xs[2][:20]])
    labels = balanced_kmeans(x, n, seed=seed, max_imbalance=bound)
    sizes = np.bincount(labels, minlength=n)
    assert sizes.min() >= 1 and sizes.sum() == len(x) and labels.max() == n - 1
    if bound is not None:
        assert sizes.max() <= max(int(np.ceil(len(x) / n)), int(np.floor(bound * len(x) / n)))


def test_balanced_kmeans__bad_input() -> None:
    x = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="cannot make 6 clusters from 5 vectors"):
        balanced_kmeans(x, 6)
    with pytest.raises(ValueError, match="must be a number >= 1"):
        balanced_kmeans(x, 2, max_imbalance=0.8)


# ---------------------------------------------------------------- auto-create


def test_auto_create_by_category__skips_small_categories() -> None:
    router = Router(64, "ip", embedder=HashingEmbedder(64))
    texts = (
        [f"react hooks {i}" for i in range(6)] + [f"django views {i}" for i in range(5)] + ["go channels", "go maps"]
    )
    cats = ["Frontend"] * 6 + ["Backend"] * 5 + ["Go"] * 2
    report = lc.auto_create_experts(router, texts=texts, categories=cats, min_docs=5, name_format="{category} Expert")
    assert report.created == [("Frontend Expert", 6), ("Backend Expert", 5)]
    assert report.skipped == [("Go", 2)]
    assert router.expert("Backend Expert").specialization == "backend"
    hits = router.parts().store.get(router.expert("Backend Expert").ids.tolist())
    assert sorted(t for t, _ in hits.values()) == sorted(texts[6:11])


def test_auto_create_by_category__name_clash_adds_nothing(router_ip: Router) -> None:
    before = snapshot(router_ip)
    xs = clusters(2, 6, DIM, seed=3)
    with pytest.raises(ValueError, match="'expert1' already exists"):
        lc.auto_create_experts(router_ip, vectors=np.concatenate(xs), categories=["new"] * 6 + ["expert1"] * 6)
    assert_unchanged(router_ip, before)
    with pytest.raises(ValueError, match="dimension 7, expected 32"):
        lc.auto_create_experts(router_ip, vectors=np.ones((4, 7)), categories=["a"] * 4)
    with pytest.raises(ValueError, match="4 documents but 3 categories"):
        lc.auto_create_experts(router_ip, vectors=np.ones((4, DIM)), categories=["a"] * 3)
    assert_unchanged(router_ip, before)


def test_auto_create_by_clustering__bounded_sizes_cover_every_vector() -> None:
    router = Router(DIM, "ip")
    xs = clusters(3, 200, DIM, seed=7)
    x = np.concatenate([xs[0], xs[1][:50], xs[2][:30]])  # 280 vectors, skewed
    report = lc.auto_create_experts(router, vectors=x, n=5, max_imbalance=1.25, seed=0)
    sizes = [n for _, n in report.created]
    assert sum(sizes) == len(x) and max(sizes) <= int(1.25 * len(x) / 5) and min(sizes) >= 1
    assert router.expert_names == [f"cluster{i}" for i in range(5)]
    assert sorted(np.concatenate([e.ids for e in router.experts]).tolist()) == list(range(len(x)))


# ---------------------------------------------------------------- add and remove


def test_remove__no_hit_ever_comes_from_the_removed_expert(router: Router) -> None:
    gone = router.expert("expert2")
    gone_ids = set(gone.ids.tolist())
    router.remove_expert("expert2")
    assert "expert2" not in router.expert_names and router.gate.num_experts == 3
    xq = np.concatenate([probe(), gone.vectors()])  # includes the removed expert's own vectors
    for hits in router.search(xq, k=20, top_experts=3):
        assert all(h.expert != "expert2" and h.id not in gone_ids for h in hits)
    probs = router.gate_probs(xq)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)  # routing renormalised over the rest
    assert router.parts().store.get(gone_ids) == {}


def test_add__new_expert_is_routable_at_once(router_ip: Router) -> None:
    x = clusters(5, 40, DIM, seed=11)[4]  # a fifth, unseen cluster
    router_ip.add_expert("fresh", x[:30])
    top1 = np.array([r[0].expert for r in router_ip.route(x[30:], top_experts=1)])
    assert (top1 == "fresh").mean() >= 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "expert1", "vectors": np.ones((2, DIM))}, "'expert1' already exists"),
        ({"name": "new", "vectors": np.ones((2, DIM + 1))}, f"dimension {DIM + 1}, expected {DIM}"),
        ({"name": "new", "vectors": np.ones((0, DIM))}, "empty batch"),
        ({"name": "new"}, "no vectors"),
    ],
)
def test_add__bad_input_is_a_clear_error_and_changes_nothing(router_ip: Router, kwargs, match) -> None:
    before = snapshot(router_ip)
    with pytest.raises(ValueError, match=match):
        router_ip.add_expert(**kwargs)
    assert_unchanged(router_ip, before)


def test_remove__unknown_expert_is_a_clear_error(router_ip: Router) -> None:
    before = snapshot(router_ip)
    with pytest.raises(KeyError, match="unknown expert 'nope'"):
        router_ip.remove_expert("nope")
    assert_unchanged(router_ip, before)


# ---------------------------------------------------------------- hierarchy


def parented(router: Router) -> Router:
    router.set_parent("expert0", "left")
    router.set_parent("expert1", "left")
    router.set_parent("expert2", "right")
    router.set_parent("expert3", "right")
    return router


def test_two_level__parent_probability_is_the_sum_and_leaves_stay_inside(router: Router) -> None:
    parented(router)
    xq, _ = router.prepare(probe())
    r = lc.route_two_level(router, xq, top_parents=1, top_children=2)
    assert r.parents == ["left", "right"]
    probs = router.gate_probs(xq)
    np.testing.assert_allclose(r.parent_probs, np.stack([probs[:, :2].sum(1), probs[:, 2:].sum(1)], 1), atol=1e-6)
    groups = np.array([0, 0, 1, 1])
    assert (groups[r.top] == r.top_parents[:, :1]).all()  # both leaves inside the chosen parent
    # leaves are that parent's children in order of probability
    inside = np.where(groups[None, :] == r.top_parents[:, :1], probs, -1)
    np.testing.assert_array_equal(r.top, top_experts(inside, 2))


def test_two_level__fills_rows_when_the_parent_has_too_few_children(router_ip: Router) -> None:
    router_ip.set_parent("expert0", "solo")  # 'solo' has one child; the others are their own groups
    r = lc.route_two_level(router_ip, probe(), top_parents=1, top_children=3)
    assert r.top.shape == (100, 3) and (np.sort(r.top, 1)[:, 1:] != np.sort(r.top, 1)[:, :-1]).all()


def test_two_level__search_hits_come_only_from_chosen_children_and_group_by_parent(router_ip: Router) -> None:
    parented(router_ip)
    xq = probe()
    r = lc.route_two_level(router_ip, xq, 1, 1)
    results = lc.search_two_level(router_ip, xq, k=5, top_parents=1, top_children=1)
    for row, hits in zip(r.top, results):
        assert {h.expert for h in hits} == {router_ip.experts[row[0]].name}
        grouped = lc.group_by_parent(hits)
        assert list(grouped) == [router_ip.experts[row[0]].parent]
    with pytest.raises(ValueError, match="top_parents must be between 1 and 2"):
        lc.route_two_level(router_ip, xq, top_parents=3)
    with pytest.raises(ValueError, match="cannot be its own parent"):
        router_ip.set_parent("expert0", "expert0")


# ---------------------------------------------------------------- feedback and recommendations


def give(router: Router, expert: str, positive: int, negative: int) -> None:
    x = router.expert(expert).vectors()[0]
    for _ in range(positive):
        router.record_feedback(x, expert, True)
    for _ in range(negative):
        router.record_feedback(x, expert, False)


def test_feedback_stats__counts_and_success_rates(router_ip: Router) -> None:
    give(router_ip, "expert0", 3, 1)
    give(router_ip, "expert2", 0, 2)
    stats = {s.expert: s for s in lc.feedback_stats(router_ip)}
    assert (stats["expert0"].total, stats["expert0"].positive, stats["expert0"].success_rate) == (4, 3, 0.75)
    assert (stats["expert2"].total, stats["expert2"].success_rate) == (2, 0.0)
    assert (stats["expert1"].total, stats["expert1"].success_rate) == (0, None)
    before = snapshot(router_ip)
    with pytest.raises(KeyError, match="unknown expert 'nobody'"):
        router_ip.record_feedback(np.ones(DIM), "nobody", True)
    assert_unchanged(router_ip, before)


def test_feedback_of_a_removed_expert__is_kept_apart_from_a_new_expert_of_that_name(
    router_ip: Router, tmp_path: Path
) -> None:
    give(router_ip, "expert0", 3, 1)
    vectors = router_ip.expert("expert0").vectors()
    router_ip.remove_expert("expert0")
    router_ip.add_expert("expert0", vectors)  # same name, a new expert: no feedback of its own yet
    give(router_ip, "expert0", 1, 0)
    stats = {s.expert: s for s in lc.feedback_stats(router_ip)}
    assert (stats["expert0"].total, stats["expert0"].positive) == (1, 1)
    loaded = Router.load(router_ip.save(tmp_path / "ckpt"))
    assert len(loaded.parts().store.feedback("expert0")) == 1
    assert len(loaded.parts().store.feedback("expert0", include_removed=True)) == 5  # the audit log keeps all


def test_recommendations__follow_the_tutorial_rules_at_their_boundaries(router_ip: Router) -> None:
    give(router_ip, "expert0", 5, 6)  # 45% over 11 > 10 -> retrain or merge
    give(router_ip, "expert1", 4, 6)  # 40% but only 10 records: no rule
    give(router_ip, "expert2", 20, 1)  # 95% over 21 > 20 -> split
    give(router_ip, "expert3", 19, 1)  # 95% but only 20 records: no rule
    recs = lc.recommendations(router_ip)
    assert [(r.expert, r.action) for r in recs] == [("expert0", "retrain_or_merge"), ("expert2", "split")]
    assert recs[0].merge_with == lc.nearest_expert(router_ip, "expert0") and recs[0].merge_with != "expert0"
    strict = lc.RecommendationRules(low_success=0.5, low_min_queries=9)
    assert [r.expert for r in lc.recommendations(router_ip, strict)] == ["expert0", "expert1", "expert2"]


# ---------------------------------------------------------------- load analysis


def test_load_report__flags_experts_over_and_under_the_average(router_ip: Router, tmp_path: Path) -> None:
    counts = RoutingStats(np.array([50, 30, 10, 10]), np.array([25.0, 15.0, 9.0, 1.0]))  # average 25:
    router_ip.update(lambda parts: Change(parts.replace(stats=counts)))
    # 2.0x over, 1.2x fine, 0.4x under
    give(router_ip, "expert0", 1, 1)
    rep = lc.load_report(router_ip)
    assert [(r.expert, r.flag) for r in rep.rows] == [
        ("expert0", "over"),
        ("expert1", ""),
        ("expert2", "under"),
        ("expert3", "under"),
    ]
    assert [r.ratio for r in rep.rows] == pytest.approx([2.0, 1.2, 0.4, 0.4])
    assert rep.rows[0].mean_confidence == pytest.approx(0.5) and rep.rows[0].success_rate == 0.5
    chart = lc.load_chart(rep)
    assert chart.count("\n") == 4 and "2.00x average (> 1.5x)" in chart and "0.40x average (< 0.5x)" in chart
    assert chart.splitlines()[0].count("█") == 40 and chart.splitlines()[1].count("█") == 24
    png = plot_load(rep, tmp_path / "load.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_report__from_queries_does_not_touch_live_stats(router_ip: Router) -> None:
    xq = probe()
    rep = lc.load_report(router_ip, xq, top_k=2)
    assert rep.total == 2 * len(xq) and sum(r.queries for r in rep.rows) == rep.total
    top = torch.topk(torch.from_numpy(router_ip.gate_probs(router_ip.prepare(xq)[0])), 2, dim=1).indices
    assert [r.queries for r in rep.rows] == np.bincount(top.numpy().ravel(), minlength=4).tolist()
    assert all(s.queries == 0 for s in router_ip.stats())


# ---------------------------------------------------------------- optimize_routing


def measured_recall(router: Router, xq: np.ndarray, t: int, k: int = 10) -> float:
    """recall@k of the router's routed search vs a brute-force exhaustive search (independent of lifecycle)."""
    xq, _ = router.prepare(xq)
    xb = np.concatenate([e.vectors() for e in router.experts])
    ids = np.concatenate([e.ids for e in router.experts])
    _, exact = brute_force(xq, xb, ids, k, router.metric)
    res = router.search_experts(xq, k, top_experts(router.gate_probs(xq), t))
    return overlap_at_k(res.I, exact)


def duplicated_router() -> Router:
    """Experts 'twinA'/'twinB' hold random halves of one cluster: the gate confuses them."""
    xs = clusters(3, 120, DIM, seed=21)
    router = Router(DIM, "ip")
    half = np.random.default_rng(0).permutation(120)
    router.add_expert("twinA", xs[0][half[:60]])
    router.add_expert("twinB", xs[0][half[60:]])
    router.add_expert("solo1", xs[1])
    router.add_expert("solo2", xs[2])
    torch.manual_seed(0)
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    return router


def test_optimize__merges_confused_twins_and_reports_the_measured_gain() -> None:
    router = duplicated_router()
    xq = np.concatenate(clusters(3, 40, DIM, seed=21, noise=0.5))
    before = measured_recall(router, xq, 1)
    rep = lc.optimize_routing(router, xq, top_experts_searched=1, rebalance=False, split=False, max_scan_increase=1.0)
    assert rep.count("merge") == 1 and router.expert_names == ["twinA+twinB", "solo1", "solo2"]
    assert rep.before.recall == pytest.approx(before)
    assert rep.after.recall == pytest.approx(measured_recall(router, xq, 1))
    assert (
        rep.improvement == pytest.approx(rep.after.recall - before) and rep.improvement > 0.1
    )  # a third of the queries had about half their neighbours in the other twin


def test_optimize__keeps_the_old_router_when_every_change_is_worse() -> None:
    router = duplicated_router()
    xq = np.concatenate(clusters(3, 40, DIM, seed=21, noise=0.5))
    before = snapshot(router)

    def sabotage(v: Router, names) -> None:  # a "fine-tune" that wrecks the gate: every candidate gets worse
        with torch.no_grad():
            v.gate.head.weight.mul_(-1.0)

    rep = lc.optimize_routing(
        router, xq, top_experts_searched=1, rebalance=False, fine_tune=sabotage, max_scan_increase=1.0
    )
    assert rep.actions and not any(a.kept for a in rep.actions)
    assert all(a.after.recall < a.before.recall for a in rep.actions)
    assert rep.improvement == 0.0 and rep.after == rep.before
    assert_unchanged(router, before)


def test_optimize__rebalances_a_biased_gate_only_as_far_as_recall_allows(router_ip: Router) -> None:
    with torch.no_grad():
        router_ip.gate.head.bias[3] += 4.0  # expert3 swallows traffic
    xq = probe()
    before = measured_recall(router_ip, xq, 1)
    rep = lc.optimize_routing(router_ip, xq, top_experts_searched=1, merge=False, split=False)
    assert rep.count("rebalance") == 1
    assert rep.after.max_over_mean < rep.before.max_over_mean
    assert rep.after.recall >= rep.before.recall == pytest.approx(before)
    assert rep.after.recall == pytest.approx(measured_recall(router_ip, xq, 1))


def test_optimize__nothing_to_do_reports_zero(router_ip: Router) -> None:
    xq = probe()
    before = snapshot(router_ip)
    rep = lc.optimize_routing(router_ip, xq, top_experts_searched=2, merge=False, split=False, rebalance=False)
    assert rep.actions == [] and rep.improvement == 0.0
    assert_unchanged(router_ip, before)


# ---------------------------------------------------------------- persistence


def lifecycle_chain(router: Router) -> Router:
    lc.merge_experts(router, "expert1", "expert2", name="merged")
    lc.split_expert(router, "expert3", 2, names=["left3", "right3"])
    router.set_parent("left3", "three")
    router.set_parent("right3", "three")
    give(router, "merged", 2, 1)
    return router


def answers(router: Router, xq: np.ndarray) -> dict:
    hits = router.search(xq, k=5, top_experts=2)
    two = lc.route_two_level(router, xq, 1, 2)
    return {
        "experts": [(e.name, e.specialization, e.parent, e.ntotal) for e in router.experts],
        "probs": router.gate_probs(xq).round(5).tolist(),
        "hits": [[(h.id, h.expert, round(h.score, 5), h.text) for h in row] for row in hits],
        "two_level": two.top.tolist(),
        "feedback": [(s.expert, s.total, s.positive) for s in lc.feedback_stats(router)],
    }


def test_lifecycle_changes_survive_save_and_load(router: Router, tmp_path: Path) -> None:
    lifecycle_chain(router)
    xq = probe()
    want = answers(router, xq)
    router.save(tmp_path / "ckpt")
    got = answers(Router.load(tmp_path / "ckpt"), xq)
    assert got == want


@pytest.mark.slow  # a second Python process importing torch and FAISS
def test_lifecycle_changes_survive_a_fresh_process(router_ip: Router, tmp_path: Path) -> None:
    lifecycle_chain(router_ip)
    xq = probe()
    np.save(tmp_path / "xq.npy", xq)
    router_ip.save(tmp_path / "ckpt")
    want = answers(router_ip, xq)
    code = (
        "import json, sys, numpy as np\n"
        "from moe_router import Router\n"
        "from tests.test_lifecycle import answers\n"
        f"r = Router.load({str(tmp_path / 'ckpt')!r})\n"
        f"print(json.dumps(answers(r, np.load({str(tmp_path / 'xq.npy')!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(want))

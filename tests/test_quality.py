"""The prototype gate, baselines, calibration and capacity: invariants against exact computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_router import Gate, Router
from moe_router.eval.baselines import (
    CentroidRouter,
    KnnVoteRouter,
    MultiPrototypeRouter,
    SemanticRouterStyle,
    ivf_recall,
)
from moe_router.gate import initial_gate
from moe_router.gate.confidence import choose_threshold, fit_temperature, load_floor_bias, reliability_bins, softmax
from moe_router.gate.model import in_scope
from moe_router.index.exact import exact_neighbours, neighbour_counts
from moe_router.metrics import assign_with_capacity, load_stats, overlap_at_k, overlap_from_counts, top_experts
from tests.helpers import clusters

DIM = 16


@pytest.fixture()
def clustered() -> tuple[Router, np.ndarray, np.ndarray]:
    """A router over 4 well-separated experts, and held-out queries with their gold expert."""
    groups = clusters(4, 60, DIM, seed=3, noise=0.6)
    router = Router(DIM)
    for i, g in enumerate(groups):
        router.add_expert(f"e{i}", g[:50])
    xq = np.concatenate([g[50:] for g in groups])
    gold = np.repeat(np.arange(4), 10)
    return router, router.prepare(xq)[0], gold


def test_prototype_logits__equal_logsumexp_over_each_experts_prototypes() -> None:
    torch.manual_seed(0)
    gate = Gate(DIM, 3, hidden_dims=[8], prototypes_per_expert=2, prototype_scale=5.0)
    protos = [torch.randn(2, DIM), torch.randn(1, DIM), torch.randn(3, DIM)]
    gate.init_prototypes(protos)
    x = torch.randn(7, DIM)
    expected = torch.stack([torch.logsumexp(5.0 * x @ p.T, dim=1) for p in protos], dim=1)
    assert torch.allclose(gate.prototype_logits(x), expected, atol=1e-4)


def test_prototype_gate_at_init__routes_like_its_prototypes(clustered) -> None:
    router, xq, _ = clustered
    gate = initial_gate(router.experts, hidden_dims=[8], prototypes_per_expert=4, prototype_scale=50.0)
    router.set_gate(gate)
    best_proto = np.stack(
        [(xq @ gate.prototypes[gate.prototype_owner == e].detach().numpy().T).max(1) for e in range(4)], axis=1
    )
    # The head starts at zero, so routing follows the (nearly hard) max over prototypes.
    assert (router.gate_probs(xq).argmax(1) == best_proto.argmax(1)).mean() >= 0.95


def test_prototype_gate__add_remove_and_round_trip(clustered, tmp_path) -> None:
    router, xq, _ = clustered
    router.set_gate(initial_gate(router.experts, hidden_dims=[8], prototypes_per_expert=4))
    extra = clusters(1, 30, DIM, seed=9, noise=0.3)[0]
    router.add_expert("new", extra)
    gate = router.gate
    assert gate.num_experts == 5 and int((gate.prototype_owner == 4).sum()) == 4
    before = router.gate_probs(xq)
    router.save(tmp_path / "ck")
    assert np.allclose(Router.load(tmp_path / "ck").gate_probs(xq), before, atol=1e-6)
    router.remove_expert("e1")
    gate = router.gate
    assert sorted(gate.prototype_owner.unique().tolist()) == [0, 1, 2, 3]
    assert gate.prototypes.shape[0] == 16
    router.save(tmp_path / "ck2")
    assert np.allclose(Router.load(tmp_path / "ck2").gate_probs(xq), router.gate_probs(xq), atol=1e-6)


def test_set_head__refuses_to_change_expert_count_of_a_prototype_gate_without_a_map() -> None:
    gate = Gate(DIM, 3, hidden_dims=[8], prototypes_per_expert=2)
    with pytest.raises(ValueError, match="prototype_owner"):
        gate.set_head(gate.head.weight[:2], gate.head.bias[:2])


def test_knn_vote__scores_are_the_neighbour_counts(clustered) -> None:
    router, xq, _ = clustered
    xb = np.concatenate([e.vectors() for e in router.experts])
    owner = np.repeat(np.arange(4), 50)
    counts = neighbour_counts(exact_neighbours(xq, xb, 10), owner, 4)
    scores = KnnVoteRouter(router, k=10).scores(xq)
    assert np.array_equal(np.floor(scores), counts)
    # Voting with the exact neighbours reaches the recall ceiling: no routing does better.
    ceiling = overlap_from_counts(top_experts(scores, 1), counts)
    for other in (CentroidRouter(router), MultiPrototypeRouter(router, per_expert=5)):
        assert overlap_from_counts(top_experts(other.scores(xq), 1), counts) <= ceiling + 1e-9


def test_multi_prototype_with_every_vector__is_nearest_neighbour_routing(clustered) -> None:
    router, xq, _ = clustered
    xb = np.concatenate([e.vectors() for e in router.experts])
    owner = np.repeat(np.arange(4), 50)
    nearest = owner[exact_neighbours(xq, xb, 1)[:, 0]]
    assert np.array_equal(MultiPrototypeRouter(router, per_expert=50).scores(xq).argmax(1), nearest)


def test_semantic_router_style__is_mean_of_top_similarities(clustered) -> None:
    router, xq, _ = clustered
    got = SemanticRouterStyle(router, top=3).scores(xq)
    for e, expert in enumerate(router.experts):
        sims = np.sort(xq @ expert.vectors().T, axis=1)[:, ::-1][:, :3]
        assert np.allclose(got[:, e], sims.mean(1), atol=1e-5)


def test_ivf_with_all_probes__recalls_everything(clustered) -> None:
    router, xq, _ = clustered
    xb = np.concatenate([e.vectors() for e in router.experts])
    ids = np.concatenate([e.ids for e in router.experts])
    exact = ids[exact_neighbours(xq, xb, 10)]
    got = ivf_recall(router, xq, exact, [1, 4], k=10)
    assert got[4] == (pytest.approx(1.0), pytest.approx(1.0))
    assert 0 < got[1][0] <= got[4][0] and 0 < got[1][1] < got[4][1]  # fewer probes: no more recall, less scanned


def test_fit_temperature__recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4000, 5)) * 3
    gold = np.array([rng.choice(5, p=p) for p in softmax(logits, 2.0)])
    assert fit_temperature(logits, gold) == pytest.approx(2.0, rel=0.1)


def test_choose_threshold__separates_separable_scores() -> None:
    th = choose_threshold(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2, 0.6]))
    assert 0.6 < th <= 0.7


def test_reliability_bins__count_every_query_once() -> None:
    conf = np.array([0.05, 0.5, 0.51, 0.99])
    bins = reliability_bins(conf, np.array([0, 1, 0, 1]), bins=10)
    assert sum(bins["count"]) == 4 and bins["accuracy"][9] == 1.0


def test_capacity__holds_max_over_mean_and_keeps_distinct_experts() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(8, 0.3), size=1000)
    probs[:, 0] += 1.0  # everyone prefers expert 0
    for factor in (1.0, 1.25, 2.0):
        assigned = assign_with_capacity(probs, 2, factor)
        assert load_stats(assigned, 8)["max_over_mean"] <= factor + 1e-9
        assert (assigned[:, 0] != assigned[:, 1]).all() and (assigned >= 0).all()
    # A loose cap changes nothing.
    assert np.array_equal(np.sort(assign_with_capacity(probs, 2, 8.0), 1), np.sort(top_experts(probs, 2), 1))


def test_capacity__rejects_factors_below_one() -> None:
    with pytest.raises(ValueError, match="capacity_factor must be >= 1"):
        assign_with_capacity(np.ones((3, 2)), 1, 0.5)


def test_overlap_from_counts__matches_a_routed_search(clustered) -> None:
    router, xq, _ = clustered
    router.set_gate(initial_gate(router.experts, hidden_dims=[8], prototypes_per_expert=3))
    xb = np.concatenate([e.vectors() for e in router.experts])
    ids = np.concatenate([e.ids for e in router.experts])
    nbrs = exact_neighbours(xq, xb, 10)
    top = top_experts(router.gate_probs(xq), 2)
    counts = neighbour_counts(nbrs, np.repeat(np.arange(4), 50), 4)
    assert overlap_from_counts(top, counts) == pytest.approx(
        overlap_at_k(router.search_experts(xq, 10, top).I, ids[nbrs])
    )


def test_abstain__refuses_queries_far_from_every_prototype(clustered) -> None:
    router, xq, _ = clustered
    router.set_gate(initial_gate(router.experts, hidden_dims=[8], prototypes_per_expert=4))
    far = -np.concatenate([e.vectors() for e in router.experts]).mean(0)  # opposite to every cluster
    scores_in = in_scope(router.gate, xq)
    router.abstain_threshold = float(np.min(scores_in))
    assert router.route(far, top_experts=1, abstain=True) == []
    assert router.search(far, k=3, top_experts=1, abstain=True) == []
    assert all(len(r) == 1 for r in router.route(xq, top_experts=1, abstain=True))
    assert len(router.search(far, k=3, top_experts=1)) == 3  # abstention is opt-in


def test_abstain_without_threshold__is_a_clear_error(clustered) -> None:
    router, xq, _ = clustered
    router.set_gate(initial_gate(router.experts, hidden_dims=[8]))
    with pytest.raises(ValueError, match="abstain_threshold"):
        router.route(xq, abstain=True)


def test_load_floor_bias__raises_only_starving_experts_until_each_meets_the_floor() -> None:
    # 100 queries over 4 experts: expert 3 never wins (it is 0.09 behind expert 0 on queries 0-9);
    # expert 2 wins 10 queries (share x E = 0.4), the others 45 each.
    logits = np.zeros((100, 4))
    logits[:45, 0], logits[45:90, 1], logits[90:, 2] = 1.0, 1.0, 1.0
    logits[:10, 3] = 0.91
    bias = load_floor_bias(logits, floor=0.4, step=0.02)
    shares = np.bincount((logits + bias).argmax(1), minlength=4) * 4 / 100
    assert shares.min() >= 0.4 and bias[0] == bias[1] == bias[2] == 0.0
    assert bias[3] == pytest.approx(0.10)  # the first grid step above the 0.09 gap: takes queries 0-9
    assert np.array_equal(load_floor_bias(logits, floor=0.0), np.zeros(4))
    # with gold experts, expert 3's target is its gold share: 5 queries (share x E = 0.2) belong to it
    gold = np.r_[np.full(5, 3), np.zeros(95, dtype=int)]
    lifted = load_floor_bias(logits, floor=0.4, gold=gold, step=0.02)
    assert lifted[3] == pytest.approx(0.10) and (lifted[:3] == 0).all()
    assert np.array_equal(load_floor_bias(logits, floor=0.4, gold=np.zeros(100, dtype=int)), np.zeros(4))
    with pytest.raises(ValueError, match=r"gold names 3 experts for 100 queries"):
        load_floor_bias(logits, floor=0.4, gold=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"floor is a share of the even load 1/E, so it must be in \[0, 1\], got 1.5"):
        load_floor_bias(logits, floor=1.5)

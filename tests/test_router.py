"""Router: routed search against exact oracles, routing results, stats, and clear errors on bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from moe_router import HashingEmbedder, Router
from moe_router.gate import initial_gate
from moe_router.metrics import top_experts
from moe_router.types import ExpertSpec
from tests.helpers import DIM, SIZES, assert_same_topk, brute_force, clusters, make_router

NTOTAL = sum(SIZES)


def _all_vectors(router: Router) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) every stored (prepared) vector and (n,) its global id."""
    return np.concatenate([e.vectors() for e in router.experts]), np.concatenate([e.ids for e in router.experts])


def _arrays(hits: list[list], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    worst = -np.inf if metric == "ip" else np.inf
    D = np.full((len(hits), k), worst)
    I = np.full((len(hits), k), -1, dtype=np.int64)
    for q, row in enumerate(hits):
        D[q, : len(row)] = [h.score for h in row]
        I[q, : len(row)] = [h.id for h in row]
    return D, I


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("k", [1, 10, 50])
def test_search_all_experts__equals_flat_index(router: Router, queries: np.ndarray, k: int) -> None:
    xb, ids = _all_vectors(router)
    flat = faiss.IndexFlatIP(DIM) if router.metric == "ip" else faiss.IndexFlatL2(DIM)
    flat.add(xb)
    xq, _ = router.prepare(queries)
    D_ref, rows = flat.search(xq, k)
    hits = router.search(queries, k=k, top_experts=router.num_experts)
    assert all(len(h) == k for h in hits)
    D, I = _arrays(hits, k, router.metric)
    assert_same_topk(D, I, D_ref, ids[rows])


def test_search_experts__equals_brute_force_over_assigned_experts(router: Router, queries: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    xq, _ = router.prepare(queries)
    assignment = np.stack([rng.choice(router.num_experts, size=2, replace=False) for _ in range(len(xq))])
    k = 12  # more than the 3-vector expert holds: its slots are padding in the merge
    res = router.search_experts(xq, k, assignment)
    for q, chosen in enumerate(assignment):
        xb = np.concatenate([router.experts[e].vectors() for e in chosen])
        ids = np.concatenate([router.experts[e].ids for e in chosen])
        D_ref, I_ref = brute_force(xq[q : q + 1], xb, ids, k, router.metric)
        assert_same_topk(res.D[q : q + 1], res.I[q : q + 1], D_ref, I_ref)
        owner = {int(i): e for e in chosen for i in router.experts[e].ids}
        assert [owner.get(int(i), -1) for i in res.I[q]] == res.E[q].tolist()
        assert res.scanned[q] == sum(router.experts[e].ntotal for e in chosen)


def test_search_experts__pads_with_minus_one_when_assigned_experts_hold_fewer_than_k(router: Router) -> None:
    xq, _ = router.prepare(np.ones((2, DIM)))
    res = router.search_experts(xq, 5, np.zeros((2, 1), dtype=np.int64))  # expert0 holds 3 vectors
    assert (res.I[:, 3:] == -1).all() and (res.E[:, 3:] == -1).all()
    assert (res.I[:, :3] >= 0).all() and (res.E[:, :3] == 0).all()
    assert np.isinf(res.D[:, 3:]).all()


def test_search__searches_only_the_routed_experts(router: Router, queries: np.ndarray) -> None:
    xq, _ = router.prepare(queries)
    chosen = torch.topk(torch.from_numpy(router.gate_probs(xq)), 2, dim=1).indices.numpy()  # an independent top-k
    hits = router.search(queries, k=8, top_experts=2)
    for q, row in enumerate(hits):
        allowed = {router.experts[e].name for e in chosen[q]}
        assert {h.expert for h in row} <= allowed
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=router.metric == "ip")  # best first for either metric


def test_search_per_expert__each_routed_expert_gives_its_own_exact_top_k(router: Router, queries: np.ndarray) -> None:
    xq, _ = router.prepare(queries)
    chosen = top_experts(router.gate_probs(xq), 2)
    k = 4
    for q, row in enumerate(router.search(queries, k=k, top_experts=2, per_expert=True)):
        expected = []  # expert by expert, most probable first, each expert's exact top k (fewer if it holds fewer)
        for e in chosen[q]:
            ex = router.experts[e]
            _, I_ref = brute_force(xq[q : q + 1], ex.vectors(), ex.ids, min(k, ex.ntotal), router.metric)
            expected += [(ex.name, int(i)) for i in I_ref[0]]
        assert [(h.expert, h.id) for h in row] == expected


def test_search__hits_carry_text_metadata_and_routing_probability(router_ip: Router, queries: np.ndarray) -> None:
    xq, _ = router_ip.prepare(queries[:5])
    probs = router_ip.gate_probs(xq)
    for q, row in enumerate(router_ip.search(queries[:5], k=4)):
        for h in row:
            e = router_ip.expert_indices([h.expert])[0]
            assert h.routing_score == pytest.approx(float(probs[q, e]))
            assert h.text == f"doc {h.metadata['expert']}-{h.metadata['row']}"
            assert h.metadata["expert"] == e and h.specialization == f"topic {e}"
    bare = router_ip.search(queries[0], k=4, with_text=False)
    assert all(h.text is None and h.metadata == {} for h in bare)


def test_route__returns_top_experts_by_probability_with_renormalised_weights(
    router: Router, queries: np.ndarray
) -> None:
    xq, _ = router.prepare(queries)
    probs = router.gate_probs(xq)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    routes = router.route(queries, top_experts=3)
    expected = torch.topk(torch.from_numpy(probs), 3, dim=1).indices.numpy()  # an independent top-k
    for q, row in enumerate(routes):
        assert [router.expert_indices([r.expert])[0] for r in row] == expected[q].tolist()
        assert [r.probability for r in row] == pytest.approx(probs[q, expected[q]].tolist())
        assert sum(r.weight for r in row) == pytest.approx(1.0)


def test_route_single_query__returns_one_list(router_ip: Router, queries: np.ndarray) -> None:
    single = router_ip.route(queries[0], top_experts=2)
    batch = router_ip.route(queries[:1], top_experts=2)
    assert single == batch[0] and len(single) == 2


def test_route_text__uses_the_embedder_and_finds_the_domain(text_router: Router) -> None:
    routes = text_router.route(
        ["a question about galaxy orbit telescope", "a question about bake flour oven"], top_experts=1
    )
    assert [r[0].expert for r in routes] == ["astronomy", "cooking"]


def test_centroid_gate__routes_own_clusters_to_own_expert(router_ip: Router) -> None:
    names = router_ip.expert_names
    for e in router_ip.experts:
        top1 = [r[0].expert for r in router_ip.route(e.vectors(), top_experts=1)]
        assert np.mean([t == e.name for t in top1]) >= 0.9, names


def test_add_expert_with_gate__new_expert_is_routable_at_once(router_ip: Router) -> None:
    new = clusters(5, 50, DIM, seed=0)[4]  # the fifth cluster of the same seed: far from the other four
    router_ip.add_expert("newcomer", new)
    assert router_ip.gate.num_experts == router_ip.num_experts == 5
    top1 = [r[0].expert for r in router_ip.route(new, top_experts=1)]
    assert np.mean([t == "newcomer" for t in top1]) >= 0.3
    assert router_ip.expert("newcomer").ntotal == 50
    assert router_ip.expert("newcomer").ids.min() == NTOTAL  # ids continue after the existing ones


def test_stats__count_routed_queries_and_mean_confidence(router_ip: Router, queries: np.ndarray) -> None:
    router_ip.reset_stats()
    routes = router_ip.route(queries, top_experts=2)
    hits = router_ip.search(queries[:10], k=3, top_experts=1)  # one routed expert per query
    stats = {s.name: s for s in router_ip.stats()}
    for name, s in stats.items():
        chosen = [r.probability for row in routes for r in row if r.expert == name]
        chosen += [row[0].routing_score for row in hits if row[0].expert == name]
        assert s.queries == len(chosen)
        assert s.mean_confidence == (pytest.approx(np.mean(chosen), rel=1e-6) if chosen else 0.0)
    assert sum(s.queries for s in stats.values()) == 2 * len(queries) + 10
    assert sum(s.load_share for s in stats.values()) == pytest.approx(1.0)
    assert [s.vectors for s in stats.values()] == list(SIZES)
    router_ip.reset_stats()
    assert all(s.queries == 0 and s.load_share == 0 for s in router_ip.stats())


def test_router_ip__normalises_stored_and_query_vectors(router_ip: Router) -> None:
    np.testing.assert_allclose(np.linalg.norm(_all_vectors(router_ip)[0], axis=1), 1.0, rtol=1e-5)
    hit = router_ip.search(router_ip.experts[2].vectors()[0] * 7.5, k=1, top_experts=4)[0]
    assert hit.id == router_ip.experts[2].ids[0] and hit.score == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.ones((2, DIM + 1)), f"dimension {DIM + 1}, expected {DIM}"),
        (np.ones(DIM - 1), f"dimension {DIM - 1}, expected {DIM}"),
        (np.ones((2, 2, DIM)), r"shape \(n, d\)"),
        (np.where(np.eye(3, DIM) == 1, np.nan, 0.5), "NaN or inf"),
        (np.where(np.eye(3, DIM) == 1, np.inf, 0.5), "NaN or inf"),
        (np.where(np.eye(3, DIM) == 1, -np.inf, 0.5), "NaN or inf"),
        (np.empty((0, DIM)), "empty batch"),
        ([], "empty batch"),
        (np.zeros(DIM), "zero vector"),
        ([["a", 1.0]], "numeric arrays"),
    ],
)
@pytest.mark.parametrize("call", ["route", "search"])
def test_bad_queries__raise_clear_value_error(router_ip: Router, call: str, bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        getattr(router_ip, call)(bad)


@pytest.mark.parametrize("k", [0, -1, NTOTAL + 1, 2.5, True])
def test_search_bad_k__raises(router_ip: Router, queries: np.ndarray, k: object) -> None:
    with pytest.raises(ValueError, match=rf"k must be (between 1 and {NTOTAL}|an integer)"):
        router_ip.search(queries, k=k)


def test_search_k_equal_to_ntotal__returns_every_vector(router_ip: Router, queries: np.ndarray) -> None:
    hits = router_ip.search(queries[0], k=NTOTAL, top_experts=4)
    assert sorted(h.id for h in hits) == list(range(NTOTAL))


@pytest.mark.parametrize("top", [0, -2, len(SIZES) + 1])
def test_search_bad_top_experts__raises_naming_top_experts(router_ip: Router, queries: np.ndarray, top: int) -> None:
    with pytest.raises(ValueError, match=r"top_experts must be (between 1 and 4|an integer >= 1)"):
        router_ip.search(queries, top_experts=top)


@pytest.mark.parametrize("top", [0, -2, len(SIZES) + 1])
def test_route_bad_top_experts__raises(router_ip: Router, queries: np.ndarray, top: int) -> None:
    with pytest.raises(ValueError, match=r"top_experts must be (between 1 and 4|an integer >= 1)"):
        router_ip.route(queries, top_experts=top)


def test_unknown_expert_name__raises_key_error_listing_known_ones(router_ip: Router) -> None:
    with pytest.raises(KeyError, match=r"unknown expert 'nope'.*expert0"):
        router_ip.expert("nope")


def test_add_expert_duplicate_name__raises(router_ip: Router) -> None:
    with pytest.raises(ValueError, match="already exists"):
        router_ip.add_expert("expert1", np.ones((2, DIM)))
    assert router_ip.num_experts == len(SIZES)


@pytest.mark.parametrize(
    "vectors, message",
    [
        (np.empty((0, DIM)), "empty batch"),
        ([], "empty"),
        (np.ones((4, DIM + 3)), f"dimension {DIM + 3}, expected {DIM}"),
        (np.where(np.eye(4, DIM) == 1, np.nan, 1.0), "NaN or inf"),
        (np.where(np.eye(4, DIM) == 1, np.inf, 1.0), "NaN or inf"),
        (None, "give vectors or texts"),
    ],
)
def test_add_expert_bad_vectors__raise_and_leave_router_unchanged(
    router_ip: Router, vectors: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        router_ip.add_expert("bad", vectors)
    assert router_ip.num_experts == router_ip.gate.num_experts == len(SIZES)
    assert router_ip.parts().store.max_id() == NTOTAL - 1


def test_add_expert_texts_vectors_mismatch__raises(router_ip: Router) -> None:
    with pytest.raises(ValueError, match="3 vectors but 2 texts"):
        router_ip.add_expert("bad", np.ones((3, DIM)), texts=["a", "b"])


def test_texts_without_embedder__raise(router_ip: Router) -> None:
    with pytest.raises(ValueError, match="no embedder"):
        router_ip.add_expert("texts", texts=["some text"])
    with pytest.raises(ValueError, match="need an embedder"):
        router_ip.route("a text query")
    with pytest.raises(ValueError, match="need an embedder"):
        router_ip.search(["two", "texts"])


def test_router_without_gate__route_raises_runtime_error() -> None:
    router = make_router(gate=False)
    with pytest.raises(RuntimeError, match="no gate"):
        router.route(np.ones(DIM))


def test_gate_expert_count_mismatch__is_refused_and_keeps_the_gate(router_ip: Router) -> None:
    before = router_ip.gate
    with pytest.raises(ValueError, match="the gate has dim 32 and 3 outputs; the router needs dim 32 and 4"):
        router_ip.set_gate(initial_gate(router_ip.experts[:3]))
    assert router_ip.gate is before


def test_router__rejects_embedder_of_other_dim_and_bad_metric() -> None:
    with pytest.raises(ValueError, match="gives 64-d vectors"):
        Router(DIM, embedder=HashingEmbedder(dim=64))
    with pytest.raises(ValueError, match="metric must be one of"):
        Router(DIM, metric="cos")
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        Router(0)


def test_initial_gate_without_experts__raises() -> None:
    with pytest.raises(ValueError, match="no experts yet"):
        initial_gate(Router(DIM).experts)


def test_gate_probs__accepts_torch_queries(router_ip: Router, queries: np.ndarray) -> None:
    from_torch = router_ip.route(torch.from_numpy(queries[:3].astype(np.float32)), top_experts=1)
    assert from_torch == router_ip.route(queries[:3], top_experts=1)


def test_route__does_not_bound_k_by_the_stored_vectors() -> None:
    router = Router(DIM)
    router.add_expert("a", np.eye(DIM, dtype=np.float32)[:2])
    router.add_expert("b", np.eye(DIM, dtype=np.float32)[2:5])
    router.set_gate(initial_gate(router.experts))
    assert [s.expert for s in router.route(np.eye(DIM, dtype=np.float32)[0])] == ["a", "b"]  # k=10 > 5 vectors
    with pytest.raises(ValueError, match="k must be between 1 and 5"):
        router.search(np.eye(DIM, dtype=np.float32)[0])


def test_add_expert__takes_a_checked_expert_spec() -> None:
    router = make_router()
    router.add_expert(ExpertSpec("new", "a topic", parent="expert0"), np.ones((2, DIM)))
    assert (router.expert("new").specialization, router.expert("new").parent) == ("a topic", "expert0")
    with pytest.raises(ValueError, match="in the ExpertSpec, not beside it"):
        router.add_expert(ExpertSpec("other"), np.ones((2, DIM)), parent="expert0")

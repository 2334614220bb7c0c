"""Adaptive expert count (top-p): the selection's invariants, and routed search with it against exact search."""

from __future__ import annotations

import numpy as np
import pytest

from moe_router.cli import main as cli_main
from moe_router.metrics import top_experts, top_p_experts
from tests.helpers import assert_same_topk, brute_force


def _probs(n: int, e: int, seed: int, concentration: float) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(e, concentration), size=n)


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("cap", [1, 2, 4, 8])
def test_top_p_experts__smallest_set_reaching_p_within_one_and_max(p: float, cap: int) -> None:
    probs = _probs(500, 8, seed=cap, concentration=0.5)
    experts, counts = top_p_experts(probs, p, cap)
    assert experts.shape == (500, counts.max()) and ((counts >= 1) & (counts <= cap)).all()
    order = top_experts(probs, 8)
    for row, c, q, o in zip(experts, counts, probs, order):
        assert (row[:c] == o[:c]).all() and (row[c:] == -1).all()  # best first, then padding
        mass = q[o].cumsum()
        assert mass[c - 1] >= p - 1e-9 or c == cap  # reaches p unless stopped at the cap
        assert c == 1 or mass[c - 2] < p - 1e-9  # minimal: one expert fewer does not reach p


def test_top_p_experts__tiny_p_is_top_1_and_p_1_is_every_expert() -> None:
    probs = _probs(200, 6, seed=0, concentration=1.0)
    experts, counts = top_p_experts(probs, 1e-6, 6)
    assert (counts == 1).all() and (experts == top_experts(probs, 1)).all()
    experts, counts = top_p_experts(probs, 1.0, 6)
    assert (counts == 6).all() and (experts == top_experts(probs, 6)).all()


def test_top_p_experts__uneven_counts_follow_confidence() -> None:
    probs = np.array([[0.95, 0.03, 0.02], [0.4, 0.35, 0.25], [0.5, 0.4, 0.1]])
    experts, counts = top_p_experts(probs, 0.9, 3)
    assert counts.tolist() == [1, 3, 2]
    assert experts.tolist() == [[0, -1, -1], [0, 1, 2], [0, 1, -1]]


@pytest.mark.parametrize(
    ("p", "cap", "message"),
    [
        (0.0, 2, "top_p must be in"),
        (1.5, 2, "top_p must be in"),
        (0.5, 0, "max_experts must be between 1 and 3"),
        (0.5, 4, "max_experts must be between 1 and 3"),
    ],
)
def test_top_p_experts__bad_arguments_raise(p: float, cap: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        top_p_experts(np.full((2, 3), 1 / 3), p, cap)


def test_router_search_top_p_over_every_expert__equals_exact_flat_search(router, queries) -> None:
    router.gate.set_temperature(50.0)  # near-uniform probabilities: p = 1 needs every expert
    hits = router.search(queries, k=7, top_p=1.0, max_experts=router.num_experts, with_text=False)
    xb = np.concatenate([e.vectors() for e in router.experts])
    ids = np.concatenate([e.ids for e in router.experts])
    D_ref, I_ref = brute_force(router.prepare(queries)[0], xb, ids, 7, router.metric)
    D = np.array([[h.score for h in row] for row in hits])
    I = np.array([[h.id for h in row] for row in hits])
    assert_same_topk(D, I, D_ref, I_ref)


def test_router_search_top_p__searches_exactly_the_selected_experts(router_ip, queries) -> None:
    probs = router_ip.gate_probs(router_ip.prepare(queries)[0])
    experts, counts = top_p_experts(probs, 0.8, 3)
    hits = router_ip.search(queries, k=router_ip.ntotal, top_p=0.8, max_experts=3, with_text=False)
    for row, chosen, c in zip(hits, experts, counts):
        names = {router_ip.experts[e].name for e in chosen[:c]}
        assert {h.expert for h in row} == names  # k = every vector: each searched expert returns all of its own
        assert len(row) == sum(router_ip.expert(n).ntotal for n in names)
    routes = router_ip.route(queries, top_p=0.8, max_experts=3)
    assert [len(r) for r in routes] == counts.tolist()
    assert all(abs(sum(s.weight for s in r) - 1.0) < 1e-5 for r in routes)
    before = router_ip.parts().stats.counts.sum()
    router_ip.search(queries, k=3, top_p=0.8, max_experts=3)
    assert router_ip.parts().stats.counts.sum() - before == counts.sum()  # padding is not counted


def test_router_top_p_bad_arguments__raise_naming_them(router_ip, queries) -> None:
    with pytest.raises(ValueError, match="top_p must be a number in"):
        router_ip.search(queries, top_p=0.0)
    with pytest.raises(ValueError, match="max_experts must be"):
        router_ip.route(queries, top_p=0.9, max_experts=0)


def test_cli_top_p__prints_between_one_and_max_experts(text_router, tmp_path, capsys) -> None:
    ckpt = text_router.save(tmp_path / "ckpt")
    assert cli_main(["route", "--ckpt", str(ckpt), "--top-p", "0.999", "--max-experts", "2", "comet orbit"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "confidence" in line]
    want = text_router.route("comet orbit", top_p=0.999, max_experts=2)
    assert [line.split()[0] for line in lines] == [s.expert for s in want] and 1 <= len(lines) <= 2
    assert cli_main(["search", "--ckpt", str(ckpt), "-k", "2", "--top-p", "0.5", "comet orbit"]) == 0
    assert "Query:" in capsys.readouterr().out

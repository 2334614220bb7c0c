"""optimize_routing: rebalance / merge / split candidates, each measured; kept only if it helps.

Dimension legend: nq queries, E experts, t experts searched per query, k hits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_router.gate.confidence import softmax
from moe_router.gate.model import Gate, infer
from moe_router.index.exact import exact_ids, stacked
from moe_router.lifecycle.merge_split import plan_merge, plan_split
from moe_router.lifecycle.plan import FineTune, then, view
from moe_router.metrics import load_stats, overlap_from_counts, top_experts
from moe_router.routing.parts import Change, RouterParts
from moe_router.routing.router import Router
from moe_router.types import SearchParams


@dataclass(frozen=True)
class RoutingQuality:
    """Measured on validation queries."""

    recall: float  # recall@k when searching the gate's top experts, vs exhaustive search
    scanned: float  # share of stored vectors compared per query
    max_over_mean: float  # load of the busiest expert over the average
    cv: float  # coefficient of variation of the load


@dataclass(frozen=True)
class OptimizeAction:
    kind: str  # 'rebalance' | 'merge' | 'split'
    experts: tuple[str, ...]
    kept: bool
    before: RoutingQuality
    after: RoutingQuality
    note: str = ""


@dataclass(frozen=True)
class OptimizeReport:
    actions: list[OptimizeAction]
    before: RoutingQuality
    after: RoutingQuality

    @property
    def improvement(self) -> float:
        """Measured recall@k gain on the validation queries (0.0 when nothing was kept)."""
        return self.after.recall - self.before.recall

    def count(self, kind: str) -> int:
        return sum(a.kept for a in self.actions if a.kind == kind)


def _quality(
    state: RouterParts, xq: np.ndarray, exact: np.ndarray, t: int, probs: np.ndarray | None = None
) -> RoutingQuality:
    """recall@k of searching each query's top-t experts (from the expert holding each exact neighbour), cost, load."""
    if probs is None:
        probs = _probs(state.gate, xq)
    _, ids, owner = stacked(state.experts)
    owner_of = dict(zip(ids.tolist(), owner.tolist()))
    holder = np.array([[owner_of.get(int(i), -1) for i in row] for row in exact])  # (nq, k)
    counts = np.zeros((len(xq), len(state.experts) + 1))  # last column: neighbours no expert holds any more
    np.add.at(counts, (np.repeat(np.arange(len(xq)), holder.shape[1]), holder.ravel()), 1.0)
    top = top_experts(probs, t)  # (nq, t)
    sizes = np.array([e.ntotal for e in state.experts])
    load = load_stats(top, len(state.experts))
    return RoutingQuality(
        overlap_from_counts(top, counts[:, :-1], exact.shape[1]),
        float(sizes[top].sum(1).mean() / sizes.sum()),
        float(load["max_over_mean"]),
        float(load["cv"]),
    )


def _probs(gate: Gate, xq: np.ndarray, bias_shift: np.ndarray | None = None) -> np.ndarray:
    """Gate probabilities (nq, E), with `bias_shift` (E,) added to the logits first."""
    logits = infer(gate, xq, "logits").astype(np.float64)
    return softmax(logits + (0.0 if bias_shift is None else bias_shift[None]), float(gate.temperature))


def _better(new: RoutingQuality, cur: RoutingQuality, tolerance: float, max_scan_increase: float) -> bool:
    """Kept only if recall is no worse (within tolerance), cost stays in budget, and something improves."""
    if new.recall < cur.recall - tolerance or new.scanned > cur.scanned * (1 + max_scan_increase) + 1e-12:
        return False
    return (
        new.recall > cur.recall + 1e-12
        or new.scanned < cur.scanned - 1e-12
        or new.max_over_mean < cur.max_over_mean - 1e-9
    )


def _rebalanced_gate(
    state: RouterParts,
    xq: np.ndarray,
    exact: np.ndarray,
    t: int,
    cur: RoutingQuality,
    tolerance: float,
    max_scan_increase: float,
    over: float,
    under: float,
) -> tuple[Gate, tuple[str, ...]] | None:
    """Shift head biases against the load (log of each expert's load over the average); best accepted strength."""
    gate = state.gate
    probs = _probs(gate, xq)
    E = len(state.experts)
    shares = np.bincount(top_experts(probs, t).ravel(), minlength=E) / (len(xq) * t)
    ratio = shares * E
    flagged = (ratio > over) | (ratio < under)
    if not flagged.any():
        return None
    shift = -float(gate.temperature) * np.log(np.clip(ratio, 0.25, 4.0))  # (E,) pushes load towards the average
    best = None
    for strength in (0.25, 0.5, 1.0):
        q = _quality(state, xq, exact, t, _probs(gate, xq, strength * shift))
        if _better(q, cur, tolerance, max_scan_increase) and (best is None or q.max_over_mean < best[1].max_over_mean):
            best = (strength, q)
    if best is None:
        return None
    g = copy.deepcopy(gate)
    g.shift_bias(best[0] * shift)
    return g, tuple(e.name for e, f in zip(state.experts, flagged) if f)


def _co_routing(probs: np.ndarray, E: int) -> list[tuple[float, int, int]]:
    """(share, a, b) per expert pair: queries whose top-2 is {a, b} over those whose top-1 is a or b, highest first."""
    top = top_experts(probs, 2)
    pair = np.zeros((E, E))
    np.add.at(pair, (top[:, 0], top[:, 1]), 1)
    first = np.bincount(top[:, 0], minlength=E)
    out = []
    for a in range(E):
        for b in range(a + 1, E):
            denom = first[a] + first[b]
            if denom:
                out.append(((pair[a, b] + pair[b, a]) / denom, a, b))
    return sorted(out, reverse=True)


def optimize_routing(
    router: Router,
    val_queries: Any,
    top_experts_searched: int = 2,
    k: int = 10,
    fine_tune: FineTune | None = None,
    rebalance: bool = True,
    merge: bool = True,
    split: bool = True,
    merge_overlap: float = 0.5,
    overload: float = 1.5,
    underload: float = 0.5,
    max_candidates: int = 3,
    tolerance: float = 0.0,
    max_scan_increase: float = 0.1,
    seed: int = 0,
) -> OptimizeReport:
    """Try to improve routing on validation queries; keep only changes that measurably help.

    Candidates, each measured on `val_queries` (recall@k of searching the top experts against an
    exhaustive search, the scanned share and the load): shifting gate biases against the load
    when experts are over `overload` or under `underload` x the average; merging pairs of experts
    that the gate confuses (for more than `merge_overlap` of the queries routed to either, the
    other is second); splitting experts loaded over `overload` x the average into 2. Merges and
    splits are fine-tuned with `fine_tune` before they are measured, when given. A candidate is
    kept only if recall drops by at most `tolerance` (default: not at all), the scanned share
    grows by at most `max_scan_increase`, and recall, cost or balance improves. The router is
    changed once, at the end, and only if something was kept.
    """
    if router.gate is None:
        raise RuntimeError("optimize_routing needs a trained gate; the router has none")
    checked = router.check_params(SearchParams(k=k, top_experts=top_experts_searched))
    t, k = checked.top_experts, checked.k
    xq, _ = router.prepare(val_queries)
    exact = exact_ids(router.experts, xq, k)  # (nq, k)
    actions: list[OptimizeAction] = []
    quality: dict[str, RoutingQuality] = {}

    def plan(parts: RouterParts) -> Change:
        best = Change(parts)
        cur = quality["start"] = _quality(parts, xq, exact, t)
        touched: set[str] = set()

        def consider(kind: str, names: tuple[str, ...], candidate: Change, note: str) -> None:
            nonlocal best, cur
            if fine_tune is not None and candidate.created:
                v = view(candidate.parts)
                fine_tune(v, candidate.created)
                candidate = Change(v.parts(), candidate.item_moves, candidate.feedback_moves, candidate.created)
            q = _quality(candidate.parts, xq, exact, t)
            kept = _better(q, cur, tolerance, max_scan_increase)
            actions.append(OptimizeAction(kind, names, kept, cur, q, note))
            if kept:
                best, cur = then(best, candidate), q
                if kind != "rebalance":  # a bias shift does not stop experts from being merged or split
                    touched.update(names, candidate.created)

        if rebalance:
            found = _rebalanced_gate(best.parts, xq, exact, t, cur, tolerance, max_scan_increase, overload, underload)
            if found is not None:
                gate, flagged = found
                consider(
                    "rebalance", flagged, Change(best.parts.replace(gate=gate)), "head biases shifted against the load"
                )
        if merge and len(best.parts.experts) > 2:
            names = best.parts.names
            pairs = [(s, names[a], names[b]) for s, a, b in _co_routing(_probs(best.parts.gate, xq), len(names))]
            for share, a, b in [p for p in pairs if p[0] > merge_overlap][:max_candidates]:
                if {a, b} & touched or not {a, b} <= set(best.parts.names):
                    continue
                consider(
                    "merge",
                    (a, b),
                    plan_merge(best.parts, a, b),
                    f"co-routed on {100 * share:.0f}% of their queries",
                )
        if split:
            names = best.parts.names
            ratio = np.bincount(top_experts(_probs(best.parts.gate, xq), t).ravel(), minlength=len(names)) / (
                len(xq) * t
            )
            ratio *= len(names)
            for j in np.argsort(-ratio, kind="stable")[:max_candidates]:
                name = names[j]
                if ratio[j] <= overload or name in touched or name not in best.parts.names:
                    continue
                if best.parts.experts[best.parts.position(name)].ntotal < 2:
                    continue
                consider(
                    "split",
                    (name,),
                    plan_split(best.parts, name, 2, None, seed, overload),
                    f"load {ratio[j]:.2f}x average",
                )
        quality["end"] = cur
        return best  # nothing kept: the parts as they were (the router is unchanged)

    router.update(plan)
    return OptimizeReport(actions, quality["start"], quality["end"])

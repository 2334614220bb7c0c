"""Merging two experts into one and splitting one into several (k-means), gate rows carried over."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_router.checks import check_new_name
from moe_router.gate.surgery import merged_head, split_head
from moe_router.index.clustering import balanced_kmeans, nearest_centroid
from moe_router.index.expert import Expert, centroids, sample_vectors
from moe_router.lifecycle.plan import Plan, State, apply_plan, new_expert, position, state_of
from moe_router.routing.router import Router
from moe_router.store import MetadataStore


def plan_merge(
    state: State,
    store: MetadataStore,
    a: str,
    b: str,
    name: str | None,
    specialization: str | None,
    parent: str | None | type[Ellipsis],
) -> Plan:
    ia, ib = position(state.experts, a), position(state.experts, b)
    if ia == ib:
        raise ValueError(f"cannot merge expert {a!r} with itself; name two different experts")
    name = name if name is not None else f"{a}+{b}"
    check_new_name(name, {e.name for e in state.experts} - {a, b}, f"merging {a!r} and {b!r}")
    ea, eb = state.experts[ia], state.experts[ib]
    if parent is ...:
        parent = ea.parent if ea.parent == eb.parent else None
    xb = np.concatenate([ea.vectors(), eb.vectors()])  # (na + nb, d)
    ids = np.concatenate([ea.ids, eb.ids])
    spec = (
        specialization
        if specialization is not None
        else (
            ea.specialization if ea.specialization == eb.specialization else f"{ea.specialization}+{eb.specialization}"
        )
    )
    merged = new_expert(state, ea, name, xb, ids, spec, parent)
    gate = None
    if state.gate is not None:
        gate = merged_head(state.gate, ia, ib, xb, sample_vectors(state.experts, (ia, ib)), ea.ntotal, eb.ntotal)
    lo, hi = min(ia, ib), max(ia, ib)
    experts = list(state.experts)
    experts[lo] = merged
    del experts[hi]
    seqs = [r.seq for r in store.feedback(a)] + [r.seq for r in store.feedback(b)]
    return Plan(
        State(experts, gate, state.stats.merged(ia, ib), state.backend),
        [(ids, name)],
        [(seqs, name)] if seqs else [],
        [name],
    )


def merge_experts(
    router: Router,
    a: str,
    b: str,
    name: str | None = None,
    specialization: str | None = None,
    parent: Any = ...,
) -> Expert:
    """Merge experts `a` and `b` into one (default name 'a+b') in a's place.

    Vectors, ids and metadata are combined, feedback moves to the merged expert, and the gate's
    two rows become one fitted so that, on their vectors, it carries the summed probability of
    the two (so routing is as before, with the two treated as one). `parent` defaults to the
    shared parent of the two (None when they differ). Follow with a short fine-tune
    (moe_router.adaptation.fine_tune).
    """
    with router.lock:
        plan = plan_merge(state_of(router), router.store, a, b, name, specialization, parent)
        apply_plan(router, plan)
        return router.expert(plan.created[0])


def plan_split(
    state: State,
    store: MetadataStore,
    name: str,
    parts: int,
    names: Sequence[str] | None,
    seed: int,
    max_imbalance: float | None,
) -> Plan:
    i = position(state.experts, name)
    ex = state.experts[i]
    if isinstance(parts, bool) or not isinstance(parts, (int, np.integer)) or parts < 2:
        raise ValueError(f"splitting expert {name!r}: parts must be an integer >= 2, got {parts!r}")
    if parts > ex.ntotal:
        raise ValueError(f"cannot split expert {name!r} into {parts} parts: it holds only {ex.ntotal} vectors")
    names = list(names) if names is not None else [f"{name}/{j}" for j in range(parts)]
    if len(names) != parts:
        raise ValueError(f"splitting expert {name!r} into {parts} parts needs {parts} names, got {len(names)}")
    taken = {e.name for e in state.experts} - {name}
    for n in names:
        check_new_name(n, taken, f"splitting expert {name!r}")
        taken.add(n)
    xb = ex.vectors()
    labels = balanced_kmeans(xb, parts, metric=ex.metric, seed=seed, max_imbalance=max_imbalance)
    children = [
        new_expert(
            state, ex, n, xb[labels == j], ex.ids[labels == j], f"{ex.specialization} ({j + 1}/{parts})", ex.parent
        )
        for j, n in enumerate(names)
    ]
    gate = (
        split_head(state.gate, i, xb, labels, parts, sample_vectors(state.experts, (i,), seed=seed))
        if state.gate is not None
        else None
    )
    experts = state.experts[:i] + children + state.experts[i + 1 :]
    # Feedback on the old expert goes to the part nearest its query.
    rows = store.feedback(name)
    feedback_moves: list[tuple[list[int], str]] = []
    if rows:
        xq = np.stack([r.vector for r in rows])
        near = nearest_centroid(xq, centroids(children), ex.metric)
        feedback_moves = [
            ([rows[r].seq for r in np.flatnonzero(near == j)], n) for j, n in enumerate(names) if (near == j).any()
        ]
    item_moves = [(ex.ids[labels == j], n) for j, n in enumerate(names)]
    return Plan(State(experts, gate, state.stats.split(i, parts), state.backend), item_moves, feedback_moves, names)


def split_expert(
    router: Router,
    name: str,
    parts: int = 2,
    names: Sequence[str] | None = None,
    seed: int = 0,
    max_imbalance: float | None = None,
) -> list[Expert]:
    """Split an expert into `parts` by k-means over its vectors (default names 'name/0', 'name/1', ...).

    Every id goes to exactly one part; the gate's row becomes one row per part, fitted so the
    parts share the old expert's probability by cluster. `max_imbalance` bounds the largest
    part at that multiple of the mean part size. Follow with a short fine-tune.
    """
    with router.lock:
        plan = plan_split(state_of(router), router.store, name, parts, names, seed, max_imbalance)
        apply_plan(router, plan)
        return [router.expert(n) for n in plan.created]

"""Merging two experts into one and splitting one into several (k-means), gate rows carried over."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_router.checks import check_count, check_new_name, check_real
from moe_router.gate.surgery import merged_head, split_head
from moe_router.index.clustering import balanced_kmeans, nearest_centroid
from moe_router.index.expert import Expert, centroids, sample_vectors
from moe_router.lifecycle.plan import new_expert
from moe_router.routing.parts import Change, RouterParts
from moe_router.routing.router import Router
from moe_router.types import ExpertSpec


def plan_merge(
    parts: RouterParts,
    a: str,
    b: str,
    name: str | None = None,
    specialization: str | None = None,
    parent: Any = ...,
) -> Change:
    """Experts a and b as one (see merge_experts), in the place of the first of the two."""
    ia, ib = parts.position(a), parts.position(b)
    if ia == ib:
        raise ValueError(f"cannot merge expert {a!r} with itself; name two different experts")
    name = name if name is not None else f"{a}+{b}"
    check_new_name(name, set(parts.names) - {a, b}, f"merging {a!r} and {b!r}")
    ea, eb = parts.experts[ia], parts.experts[ib]
    if parent is ...:
        parent = ea.parent if ea.parent == eb.parent else None
    if specialization is None:
        same = ea.specialization == eb.specialization
        specialization = ea.specialization if same else f"{ea.specialization}+{eb.specialization}"
    spec = ExpertSpec(name, specialization, parent)  # checked before any work
    xb = np.concatenate([ea.vectors(), eb.vectors()])  # (na + nb, d)
    ids = np.concatenate([ea.ids, eb.ids])
    merged = new_expert(parts, spec, xb, ids)
    gate = None
    if parts.gate is not None:
        gate = merged_head(parts.gate, ia, ib, xb, sample_vectors(parts.experts, (ia, ib)), ea.ntotal, eb.ntotal)
    lo, hi = min(ia, ib), max(ia, ib)
    experts = list(parts.experts)
    experts[lo] = merged
    del experts[hi]
    seqs = [r.seq for r in parts.store.feedback(a)] + [r.seq for r in parts.store.feedback(b)]
    return Change(
        parts.replace(
            experts=tuple(experts),
            gate=gate,
            stats=parts.stats.merged(ia, ib),
            calibration=parts.calibration.renamed({a: name, b: name}),
        ),
        [(ids, name)],
        [(seqs, name)] if seqs else [],
        (name,),
    )


def merge_experts(
    router: Router,
    a: str,
    b: str,
    name: str | None = None,
    specialization: str | None = None,
    parent: Any = ...,
) -> Expert:
    """Merge experts `a` and `b` into one (default name 'a+b'), in the place of the first of the two.

    Vectors, ids and metadata are combined, feedback moves to the merged expert, and the gate's
    two rows become one fitted so that, on their vectors, it carries the summed probability of
    the two (so routing is as before, with the two treated as one). `parent` defaults to the
    shared parent of the two (None when they differ). Follow with a short fine-tune
    (moe_router.train.fine_tune).
    """
    change = router.update(lambda parts: plan_merge(parts, a, b, name, specialization, parent))
    return router.expert(change.created[0])


def plan_split(
    parts: RouterParts,
    name: str,
    count: int = 2,
    names: Sequence[str] | None = None,
    seed: int = 0,
    max_imbalance: float | None = None,
) -> Change:
    """Expert `name` as `count` experts by k-means (see split_expert), in its place."""
    i = parts.position(name)
    ex = parts.experts[i]
    what = f"splitting expert {name!r}"
    count = check_count(count, f"{what}: parts", low=2)
    if max_imbalance is not None:
        max_imbalance = check_real(max_imbalance, f"{what}: max_imbalance", 1.0, expected="a number >= 1 or None")
    if count > ex.ntotal:
        raise ValueError(f"cannot split expert {name!r} into {count} parts: it holds only {ex.ntotal} vectors")
    if names is None:
        names = [f"{name}/{j}" for j in range(count)]
    elif isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise ValueError(f"{what}: names must be a list of {count} names, got {type(names).__name__} {names!r:.40}")
    names = list(names)
    if len(names) != count:
        raise ValueError(f"{what} into {count} parts needs {count} names, got {len(names)}")
    taken = set(parts.names) - {name}
    for n in names:
        check_new_name(n, taken, what)
        taken.add(n)
    specs = [ExpertSpec(n, f"{ex.specialization} ({j + 1}/{count})", ex.parent) for j, n in enumerate(names)]
    xb = ex.vectors()
    labels = balanced_kmeans(xb, count, metric=ex.metric, seed=seed, max_imbalance=max_imbalance)
    children = [new_expert(parts, s, xb[labels == j], ex.ids[labels == j]) for j, s in enumerate(specs)]
    gate = None
    if parts.gate is not None:
        gate = split_head(parts.gate, i, xb, labels, count, sample_vectors(parts.experts, (i,), seed=seed))
    experts = (*parts.experts[:i], *children, *parts.experts[i + 1 :])
    # Feedback on the old expert goes to the part nearest its query.
    rows = parts.store.feedback(name)
    feedback_moves: list[tuple[list[int], str]] = []
    if rows:
        xq = np.stack([r.vector for r in rows])
        near = nearest_centroid(xq, centroids(children), ex.metric)
        feedback_moves = [
            ([rows[r].seq for r in np.flatnonzero(near == j)], n) for j, n in enumerate(names) if (near == j).any()
        ]
    item_moves = [(ex.ids[labels == j], n) for j, n in enumerate(names)]
    # Calibration queries of the old expert, like its feedback, go to the part nearest them.
    cal = parts.calibration
    mine = np.flatnonzero(np.array(cal.experts) == name) if len(cal) else np.empty(0, np.int64)
    if len(mine):
        near = nearest_centroid(cal.x[mine], centroids(children), ex.metric)
        cal = cal.reassigned(mine, [names[j] for j in near])
    new = parts.replace(experts=experts, gate=gate, stats=parts.stats.split(i, count), calibration=cal)
    return Change(new, item_moves, feedback_moves, tuple(names))


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
    change = router.update(lambda p: plan_split(p, name, parts, names, seed, max_imbalance))
    return [router.expert(n) for n in change.created]

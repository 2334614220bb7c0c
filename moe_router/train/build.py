"""Routers built from data: one expert per expert key, k-means shards (learned sharding), or synthetic clusters."""

from __future__ import annotations

import numpy as np

from moe_router.data.base import Dataset
from moe_router.data.synthetic import ClusterLayout, cluster_layout, sample_points
from moe_router.embed.base import Embedder
from moe_router.index.clustering import balanced_kmeans, kmeans_assign
from moe_router.routing.router import Router


def router_from_dataset(
    dataset: Dataset,
    embedder: Embedder | None,
    metric: str = "ip",
    kmeans_experts: int | None = None,
    seed: int = 0,
    max_imbalance: float | None = None,
) -> Router:
    """One expert per distinct expert key in the train split, holding that split's texts.

    With `kmeans_experts=n`, labels are ignored and the train vectors are cut into n experts by
    FAISS k-means (learned sharding): experts shard_00 .. shard_{n-1}; with `max_imbalance`, by
    k-means with a size cap (no shard above max_imbalance x the mean size). Data of vectors has no
    labels, so it needs `kmeans_experts`; its router has no embedder and is queried with vectors.
    """
    rows = dataset.stored()
    if rows.experts is None and not kmeans_experts:
        raise ValueError(
            f"dataset {dataset.name!r} is vectors without labels: set partition=N to cut it into N k-means experts"
        )
    if rows.texts is None:
        router = Router(rows.vectors.shape[1], metric)
        vectors = router.prepare(rows.vectors)[0]
    else:
        if embedder is None:
            raise ValueError(f"dataset {dataset.name!r} is texts: it needs an embedder")
        router = Router(embedder.dim, metric, embedder=embedder)
        vectors = embedder.encode(rows.texts)
    if kmeans_experts:
        if max_imbalance is None:
            shards = kmeans_assign(vectors, kmeans_experts, metric, seed)
        else:
            shards = balanced_kmeans(vectors, kmeans_experts, metric, seed, max_imbalance=max_imbalance)
        keys = np.array([f"shard_{i:02d}" for i in shards])
        names = sorted(set(keys))
    else:
        keys = np.array(rows.experts)
        names = dataset.experts
    for name in names:
        picked = np.flatnonzero(keys == name)
        router.add_expert(
            name,
            vectors[picked],
            texts=None if rows.texts is None else [rows.texts[i] for i in picked],
            parent=None if kmeans_experts else dataset.parents.get(name),
            metadata=None if rows.metadata is None else [rows.metadata[i] for i in picked],
        )
    return router


def clustered_router(n: int, d: int, experts: int, seed: int, layout: ClusterLayout | None = None) -> Router:
    """A Router ('ip') with `experts` equal experts of synthetic clustered vectors (n // experts each)."""
    if n % experts:
        raise ValueError(f"n={n} must be a multiple of experts={experts} (equal experts)")
    layout = layout if layout is not None else cluster_layout(d, experts, seed)
    router = Router(d, "ip")
    for e in range(experts):
        size = n // experts
        slots = np.arange(size) % layout.slots.shape[1]  # spread evenly over the expert's slots
        xb = sample_points(layout, e, slots, np.random.default_rng([seed, 1, e]))  # (n/E, d)
        router.add_expert(f"shard-{e:02d}", xb)
        del xb
    return router

"""Routers built from data: one expert per expert key of a dataset, k-means shards (learned sharding), or synthetic clusters."""

from __future__ import annotations

import numpy as np

from moe_router.data.beir import BeirDataset
from moe_router.data.datasets import TextDataset, VectorDataset
from moe_router.data.synthetic import ClusterLayout, cluster_layout, sample_points
from moe_router.embed.base import Embedder
from moe_router.index.clustering import balanced_kmeans, kmeans_assign
from moe_router.routing.router import Router


def router_from_dataset(
    dataset: TextDataset | BeirDataset | VectorDataset,
    embedder: Embedder | None,
    metric: str = "ip",
    kmeans_experts: int | None = None,
    seed: int = 0,
    max_imbalance: float | None = None,
) -> Router:
    """One expert per distinct expert key in the train split, holding that split's texts.

    With `kmeans_experts=n`, labels are ignored and the train vectors are cut into n experts by
    FAISS k-means (learned sharding): experts shard_00 .. shard_{n-1}; with `max_imbalance`, by
    k-means with a size cap (no shard above max_imbalance x the mean size). A VectorDataset has no
    labels, so it needs `kmeans_experts`; its router has no embedder and is queried with vectors.
    """
    if isinstance(dataset, VectorDataset):
        if not kmeans_experts:
            raise ValueError(
                f"dataset {dataset.name!r} is vectors without labels: set partition=N to cut it into N k-means experts"
            )
        router = Router(dataset.dim, metric)
        vectors = router.prepare(dataset.vectors["train"])[0]
        train, texts, meta = None, None, None
    else:
        if embedder is None:
            raise ValueError(f"dataset {dataset.name!r} is texts: it needs an embedder")
        router = Router(embedder.dim, metric, embedder=embedder)
        train = dataset.split("train")
        texts = [r.text for r in train]
        meta = dataset.metadata()  # BEIR documents: their _id and title, so every hit names its document
        vectors = embedder.encode(texts)
    if kmeans_experts:
        if max_imbalance is None:
            shards = kmeans_assign(vectors, kmeans_experts, metric, seed)
        else:
            shards = balanced_kmeans(vectors, kmeans_experts, metric, seed, max_imbalance=max_imbalance)
        keys = np.array([f"shard_{i:02d}" for i in shards])
        names = sorted(set(keys))
    else:
        keys = np.array([getattr(r, dataset.expert_key) for r in train])
        names = dataset.experts
    for name in names:
        rows = np.flatnonzero(keys == name)
        router.add_expert(
            name,
            vectors[rows],
            texts=None if texts is None else [texts[i] for i in rows],
            parent=None if kmeans_experts else dataset.parents.get(name),
            metadata=None if meta is None else [meta[i] for i in rows],
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

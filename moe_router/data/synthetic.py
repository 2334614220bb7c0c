"""A seeded, clustered synthetic collection: for learned sharding without labels, and for speed at scale.

Each latent source owns S sub-clusters ("slots") around its own direction. Most are private to it;
`shared` of them sit between two sources' directions and hold points of both, so a query near one
has its exact neighbours split across two sources: searching one shard misses some of them and
searching the right two finds them all (the case top-2 routing is for).

Dimension legend: n vectors, d dim, E sources (latent groups), S slots per source, C sub-cluster centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_router.data.datasets import VectorDataset
from moe_router.vectors import normalize_rows


@dataclass(frozen=True)
class ClusterLayout:
    """Where each expert's sub-clusters sit."""

    centres: np.ndarray  # (C, d) unit sub-cluster centres
    slots: np.ndarray  # (E, S) centre index of each expert's slots


def cluster_layout(
    d: int, experts: int, seed: int, slots: int = 64, shared: int = 16, centre_noise: float = 1.0
) -> ClusterLayout:
    """Sub-cluster centres: `slots - shared` private per expert, `shared` shared with other experts.

    centre_noise: norm of the random offset of a centre from its expert direction (1.0 = 45 degrees).
    """
    if shared % 2 or not 0 <= shared <= slots:
        raise ValueError(f"shared must be even and between 0 and slots={slots}, got {shared}")
    if shared and experts < 2:
        raise ValueError("shared sub-clusters need at least 2 experts")
    rng = np.random.default_rng([seed, 0])
    directions = normalize_rows(rng.standard_normal((experts, d), dtype=np.float32))  # (E, d)

    def around(v: np.ndarray) -> np.ndarray:  # (m, d) unit directions -> (m, d) unit centres near them
        offset = rng.standard_normal(v.shape, dtype=np.float32) * (centre_noise / np.sqrt(d))
        return normalize_rows(v + offset)

    private = slots - shared
    own = around(np.repeat(directions, private, axis=0))  # (E * private, d)
    # Expert e is the first member of shared/2 shared clusters (partners e+1, e+2, ...) and the
    # second member of shared/2 others, so every expert has exactly `slots` slots.
    half = shared // 2
    first = np.repeat(np.arange(experts), half)  # (E * half,)
    second = (first + 1 + np.tile(np.arange(half), experts) % max(experts - 1, 1)) % experts
    both = around(normalize_rows(directions[first] + directions[second])) if half else np.empty((0, d), np.float32)
    centres = np.concatenate([own, both])  # (C, d)
    table = np.empty((experts, slots), dtype=np.int64)
    for e in range(experts):
        mine = np.flatnonzero(first == e) + len(own)
        theirs = np.flatnonzero(second == e) + len(own)
        table[e] = np.concatenate([np.arange(e * private, (e + 1) * private), mine, theirs])
    return ClusterLayout(centres, table)


def sample_points(
    layout: ClusterLayout, expert: int, slot: np.ndarray, rng: np.random.Generator, point_noise: float = 1.0
) -> np.ndarray:
    """(n, d) unit vectors of one expert, one around each given slot (n,) of that expert.

    point_noise: norm of a point's random offset from its centre (1.0 = 45 degrees).
    """
    centre = layout.centres[layout.slots[expert, slot]]  # (n, d)
    d = layout.centres.shape[1]
    return normalize_rows(centre + rng.standard_normal(centre.shape, dtype=np.float32) * (point_noise / np.sqrt(d)))


def held_out_queries(layout: ClusterLayout, nq: int, seed: int, perturb: float = 0.3) -> np.ndarray:
    """(nq, d) new points from the same clusters (never stored), each moved by a random offset of norm `perturb`."""
    rng = np.random.default_rng([seed, 2])
    experts, slots = layout.slots.shape
    which, slot = rng.integers(0, experts, size=nq), rng.integers(0, slots, size=nq)
    xq = np.empty((nq, layout.centres.shape[1]), dtype=np.float32)
    for e in np.unique(which):
        rows = np.flatnonzero(which == e)
        xq[rows] = sample_points(layout, e, slot[rows], rng)
    d = xq.shape[1]
    return normalize_rows(xq + rng.standard_normal(xq.shape, dtype=np.float32) * (perturb / np.sqrt(d)))


def synthetic_dataset(
    vectors: int = 200_000,
    dim: int = 384,
    sources: int = 16,
    seed: int = 0,
    val: int = 2_000,
    test: int = 2_000,
    name: str = "synthetic",
) -> VectorDataset:
    """Stored vectors (split 'train') from `sources` latent groups, plus held-out val and test queries.

    The sources are not labels: the experts of a checkpoint trained on this set are cut by k-means
    (`partition=N`), which is learned sharding. Every number is seeded, so a run is repeatable.
    """
    for key, value, low in (
        ("vectors", vectors, 2),
        ("dim", dim, 2),
        ("sources", sources, 2),
        ("val", val, 1),
        ("test", test, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"synthetic_dataset: {key} must be an integer >= {low}, got {value!r}")
    layout = cluster_layout(dim, sources, seed)
    slots = layout.slots.shape[1]
    parts = []
    for e, size in enumerate(np.diff(np.linspace(0, vectors, sources + 1).astype(np.int64))):
        parts.append(sample_points(layout, e, np.arange(size) % slots, np.random.default_rng([seed, 1, e])))
    queries = held_out_queries(layout, val + test, seed)
    return VectorDataset(name, {"train": np.concatenate(parts), "val": queries[:val], "test": queries[val:]})

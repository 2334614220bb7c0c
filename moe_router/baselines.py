"""Routers to compare the learned gate against, on the same experts (plain numpy + FAISS).

Each baseline maps prepared query vectors xq (n, d) to expert scores (n, E), higher is better.
`scans_everything` marks those whose cost grows with the corpus (they compare every vector).
Dimension legend: n queries, d dim, E experts, m prototypes per expert.
"""

from __future__ import annotations

import faiss
import numpy as np

from moe_router.router import Router


class RandomRouter:
    name = "random"
    scans_everything = False

    def __init__(self, router: Router, seed: int = 0) -> None:
        self.num_experts = router.num_experts
        self.seed = seed

    def scores(self, xq: np.ndarray) -> np.ndarray:
        return np.random.default_rng(self.seed).random((xq.shape[0], self.num_experts))


class CentroidRouter:
    """Cosine (or negative L2) to each expert's mean vector: what most 'expert routers' do."""

    name = "centroid"
    scans_everything = False

    def __init__(self, router: Router) -> None:
        self.metric = router.metric
        self.centroids = np.stack([e.centroid() for e in router.experts])  # (E, d)

    def scores(self, xq: np.ndarray) -> np.ndarray:
        if self.metric == "ip":
            return xq @ self.centroids.T
        return -((xq[:, None, :] - self.centroids[None]) ** 2).sum(-1)


class MultiPrototypeRouter:
    """k-means centroids inside each expert; an expert scores its best prototype (no training)."""

    scans_everything = False

    def __init__(self, router: Router, per_expert: int = 64, seed: int = 0) -> None:
        self.name = f"multi-prototype ({per_expert}/expert)"
        self.metric = router.metric
        protos, owner = [], []
        for i, e in enumerate(router.experts):
            xb = e.vectors()
            m = min(per_expert, len(xb))
            if m == len(xb):
                c = xb
            else:
                km = faiss.Kmeans(router.dim, m, niter=20, seed=seed + i, spherical=router.metric == "ip",
                                  min_points_per_centroid=1, max_points_per_centroid=100_000)
                km.train(xb)
                c = km.centroids
            protos.append(c)
            owner.append(np.full(len(c), i))
        self.prototypes = np.concatenate(protos).astype(np.float32)  # (E * m, d)
        self.owner = np.concatenate(owner)
        self.num_experts = router.num_experts

    def scores(self, xq: np.ndarray) -> np.ndarray:
        if self.metric == "ip":
            sim = xq @ self.prototypes.T
        else:
            sim = -((xq[:, None, :] - self.prototypes[None]) ** 2).sum(-1)
        out = np.full((xq.shape[0], self.num_experts), -np.inf, dtype=np.float32)
        np.maximum.at(out.T, self.owner, sim.T)
        return out


class SemanticRouterStyle:
    """Mean of the top-`top` similarities inside each expert (as semantic-router scores routes; scans everything)."""

    scans_everything = True

    def __init__(self, router: Router, top: int = 5) -> None:
        self.name = f"semantic-router style (top-{top} mean)"
        self.router = router
        self.top = top

    def scores(self, xq: np.ndarray) -> np.ndarray:
        out = np.empty((xq.shape[0], self.router.num_experts), dtype=np.float32)
        for i, e in enumerate(self.router.experts):
            D, _ = e.search(xq, min(self.top, e.ntotal))
            out[:, i] = D.mean(axis=1) if self.router.metric == "ip" else -D.mean(axis=1)
        return out


class KnnVoteRouter:
    """Votes of the exact top-k neighbours over everything: the recall ceiling, at the price of a full scan."""

    scans_everything = True

    def __init__(self, router: Router, k: int = 10) -> None:
        self.name = f"kNN vote (k={k}, oracle ceiling)"
        self.router = router
        self.k = k
        self.tiebreak = CentroidRouter(router)
        self.index = faiss.IndexFlatIP(router.dim) if router.metric == "ip" else faiss.IndexFlatL2(router.dim)
        owner = []
        for i, e in enumerate(router.experts):
            self.index.add(e.vectors())
            owner.append(np.full(e.ntotal, i))
        self.owner = np.concatenate(owner)

    def scores(self, xq: np.ndarray) -> np.ndarray:
        _, rows = self.index.search(xq, self.k)
        votes = np.zeros((xq.shape[0], self.router.num_experts), dtype=np.float32)
        np.add.at(votes, (np.repeat(np.arange(len(rows)), rows.shape[1]), self.owner[rows].ravel()), 1.0)
        c = self.tiebreak.scores(xq)
        return votes + 1e-3 * (c - c.min()) / (np.ptp(c) + 1e-12)  # ties go to the closer centroid


def ivf_recall(router: Router, xq: np.ndarray, exact_ids: np.ndarray, probes: list[int], k: int = 10,
               seed: int = 0) -> dict[int, tuple[float, float]]:
    """FAISS IVF-Flat with its own k-means partition into E lists: {nprobe: (recall@k, share scanned)}.

    The standard learning-free sharding: same number of shards as experts, same number searched.
    """
    from moe_router.metrics import recall_at_k

    xb = np.concatenate([e.vectors() for e in router.experts])
    ids = np.concatenate([e.ids for e in router.experts])
    E = router.num_experts
    metric = faiss.METRIC_INNER_PRODUCT if router.metric == "ip" else faiss.METRIC_L2
    quantizer = faiss.IndexFlatIP(router.dim) if router.metric == "ip" else faiss.IndexFlatL2(router.dim)
    ivf = faiss.IndexIVFFlat(quantizer, router.dim, E, metric)
    ivf.cp.seed = seed
    ivf.train(xb)
    ivf.add(xb)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(E)])
    out = {}
    for t in probes:
        if t > E:
            continue
        ivf.nprobe = t
        _, rows = ivf.search(xq, k)
        _, lists = quantizer.search(xq, t)
        out[t] = (recall_at_k(np.where(rows >= 0, ids[np.maximum(rows, 0)], -1), exact_ids),
                  float(sizes[lists].sum(axis=1).mean() / len(xb)))
    return out

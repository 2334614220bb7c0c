"""The routers the gate is compared with (none trained): random, centroid, multi-prototype, ..."""

from __future__ import annotations


import faiss
import numpy as np

from moe_router.index.clustering import kmeans_centroids
from moe_router.index.exact import exact_neighbours, stacked
from moe_router.index.expert import centroids
from moe_router.metrics import recall_at_k
from moe_router.routing.router import Router
from moe_router.vectors import flat_index, similarity


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
        self.centroids = centroids(router.experts)  # (E, d)

    def scores(self, xq: np.ndarray) -> np.ndarray:
        return similarity(xq, self.centroids, self.metric)


class MultiPrototypeRouter:
    """k-means centroids inside each expert; an expert scores its best prototype (no training)."""

    scans_everything = False

    def __init__(self, router: Router, per_expert: int = 64, seed: int = 0) -> None:
        self.name = f"multi-prototype ({per_expert}/expert)"
        self.metric = router.metric
        protos = [kmeans_centroids(e.vectors(), per_expert, router.metric, seed + i, max_points_per_centroid=100_000)
                  for i, e in enumerate(router.experts)]
        owner = [np.full(len(c), i) for i, c in enumerate(protos)]
        self.prototypes = np.concatenate(protos).astype(np.float32)  # (E * m, d)
        self.owner = np.concatenate(owner)
        self.num_experts = router.num_experts

    def scores(self, xq: np.ndarray) -> np.ndarray:
        sim = similarity(xq, self.prototypes, self.metric)
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
        self.xb, _, self.owner = stacked(router.experts)

    def scores(self, xq: np.ndarray) -> np.ndarray:
        rows = exact_neighbours(xq, self.xb, self.k, self.router.metric)
        votes = np.zeros((xq.shape[0], self.router.num_experts), dtype=np.float32)
        np.add.at(votes, (np.repeat(np.arange(len(rows)), rows.shape[1]), self.owner[rows].ravel()), 1.0)
        c = self.tiebreak.scores(xq)
        return votes + 1e-3 * (c - c.min()) / (np.ptp(c) + 1e-12)  # ties go to the closer centroid


def ivf_recall(router: Router, xq: np.ndarray, exact_ids: np.ndarray, probes: list[int], k: int = 10,
               seed: int = 0) -> dict[int, tuple[float, float]]:
    """FAISS IVF-Flat with its own k-means partition into E lists: {nprobe: (recall@k, share scanned)}.

    The standard learning-free sharding: same number of shards as experts, same number searched.
    """
    xb, ids, _ = stacked(router.experts)
    E = router.num_experts
    metric = faiss.METRIC_INNER_PRODUCT if router.metric == "ip" else faiss.METRIC_L2
    quantizer = flat_index(router.dim, router.metric)
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


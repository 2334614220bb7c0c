"""The routers the gate is compared with: random, centroid, multi-prototype, semantic-router style, kNN vote,
RAGRoute style (a small trained relevance classifier), ReDDE style (sample-based resource selection) and a
logistic regression (a linear softmax head on the embeddings: what a user tries first).

Dimension legend: n queries, E experts, d dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch
from torch import nn

from moe_router.gate.confidence import fit_bias_temperature, fit_temperature
from moe_router.gate.linear import L2_GRID, fit_linear, training_rows
from moe_router.index.clustering import kmeans_centroids
from moe_router.index.exact import exact_neighbours, stacked
from moe_router.index.expert import centroids, labelled_sample
from moe_router.metrics import overlap_at_k
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
        protos = [
            kmeans_centroids(e.vectors(), per_expert, router.metric, seed + i, max_points_per_centroid=100_000)
            for i, e in enumerate(router.experts)
        ]
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


class RagRouteStyle:
    """A per-source relevance classifier on [query embedding; source centroid] (as RAGRoute routes, Guerraoui et al.).

    A small MLP scores every (query, source) pair; it is trained with binary cross-entropy for
    `steps` Adam steps on labelled queries (x (m, d), gold (m,) expert index; default: the stored
    vectors as pseudo-queries of their expert): the gold source is relevant, the others not.
    """

    scans_everything = False

    def __init__(
        self,
        router: Router,
        xq: np.ndarray | None = None,
        gold: np.ndarray | None = None,
        hidden: int = 128,
        steps: int = 500,
        batch_size: int = 256,
        lr: float = 1e-3,
        per_expert: int = 1000,
        seed: int = 0,
    ) -> None:
        if xq is None or gold is None:  # no labelled queries: the stored vectors as pseudo-queries of their expert
            xq, gold = labelled_sample(router.experts, per_expert, seed)
        if len(xq) != len(gold) or not len(xq):
            raise ValueError(
                f"RAGRoute-style baseline needs labelled queries: got {len(xq)} vectors and {len(gold)} labels"
            )
        self.name = "RAGRoute style (relevance MLP)"
        self.num_experts = router.num_experts
        self.centroids = torch.from_numpy(centroids(router.experts).astype(np.float32))  # (E, d)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        d = router.dim
        self.net = nn.Sequential(nn.Linear(2 * d, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        x = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32))  # (m, d)
        y = torch.zeros(len(gold), self.num_experts)
        keep = torch.from_numpy(gold >= 0)
        y[torch.arange(len(gold))[keep], torch.from_numpy(gold)[keep]] = 1.0  # (m, E) one-hot relevance
        x, y = x[keep], y[keep]
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        # relevant pairs are 1 in E: weight them up so the classifier does not learn "never relevant"
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(self.num_experts - 1)))
        self.net.train()
        done = 0
        while done < steps:  # a fixed number of optimiser steps: a small query log still gets trained
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                loss = loss_fn(self._logits(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break
        self.net.eval()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        b, (E, d) = len(x), self.centroids.shape
        pairs = torch.cat([x[:, None, :].expand(b, E, d), self.centroids[None].expand(b, E, d)], dim=-1)  # (b, E, 2d)
        return self.net(pairs).squeeze(-1)  # (b, E)

    def scores(self, xq: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32))
            return (
                torch.cat([self._logits(b) for b in x.split(4096)]).numpy()
                if len(x)
                else np.empty((0, self.num_experts), np.float32)
            )


class ReddeStyle:
    """Sample-based resource selection in the spirit of ReDDE (Si & Callan 2003).

    A seeded uniform sample of up to `sample` vectors of each expert forms one central index; a
    query's top `top` hits in it vote for their expert, each vote weighted by how many stored vectors
    its sample row stands for (expert size / sample size). Searching the sample scans only
    E x sample vectors, not everything.
    """

    scans_everything = False

    def __init__(self, router: Router, sample: int = 300, top: int = 50, seed: int = 0) -> None:
        self.name = f"ReDDE style ({sample}-vector sample/expert)"
        self.metric = router.metric
        self.num_experts = router.num_experts
        rng = np.random.default_rng(seed)
        rows, owner, weight = [], [], []
        for i, e in enumerate(router.experts):
            m = min(sample, e.ntotal)
            pick = np.sort(rng.choice(e.ntotal, size=m, replace=False))
            rows.append(e.vectors()[pick])
            owner.append(np.full(m, i))
            weight.append(np.full(m, e.ntotal / m))
        self.owner, self.weight = np.concatenate(owner), np.concatenate(weight)
        self.index = flat_index(router.dim, router.metric)
        self.index.add(np.ascontiguousarray(np.concatenate(rows), dtype=np.float32))
        self.top = min(top, self.index.ntotal)
        self.scanned = self.index.ntotal  # vectors compared per query to choose the experts
        self.tiebreak = CentroidRouter(router)

    def scores(self, xq: np.ndarray) -> np.ndarray:
        _, rows = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), self.top)  # (n, top)
        votes = np.zeros((len(xq), self.num_experts), dtype=np.float64)
        np.add.at(
            votes, (np.repeat(np.arange(len(xq)), rows.shape[1]), self.owner[rows].ravel()), self.weight[rows].ravel()
        )
        votes /= votes.sum(axis=1, keepdims=True)  # estimated share of the query's relevant documents per expert
        c = self.tiebreak.scores(xq)
        return (votes + 1e-3 * (c - c.min()) / (np.ptp(c) + 1e-12)).astype(np.float32)  # ties go to the closer centroid


class LogisticRegressionRouter:
    """Multinomial logistic regression on the router's (normalised) embeddings, with its own calibration.

    Trained like the gate: on the stored vectors labelled with their expert (a seeded sample of up
    to `per_expert` each) and, when given, labelled queries (xq (m, d), gold (m,)) that take
    `query_weight` of the loss (the gate's targets.query_weight). The L2 strength is chosen from
    `l2_grid` by `folds`-fold cross-validation on that training data only (held-out weighted
    accuracy; ties go to the stronger penalty), then the model is refitted on all of it. With
    `calib` = (x, gold), the validation queries the gate is calibrated on, the temperature (with
    `bias`, together with one logit offset per expert, as the gate's prior correction) is fitted
    by NLL with the gate's own code (gate.confidence). scores() are the calibrated logits.
    """

    name = "logistic regression (linear softmax)"
    scans_everything = False

    def __init__(
        self,
        router: Router,
        xq: np.ndarray | None = None,
        gold: np.ndarray | None = None,
        calib: tuple[np.ndarray, np.ndarray] | None = None,
        bias: bool = False,
        query_weight: float = 0.5,
        l2_grid: Sequence[float] = L2_GRID,
        folds: int = 3,
        per_expert: int = 5000,
        max_iter: int = 200,
        seed: int = 0,
    ) -> None:
        self.dim, self.num_experts = router.dim, router.num_experts
        if not self.num_experts or not router.ntotal:
            raise ValueError("logistic regression needs stored vectors to train on; the router has none")
        queries = None
        if xq is not None and gold is not None:
            xq = self._check(xq, "training queries")
            gold = np.asarray(gold, dtype=np.int64)
            if len(gold) != len(xq) or (gold >= self.num_experts).any():
                raise ValueError(
                    f"logistic regression needs one gold expert in [0, {self.num_experts}) per training query "
                    f"(-1 = unknown): got {len(xq)} queries and {len(gold)} labels, max {gold.max(initial=-1)}"
                )
            queries = (xq, gold)
        rows = training_rows(labelled_sample(router.experts, per_expert, seed), queries, query_weight)
        self.fit = fit_linear(*rows, self.num_experts, l2_grid, folds, max_iter, seed)
        self.l2, self.cv_accuracy = self.fit.l2, self.fit.cv_accuracy
        self.temperature, self.offsets = 1.0, np.zeros(self.num_experts)
        if calib is not None and (np.asarray(calib[1]) >= 0).any():
            logits, cgold = self._logits(self._check(calib[0], "calibration queries")), np.asarray(calib[1])
            if bias:
                self.offsets, self.temperature = fit_bias_temperature(logits, cgold)
            else:
                self.temperature = fit_temperature(logits, cgold, low=1e-3, high=1e3)
        self.facts = {"l2": self.l2, "own_temperature": self.temperature, "cv_acc@1": self.cv_accuracy[self.l2]}

    def _check(self, xq: np.ndarray, what: str) -> np.ndarray:
        xq = np.asarray(xq)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"logistic regression {what}: expected an (n, {self.dim}) array, got shape {xq.shape}")
        return xq

    def _logits(self, xq: np.ndarray) -> np.ndarray:
        return self.fit.logits(xq)  # (n, E)

    def scores(self, xq: np.ndarray) -> np.ndarray:
        """(n, E) calibrated logits: softmax of them is the calibrated probability of each expert."""
        return (self._logits(self._check(xq, "queries")) / self.temperature + self.offsets).astype(np.float32)


def ivf_recall(
    router: Router, xq: np.ndarray, exact_ids: np.ndarray, probes: list[int], k: int = 10, seed: int = 0
) -> dict[int, tuple[float, float]]:
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
        out[t] = (
            overlap_at_k(np.where(rows >= 0, ids[np.maximum(rows, 0)], -1), exact_ids),
            float(sizes[lists].sum(axis=1).mean() / len(xb)),
        )
    return out


GATE = "gate (ours)"  # the row of the router under evaluation, beside the baselines'

BASELINES = {
    "random": RandomRouter,
    "centroid": CentroidRouter,
    "multi_prototype": MultiPrototypeRouter,
    "semantic_router": SemanticRouterStyle,
    "knn_vote": KnnVoteRouter,
    "ragroute": RagRouteStyle,
    "redde": ReddeStyle,
    "logreg": LogisticRegressionRouter,
}

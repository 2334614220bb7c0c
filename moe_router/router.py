"""The router: a gate over named experts; routes queries and searches only the chosen experts.

Dimension legend: nq queries, d vector dim, E experts, t experts searched per query, k hits.
Plain PyTorch + FAISS + numpy: no Lightning, no Hydra.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moe_router.embedders import Embedder
from moe_router.experts import (
    Expert, MetadataStore, lower_blas_threshold, payloads_or_none, search_each, worst_score,
)
from moe_router.gate import Gate
from moe_router.vectors import check_metric, prepare


@dataclass(frozen=True)
class ExpertScore:
    """One expert chosen for a query."""

    expert: str
    probability: float  # gate softmax probability over all experts: the routing confidence
    weight: float  # probability renormalised over the experts chosen for this query
    specialization: str = ""
    parent: str | None = None


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    score: float  # inner product (metric 'ip', higher is closer) or squared L2 distance ('l2', lower is closer)
    expert: str
    specialization: str
    parent: str | None
    routing_score: float  # the gate's probability for this hit's expert
    text: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RoutedSearch:
    """Array form of a routed search; -1 in I and E where fewer than k vectors were reachable."""

    D: np.ndarray  # (nq, k) scores, best first
    I: np.ndarray  # (nq, k) global ids
    E: np.ndarray  # (nq, k) index of the expert holding each hit
    scanned: np.ndarray  # (nq,) vectors compared per query


@dataclass(frozen=True)
class ExpertStats:
    name: str
    specialization: str
    parent: str | None
    vectors: int
    queries: int  # queries routed to this expert (among each query's chosen experts)
    load_share: float  # share of all (query, expert) assignments
    mean_confidence: float  # mean gate probability when chosen (0.0 if never chosen)


class Router:
    """Experts (FAISS flat indexes) + a gate that picks which of them to search.

    Vectors are L2-normalised on the way in when the metric is 'ip' (cosine similarity).
    """

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        embedder: Embedder | None = None,
        gate: Gate | None = None,
        store: MetadataStore | None = None,
    ) -> None:
        if int(dim) <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        self.dim = int(dim)
        self.metric = check_metric(metric)
        if embedder is not None and embedder.dim != self.dim:
            raise ValueError(f"embedder {embedder.name!r} gives {embedder.dim}-d vectors, but the router's dim is {self.dim}")
        self.embedder = embedder
        self.gate = gate
        self.store = store if store is not None else MetadataStore()
        self.experts: list[Expert] = []
        self.manifest: dict[str, Any] = {}  # set by Router.load
        # Top-1 probability under which route/search(abstain=True) answer "no expert is confident".
        self.abstain_threshold: float | None = None
        self._next_id = self.store.max_id() + 1
        self._lock = threading.RLock()
        self._query_counts = np.zeros(0, dtype=np.int64)  # (E,)
        self._confidence_sums = np.zeros(0, dtype=np.float64)  # (E,)

    # ---------------------------------------------------------------- experts

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def ntotal(self) -> int:
        return sum(e.ntotal for e in self.experts)

    def expert_index(self, name: str) -> int:
        for i, e in enumerate(self.experts):
            if e.name == name:
                return i
        raise KeyError(f"unknown expert {name!r}; known experts: {self.expert_names}")

    def expert(self, name: str) -> Expert:
        return self.experts[self.expert_index(name)]

    def add_expert(
        self,
        name: str,
        vectors: Any = None,
        texts: Sequence[str] | None = None,
        specialization: str = "",
        parent: str | None = None,
        metadata: Sequence[dict] | None = None,
        fit_row: bool = True,
    ) -> Expert:
        """Add an expert from vectors and/or texts (texts are embedded when no vectors are given).

        With a gate present, the gate grows an output for it at once. With `fit_row` (default) that
        output is fitted against the other experts (lifecycle.fit_expert_rows): the new expert takes
        its own queries without drawing the others'; if the fit fails the expert is removed again.
        `fit_row=False` only points the new row at its vectors' mean feature (Gate.add_expert), which
        can draw many of the other experts' queries until the gate is fine-tuned.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"expert name must be a non-empty string, got {name!r}")
        if name in self.expert_names:
            raise ValueError(f"an expert named {name!r} already exists; expert names must be unique")
        xb = self.vectors_from(texts, vectors, f"expert {name!r}")
        payloads = payloads_or_none(metadata, xb.shape[0])
        with self._lock:
            ids = np.arange(self._next_id, self._next_id + xb.shape[0], dtype=np.int64)
            expert = Expert(name, self.dim, self.metric, specialization or name, parent)
            expert.add(xb, ids)
            self.store.add(ids, name, list(texts) if texts is not None else [None] * len(ids), payloads)
            self._next_id += len(ids)
            self.experts.append(expert)
            self._query_counts = np.append(self._query_counts, 0)
            self._confidence_sums = np.append(self._confidence_sums, 0.0)
            if self.gate is not None:
                m = self.gate.prototypes_per_expert
                protos = torch.from_numpy(expert.prototypes(m)) if m else None
                self.gate.add_expert(torch.from_numpy(xb), prototypes=protos)
        if fit_row and self.gate is not None and self.num_experts > 1:
            from moe_router import lifecycle

            try:
                lifecycle.fit_expert_rows(self, [name])
            except BaseException:
                self.remove_expert(name)
                raise
        return expert

    def vectors_from(self, texts: Sequence[str] | None, vectors: Any, what: str) -> np.ndarray:
        """Prepared (n, d) vectors: `vectors` if given, else `texts` embedded; one text per vector when both."""
        if vectors is None:
            if texts is None:
                raise ValueError(f"{what}: give vectors or texts; it has no vectors")
            if self.embedder is None:
                raise ValueError(f"{what}: texts given but the router has no embedder; pass vectors instead")
            vectors = self.embedder.encode(list(texts))
        xb = prepare(vectors, self.dim, self.metric, what=f"vectors for {what}")
        if texts is not None and len(texts) != xb.shape[0]:
            raise ValueError(f"{what}: {xb.shape[0]} vectors but {len(texts)} texts; expected one text per vector")
        return xb

    def remove_expert(self, name: str) -> None:
        """Remove an expert: its index, its gate output and its metadata; routing renormalises over the rest."""
        with self._lock:
            i = self.expert_index(name)
            if self.gate is not None:
                self.gate.remove_expert(i)
            del self.experts[i]
            self._query_counts = np.delete(self._query_counts, i)
            self._confidence_sums = np.delete(self._confidence_sums, i)
            self.store.delete_expert(name)

    def record_feedback(self, query: Any, expert: str, positive: bool) -> int:
        """Durably record whether `expert` served `query` (text or vector) well; returns the record's id."""
        self.expert_index(expert)  # unknown expert -> KeyError naming the known ones
        text = query if isinstance(query, str) else None
        xq, single = self.prepare_queries(query)
        if not single:
            raise ValueError("record_feedback takes one query, got a batch")
        return self.store.add_feedback(text, xq[0], expert, bool(positive))

    # ---------------------------------------------------------------- gate

    def init_gate(self, **gate_kwargs: Any) -> Gate:
        """A fresh gate for the current experts, its head pointed at their centroids (trainable)."""
        if not self.experts:
            raise ValueError("the router has no experts yet; add experts before building a gate")
        gate = Gate(self.dim, self.num_experts, **gate_kwargs)
        if not gate.prototypes_per_expert:
            gate.init_head_from_centroids(torch.from_numpy(np.stack([e.centroid() for e in self.experts])))
        self.install_gate(gate)
        return gate

    def install_gate(self, gate: Gate, seed: int = 0) -> Gate:
        """Use `gate` for routing; a prototype gate gets k-means prototypes of each expert's vectors first."""
        if gate.dim != self.dim or gate.num_experts != self.num_experts:
            raise ValueError(f"the gate has dim {gate.dim} and {gate.num_experts} outputs; "
                             f"the router needs dim {self.dim} and {self.num_experts}")
        if gate.prototypes_per_expert:
            m = gate.prototypes_per_expert
            gate.init_prototypes([torch.from_numpy(e.prototypes(m, seed + i)) for i, e in enumerate(self.experts)])
        self.gate = gate.eval()
        return gate

    def _require_gate(self) -> Gate:
        if self.gate is None:
            raise RuntimeError("the router has no gate; call router.init_gate() or train one (moe_router.training)")
        if self.gate.num_experts != self.num_experts:
            raise RuntimeError(f"the gate has {self.gate.num_experts} outputs but the router has {self.num_experts} experts")
        return self.gate

    def gate_probs(self, xq: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Gate probabilities (nq, E) for prepared query vectors (at the gate's temperature)."""
        return self._gate_pass(xq, batch_size, "probs")

    def gate_logits(self, xq: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Raw gate logits (nq, E) for prepared query vectors."""
        return self._gate_pass(xq, batch_size, "logits")

    def in_scope_scores(self, xq: np.ndarray) -> np.ndarray:
        """(nq,) the gate's in-scope score per prepared query (see Gate.in_scope_score); abstention thresholds it."""
        gate = self._require_gate()
        gate.eval()
        with torch.inference_mode():
            return gate.in_scope_score(torch.from_numpy(xq).to(gate.head.weight.device)).float().cpu().numpy()

    def _gate_pass(self, xq: np.ndarray, batch_size: int, field: str) -> np.ndarray:
        gate = self._require_gate()
        gate.eval()
        device = gate.head.weight.device
        out = []
        with torch.inference_mode():
            for start in range(0, xq.shape[0], batch_size):
                x = torch.from_numpy(xq[start : start + batch_size]).to(device)
                out.append(getattr(gate(x, top_k=1), field).float().cpu().numpy())
        return np.concatenate(out)

    # ---------------------------------------------------------------- queries

    def prepare_queries(self, queries: Any) -> tuple[np.ndarray, bool]:
        """Texts or vectors, one or a batch -> (xq (nq, d) prepared, whether a single query was given)."""
        if isinstance(queries, str) or (
            isinstance(queries, (list, tuple)) and queries and all(isinstance(q, str) for q in queries)
        ):
            single = isinstance(queries, str)
            texts = [queries] if single else list(queries)
            if self.embedder is None:
                raise ValueError("text queries need an embedder, and this router has none; pass query vectors instead")
            vectors = self.embedder.encode(texts)
        else:
            if isinstance(queries, (list, tuple)) and len(queries) == 0:
                raise ValueError("queries: empty batch (0 queries); expected at least one")
            vectors = queries
            single = np.ndim(queries) == 1
        return prepare(vectors, self.dim, self.metric, what="query vectors"), single

    def _check_top(self, top: int, what: str) -> int:
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)):
            raise ValueError(f"{what} must be an integer, got {top!r}")
        if not 1 <= top <= self.num_experts:
            raise ValueError(f"{what} must be between 1 and {self.num_experts} (the number of experts), got {top}")
        return int(top)

    def decide(self, xq: np.ndarray, top_k: int, record: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(probs (nq, E), top (nq, t) expert indices best first); counts them in stats when `record`."""
        top_k = self._check_top(top_k, "top_k")
        probs = self.gate_probs(xq)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]  # (nq, t)
        if record:
            chosen = np.take_along_axis(probs, top, axis=1)
            with self._lock:
                np.add.at(self._query_counts, top.ravel(), 1)
                np.add.at(self._confidence_sums, top.ravel(), chosen.ravel())
        return probs, top

    def route(
        self, queries: Any, top_k: int = 2, abstain: bool = False
    ) -> list[ExpertScore] | list[list[ExpertScore]]:
        """The top_k experts for each query with their probabilities (a list per query; one list for one query).

        With `abstain=True` and a calibrated `abstain_threshold`, a query whose in-scope score
        (Gate.in_scope_score) is under the threshold gets an empty list: "no expert is confident".
        """
        xq, single = self.prepare_queries(queries)
        probs, top = self.decide(xq, top_k)
        refused = self._refused(xq, abstain)
        out = []
        for p, row, no in zip(probs, top, refused):
            if no:
                out.append([])
                continue
            chosen = p[row]
            total = float(chosen.sum())
            out.append(
                [
                    ExpertScore(
                        self.experts[e].name, float(p[e]), float(p[e]) / total if total > 0 else 0.0,
                        self.experts[e].specialization, self.experts[e].parent,
                    )
                    for e in row
                ]
            )
        return out[0] if single else out

    # ---------------------------------------------------------------- search

    def search_experts(self, xq: np.ndarray, k: int, experts: np.ndarray, merge: bool = True) -> RoutedSearch:
        """Search, for each query, only the experts in its row of `experts` (nq, t); merge by score.

        Queries are grouped by expert: one FAISS call per expert per batch, the calls side by side
        on the cores (experts.search_each). With `merge=False` the result keeps every expert's own
        top k: (nq, t * k) arrays, expert by expert in the order of `experts`, each best first.
        """
        nq, t = experts.shape
        D = np.full((nq, t * k), worst_score(self.metric), dtype=np.float32)
        I = np.full((nq, t * k), -1, dtype=np.int64)
        E = np.full((nq, t * k), -1, dtype=np.int64)
        scanned = np.zeros(nq, dtype=np.int64)
        lower_blas_threshold()
        groups = [(e, *np.nonzero(experts == e)) for e in np.unique(experts)]  # (expert, rows, slot)
        found = search_each([(self.experts[e], xq[rows]) for e, rows, _ in groups], k)
        for (e, rows, slot), (De, Ie) in zip(groups, found):  # rows: queries that chose e; slot: in which position
            cols = slot[:, None] * k + np.arange(k)[None, :]  # (m, k)
            D[rows[:, None], cols] = De
            I[rows[:, None], cols] = Ie
            E[rows[:, None], cols] = np.where(Ie >= 0, e, -1)
            scanned[rows] += self.experts[e].ntotal
        if not merge:
            return RoutedSearch(D, I, E, scanned)
        order = np.argsort(-D if self.metric == "ip" else D, axis=1, kind="stable")[:, :k]  # (nq, k)
        return RoutedSearch(
            np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1), np.take_along_axis(E, order, 1), scanned
        )

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be an integer, got {k!r}")
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be between 1 and {self.ntotal} (the number of stored vectors), got {k}")
        return int(k)

    def _refused(self, xq: np.ndarray, abstain: bool) -> np.ndarray:
        """(nq,) True where the router abstains (in-scope score under the threshold)."""
        if not abstain:
            return np.zeros(len(xq), dtype=bool)
        if self.abstain_threshold is None:
            raise ValueError("abstain=True needs a calibrated abstain_threshold (set by training on data with "
                             "out-of-scope validation queries, or assign router.abstain_threshold)")
        return self.in_scope_scores(xq) < self.abstain_threshold

    def search(
        self, queries: Any, k: int = 10, top_experts: int = 2, with_text: bool = True, abstain: bool = False,
        per_expert: bool = False,
    ) -> list[Hit] | list[list[Hit]]:
        """Route each query, search only its top_experts experts, return its k best hits merged by score.

        With `per_expert=True`, each searched expert contributes its own k best instead (up to
        k x top_experts hits, grouped by expert, the most probable expert first; the tutorial's
        routeQuery(query, kPerExpert, topExperts)). With `abstain=True`, queries the router is not
        confident about get no hits (see route).
        """
        k = self._check_k(k)
        top_experts = self._check_top(top_experts, "top_experts")
        xq, single = self.prepare_queries(queries)
        probs, top = self.decide(xq, top_experts)
        refused = self._refused(xq, abstain)
        res = self.search_experts(xq, k, top, merge=not per_expert)
        out = self.hits(res, probs, with_text, refused)
        return out[0] if single else out

    def hits(self, res: RoutedSearch, probs: np.ndarray, with_text: bool = True,
             refused: np.ndarray | None = None) -> list[list[Hit]]:
        """Per query, the Hit of each found row of a routed search (skipping padding and refused queries)."""
        meta = self.store.get(res.I[res.I >= 0].tolist()) if with_text else {}
        out = []
        for q in range(res.I.shape[0]):
            row = []
            for score, i, e in zip(res.D[q], res.I[q], res.E[q]):
                if i < 0 or (refused is not None and refused[q]):
                    continue
                ex = self.experts[e]
                text, payload = meta.get(int(i), (None, {}))
                row.append(Hit(int(i), float(score), ex.name, ex.specialization, ex.parent, float(probs[q, e]), text, payload))
            out.append(row)
        return out

    # ---------------------------------------------------------------- stats

    def stats(self) -> list[ExpertStats]:
        """Per expert: vectors stored, queries routed to it, load share and mean confidence."""
        with self._lock:
            counts = self._query_counts.copy()
            sums = self._confidence_sums.copy()
        total = max(int(counts.sum()), 1)
        return [
            ExpertStats(
                e.name, e.specialization, e.parent, e.ntotal, int(c), float(c / total), float(s / c) if c else 0.0
            )
            for e, c, s in zip(self.experts, counts, sums)
        ]

    def reset_stats(self) -> None:
        with self._lock:
            self._query_counts[:] = 0
            self._confidence_sums[:] = 0.0

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | Path, config: dict | None = None, metrics: dict | None = None) -> Path:
        """Write the router as a checkpoint directory, atomically (see moe_router.checkpoint)."""
        from moe_router.checkpoint import save_router

        return save_router(self, Path(path), config=config, metrics=metrics)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, cache_dir: str | Path | None = None) -> "Router":
        """Load a checkpoint directory; never unpickles or imports code from it."""
        from moe_router.checkpoint import load_router

        return load_router(Path(path), verify=verify, cache_dir=cache_dir)

    def __repr__(self) -> str:
        return f"Router(dim={self.dim}, metric={self.metric!r}, experts={self.num_experts}, vectors={self.ntotal})"

    # ---------------------------------------------------------------- lifecycle (moe_router.lifecycle)

    def merge_experts(self, a: str, b: str, name: str | None = None, specialization: str | None = None,
                      parent: Any = ...) -> Expert:
        """Merge experts a and b into one (see lifecycle.merge_experts); follow with adaptation.fine_tune."""
        from moe_router import lifecycle

        return lifecycle.merge_experts(self, a, b, name, specialization, parent)

    def split_expert(self, name: str, parts: int = 2, names: Sequence[str] | None = None, seed: int = 0,
                     max_imbalance: float | None = None) -> list[Expert]:
        """Split an expert into `parts` by k-means over its vectors (see lifecycle.split_expert)."""
        from moe_router import lifecycle

        return lifecycle.split_expert(self, name, parts, names, seed, max_imbalance)

    def auto_create_experts(self, texts: Sequence[str] | None = None, vectors: Any = None,
                            categories: Sequence[str] | None = None, n: int | None = None, min_docs: int = 5,
                            max_imbalance: float = 1.5, seed: int = 0, **kwargs: Any):
        """Experts from a corpus: one per category (>= min_docs documents), or `n` by balanced k-means."""
        from moe_router import lifecycle

        if (categories is None) == (n is None):
            raise ValueError("auto_create_experts: give either categories (one per document) or n (clusters), not both")
        if categories is not None:
            return lifecycle.auto_create_by_category(self, categories, texts, vectors, min_docs=min_docs, **kwargs)
        return lifecycle.auto_create_by_clustering(self, n, texts, vectors, max_imbalance=max_imbalance, seed=seed, **kwargs)

    def set_parent(self, expert: str, parent: str | None) -> None:
        from moe_router import lifecycle

        lifecycle.set_parent(self, expert, parent)

    def route_two_level(self, queries: Any, top_parents: int = 1, top_children: int = 2):
        """Route to parent groups first, then to their children (see lifecycle.route_two_level)."""
        from moe_router import lifecycle

        return lifecycle.route_two_level(self, queries, top_parents, top_children)

    def search_two_level(self, queries: Any, k: int = 10, top_parents: int = 1, top_children: int = 2,
                         with_text: bool = True) -> list[Hit] | list[list[Hit]]:
        from moe_router import lifecycle

        return lifecycle.search_two_level(self, queries, k, top_parents, top_children, with_text)

    def feedback_stats(self):
        from moe_router import lifecycle

        return lifecycle.feedback_stats(self)

    def recommendations(self, rules: Any = None):
        """Retrain/merge/split recommendations from feedback (see lifecycle.RecommendationRules)."""
        from moe_router import lifecycle

        return lifecycle.recommendations(self, rules or lifecycle.RecommendationRules())

    def load_report(self, queries: Any = None, top_k: int = 2, over: float = 1.5, under: float = 0.5):
        from moe_router import lifecycle

        return lifecycle.load_report(self, queries, top_k, over, under)

    def optimize_routing(self, val_queries: Any, **kwargs: Any):
        """Measured, keep-only-if-better rebalance / merge / split (see lifecycle.optimize_routing)."""
        from moe_router import lifecycle

        return lifecycle.optimize_routing(self, val_queries, **kwargs)

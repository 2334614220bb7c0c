"""The router: a gate over named experts; routes queries and searches only the chosen experts.

Dimension legend: nq queries, d vector dim, E experts, t experts searched per query, k hits.
Plain PyTorch + FAISS + numpy: no Lightning, no Hydra.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_router.checkpoint.format import CheckpointError, CheckpointParts
from moe_router.checkpoint.io import read_checkpoint, write_checkpoint
from moe_router.checks import check_int, check_new_name
from moe_router.embed.base import Embedder, check_text_list
from moe_router.gate.model import Gate, infer
from moe_router.gate.surgery import fitted_new_rows
from moe_router.index.expert import Expert, centroids, sample_vectors
from moe_router.index.parallel import lower_blas_threshold
from moe_router.metrics import top_p_experts
from moe_router.routing.backends import ExpertBackend, LocalBackend, make_backend
from moe_router.routing.stats import RoutingStats
from moe_router.store import MetadataStore, payloads_or_none
from moe_router.types import ExpertScore, ExpertStats, Hit, RoutedSearch, SearchHits
from moe_router.vectors import as_array, check_dim, check_metric, prepare, worst_score


def _check_top_p(top_p: Any) -> float:
    """A probability mass in (0, 1], else a ValueError naming top_p."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating)) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (the probability mass to cover), got {top_p!r}")
    return float(top_p)


def check_prior_weight(value: Any) -> float:
    """A merge prior weight: a finite number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not np.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"prior_weight must be a finite number >= 0 (0 = merge by score alone), got {value!r}")
    return float(value)


class Router:
    """Experts (FAISS flat indexes) + a gate that picks which of them to search.

    Vectors are L2-normalised on the way in when the metric is 'ip' (cosine similarity). The
    `backend` holds the experts' indexes and runs their searches (routing.backends): in this
    process by default, or in Ray actors (Router.load(path, backend="ray")).
    """

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        embedder: Embedder | None = None,
        gate: Gate | None = None,
        store: MetadataStore | None = None,
        backend: ExpertBackend | None = None,
    ) -> None:
        self.dim = check_dim(dim)
        self.metric = check_metric(metric)
        if embedder is not None and embedder.dim != self.dim:
            raise ValueError(
                f"embedder {embedder.name!r} gives {embedder.dim}-d vectors, but the router's dim is {self.dim}"
            )
        self.embedder = embedder
        self.gate = gate
        self.store = store if store is not None else MetadataStore()
        self.backend: ExpertBackend = backend if backend is not None else LocalBackend()
        self.experts: list[Expert] = []  # Expert, or the backend's handle that behaves like one
        self.manifest: dict[str, Any] = {}  # set by Router.load
        # In-scope score (Gate.in_scope_score) under which route/search(abstain=True) answer "no expert is confident".
        self.abstain_threshold: float | None = None
        # Merging hits from several experts: rank by score + prior_weight * log(gate probability of
        # the hit's expert) (similarity scores; minus the distance for l2). 0 = by score alone.
        self.prior_weight: float = 0.0
        self._next_id = self.store.max_id() + 1
        # Held for any change to the expert set or the gate (lifecycle operations hold it while they plan).
        self.lock = threading.RLock()
        self.routing_stats = RoutingStats.zeros(0)  # what route/search chose, per expert

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
        output is fitted against the other experts (fit_expert_rows): the new expert takes
        its own queries without drawing the others'; if the fit fails the expert is removed again.
        `fit_row=False` only points the new row at its vectors' mean feature (Gate.add_expert), which
        can draw many of the other experts' queries until the gate is fine-tuned.
        """
        check_new_name(name, self.expert_names, "add_expert")
        xb = self.vectors_from(texts, vectors, f"expert {name!r}")
        payloads = payloads_or_none(metadata, xb.shape[0])
        with self.lock:
            ids = np.arange(self._next_id, self._next_id + xb.shape[0], dtype=np.int64)
            expert = self.backend.create(name, self.dim, self.metric, specialization or name, parent, xb, ids)
            self.store.add(ids, name, list(texts) if texts is not None else [None] * len(ids), payloads)
            self._next_id += len(ids)
            self.experts.append(expert)
            self.routing_stats = self.routing_stats.appended(1)
            if self.gate is not None:
                m = self.gate.prototypes_per_expert
                protos = torch.from_numpy(expert.prototypes(m)) if m else None
                self.gate.add_expert(torch.from_numpy(xb), prototypes=protos)
        try:
            if fit_row and self.gate is not None and self.num_experts > 1:
                self.fit_expert_rows([name])
            broken = self.gate.nonfinite() if self.gate is not None else []
            if broken:  # e.g. huge 'l2' vectors overflowing the gate's products: never route or save on NaN
                raise ValueError(
                    f"add_expert: expert {name!r}'s vectors made the gate non-finite ({', '.join(broken[:3])}); "
                    "scale the vectors down"
                )
        except BaseException:
            self.remove_expert(name)
            raise
        return expert

    def fit_expert_rows(
        self, names: Sequence[str], own_share: float = 0.9, other_share: float = 0.01, seed: int = 0
    ) -> None:
        """Refit the gate rows of experts `names` (e.g. just added) from their vectors and a sample of the others'.

        Each row is fitted so that its expert gets `own_share` of the probability on its own vectors
        and `other_share` on a sample of the other experts' vectors (gate.surgery.fitted_new_rows):
        routable at once without taking over everyone else's queries.
        """
        with self.lock:
            gate = self._require_gate()
            idx = [self.expert_index(n) for n in names]
            if len(set(idx)) != len(idx):
                raise ValueError(f"expert names must be distinct, got {list(names)}")
            if len(idx) == self.num_experts:
                raise ValueError("fitting rows needs at least one other expert to compare with")
            own = [self.experts[i].vectors() for i in idx]
            protos = None
            if gate.prototypes_per_expert:  # k-means prototypes, as a trained gate's experts have
                protos = [self.experts[i].prototypes(gate.prototypes_per_expert, seed + i) for i in idx]
            context = sample_vectors(self.experts, idx, seed=seed)
            self.gate = fitted_new_rows(gate, idx, own, context, protos, own_share, other_share).eval()

    def vectors_from(self, texts: Sequence[str] | None, vectors: Any, what: str) -> np.ndarray:
        """Prepared (n, d) vectors: `vectors` if given, else `texts` embedded; one text per vector when both."""
        if texts is not None:
            texts = check_text_list(texts, f"{what}: texts")
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
        with self.lock:
            i = self.expert_index(name)
            if self.gate is not None:
                self.gate.remove_expert(i)
            del self.experts[i]
            self.routing_stats = self.routing_stats.without(i)
            self.store.delete_expert(name)

    def record_feedback(self, query: Any, expert: str, positive: bool) -> int:
        """Record whether `expert` served `query` (text or vector) well; returns the record's id (on disk at save())."""
        if not isinstance(positive, (bool, np.bool_)):  # bool("no") is True: a string would be stored as positive
            raise ValueError(
                f"record_feedback: positive must be True or False, got {type(positive).__name__} {positive!r}"
            )
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
            gate.init_head_from_centroids(torch.from_numpy(centroids(self.experts)))
        self.install_gate(gate)
        return gate

    def install_gate(self, gate: Gate, seed: int = 0) -> Gate:
        """Use `gate` for routing; a prototype gate gets k-means prototypes of each expert's vectors first."""
        if gate.dim != self.dim or gate.num_experts != self.num_experts:
            raise ValueError(
                f"the gate has dim {gate.dim} and {gate.num_experts} outputs; "
                f"the router needs dim {self.dim} and {self.num_experts}"
            )
        if gate.prototypes_per_expert:
            m = gate.prototypes_per_expert
            gate.init_prototypes([torch.from_numpy(e.prototypes(m, seed + i)) for i, e in enumerate(self.experts)])
        self.gate = gate.eval()
        return gate

    def _require_gate(self) -> Gate:
        if self.gate is None:
            raise RuntimeError("the router has no gate; call router.init_gate() or train one (moe_router.training)")
        if self.gate.num_experts != self.num_experts:
            raise RuntimeError(
                f"the gate has {self.gate.num_experts} outputs but the router has {self.num_experts} experts"
            )
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
        return infer(self._require_gate(), xq, field, batch_size)

    # ---------------------------------------------------------------- queries

    def prepare_queries(self, queries: Any) -> tuple[np.ndarray, bool]:
        """Texts or vectors, one or a batch -> (xq (nq, d) prepared, whether a single query was given)."""
        listed = isinstance(queries, (list, tuple))
        if isinstance(queries, str) or (listed and queries and any(isinstance(q, str) for q in queries)):
            single = isinstance(queries, str)
            other = next((i for i, q in enumerate([] if single else queries) if not isinstance(q, str)), None)
            if other is not None:
                raise ValueError(
                    f"queries: a batch mixing texts and other values (item {other} is "
                    f"{type(queries[other]).__name__}); give all texts or all vectors"
                )
            texts = check_text_list([queries] if single else queries, "queries")
            if self.embedder is None:
                raise ValueError("text queries need an embedder, and this router has none; pass query vectors instead")
            vectors = self.embedder.encode(texts)
        else:
            if listed and len(queries) == 0:
                raise ValueError("queries: empty batch (0 queries); expected at least one")
            vectors = as_array(queries, "query vectors")
            single = vectors.ndim == 1
        return prepare(vectors, self.dim, self.metric, what="query vectors"), single

    def check_top(self, top: int, what: str) -> int:
        """A number of experts in 1..E, else a ValueError naming `what`."""
        return check_int(top, 1, self.num_experts, what, "the number of experts")

    def check_k(self, k: int) -> int:
        """A number of hits in 1..ntotal, else a ValueError."""
        return check_int(k, 1, self.ntotal, "k", "the number of stored vectors")

    def decide(
        self,
        xq: np.ndarray,
        top_k: int,
        record: bool = True,
        top_p: float | None = None,
        max_experts: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probs (nq, E), top (nq, t) expert indices best first); counts them in stats when `record`.

        With `top_p`, each query gets the smallest set of experts whose probability reaches top_p
        (at least 1, at most `max_experts` capped at E, default top_k); rows shorter than t are padded with -1.
        """
        if top_p is None:
            top_k = self.check_top(top_k, "top_k")
        else:
            cap = check_int(top_k if max_experts is None else max_experts, 1, 1 << 30, "max_experts", "a count")
            _check_top_p(top_p)
        probs = self.gate_probs(xq)
        if top_p is None:
            top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]  # (nq, t)
        else:
            top, _ = top_p_experts(probs, float(top_p), min(cap, self.num_experts))  # (nq, t) padded with -1
        if record:
            self.routing_stats.record(top, probs)
        return probs, top

    def route(
        self,
        queries: Any,
        top_k: int = 2,
        abstain: bool = False,
        top_p: float | None = None,
        max_experts: int = 4,
    ) -> list[ExpertScore] | list[list[ExpertScore]]:
        """The top_k experts for each query with their probabilities (a list per query; one list for one query).

        With `top_p`, the smallest set of experts whose calibrated probability reaches top_p instead
        (1 to `max_experts`, capped at E, experts per query); top_k is then unused.

        With `abstain=True` and a calibrated `abstain_threshold`, a query whose in-scope score
        (Gate.in_scope_score) is under the threshold gets an empty list: "no expert is confident".
        """
        xq, single = self.prepare_queries(queries)
        probs, top = self.decide(xq, top_k, top_p=top_p, max_experts=max_experts if top_p is not None else None)
        refused = self._refused(xq, abstain)
        out = []
        for p, row, no in zip(probs, top, refused):
            if no:
                out.append([])
                continue
            row = row[row >= 0]
            chosen = p[row]
            total = float(chosen.sum())
            out.append(
                [
                    ExpertScore(
                        self.experts[e].name,
                        float(p[e]),
                        float(p[e]) / total if total > 0 else 0.0,
                        self.experts[e].specialization,
                        self.experts[e].parent,
                    )
                    for e in row
                ]
            )
        return out[0] if single else out

    # ---------------------------------------------------------------- search

    def search_experts(
        self,
        xq: np.ndarray,
        k: int,
        experts: np.ndarray,
        merge: bool = True,
        probs: np.ndarray | None = None,
        prior_weight: float = 0.0,
    ) -> RoutedSearch:
        """Search, for each query, only the experts in its row of `experts` (nq, t; -1 = none); merge by score.

        With `probs` (nq, E) and `prior_weight` w > 0 the merge ranks hits by score + w * log p(expert)
        (the score negated for l2): a hit from an expert the gate is sure of outranks a slightly
        closer one from an expert it doubts. Scores returned are still the raw scores.

        Queries are grouped by expert: one FAISS call per expert per batch, each expert sent only
        its own queries, all of them at once (the backend: side by side on the cores, or one call
        per expert actor). With `merge=False` the result keeps every expert's own top k: (nq, t * k)
        arrays, expert by expert in the order of `experts`, each best first. An expert that did not
        answer (remote backend only) leaves its slots padded and is named in `missing`.
        """
        nq, t = experts.shape
        D = np.full((nq, t * k), worst_score(self.metric), dtype=np.float32)
        I = np.full((nq, t * k), -1, dtype=np.int64)
        E = np.full((nq, t * k), -1, dtype=np.int64)
        scanned = np.zeros(nq, dtype=np.int64)
        lower_blas_threshold()
        groups = [
            (e, *np.nonzero(experts == e)) for e in np.unique(experts) if e >= 0
        ]  # (expert, rows, slot); -1 = none
        found = self.backend.search([(self.experts[e], xq[rows]) for e, rows, _ in groups], k)
        missing = None
        for (e, rows, slot), answer in zip(groups, found):  # rows: queries that chose e; slot: in which position
            if answer is None:
                if missing is None:
                    missing = np.full((nq, t), -1, dtype=np.int64)
                missing[rows, slot] = e
                continue
            De, Ie = answer
            cols = slot[:, None] * k + np.arange(k)[None, :]  # (m, k)
            D[rows[:, None], cols] = De
            I[rows[:, None], cols] = Ie
            E[rows[:, None], cols] = np.where(Ie >= 0, e, -1)
            scanned[rows] += self.experts[e].ntotal
        if not merge:
            return RoutedSearch(D, I, E, scanned, missing)
        key = D if self.metric == "ip" else -D  # higher is better
        if prior_weight and probs is not None:
            p = np.take_along_axis(np.asarray(probs, dtype=np.float64), np.maximum(E, 0), axis=1)  # (nq, t * k)
            key = np.where(E >= 0, key + prior_weight * np.log(np.maximum(p, 1e-12)), -np.inf)
        order = np.argsort(-key, axis=1, kind="stable")[:, :k]  # (nq, k)
        return RoutedSearch(
            np.take_along_axis(D, order, 1),
            np.take_along_axis(I, order, 1),
            np.take_along_axis(E, order, 1),
            scanned,
            missing,
        )

    def _refused(self, xq: np.ndarray, abstain: bool) -> np.ndarray:
        """(nq,) True where the router abstains (in-scope score under the threshold)."""
        if not abstain:
            return np.zeros(len(xq), dtype=bool)
        if self.abstain_threshold is None:
            raise ValueError(
                "abstain=True needs a calibrated abstain_threshold (set by training on data with "
                "out-of-scope validation queries, or assign router.abstain_threshold)"
            )
        return self.in_scope_scores(xq) < self.abstain_threshold

    def search(
        self,
        queries: Any,
        k: int = 10,
        top_experts: int = 2,
        with_text: bool = True,
        abstain: bool = False,
        per_expert: bool = False,
        top_p: float | None = None,
        max_experts: int = 4,
        prior_weight: float | None = None,
    ) -> SearchHits | list[SearchHits]:
        """Route each query, search only its top_experts experts, return its k best hits merged by score.

        With `top_p` (adaptive expert count), each query searches the smallest set of experts whose
        calibrated probability reaches top_p: at least 1, at most `max_experts` (capped at E);
        top_experts is then unused.

        With `per_expert=True`, each searched expert contributes its own k best instead (up to
        k x top_experts hits, grouped by expert, the most probable expert first; the tutorial's
        routeQuery(query, kPerExpert, topExperts)). With `abstain=True`, queries the router is not
        confident about get no hits (see route). Each query's hits are a list (SearchHits) whose
        `missing_experts` names the chosen experts that did not answer (remote backends only).
        `prior_weight` (default: the router's, which training sets on BEIR data) weighs the gate's
        probability into the merge (see search_experts).
        """
        k = self.check_k(k)
        w = self.prior_weight if prior_weight is None else check_prior_weight(prior_weight)
        if top_p is None:
            top_experts = self.check_top(top_experts, "top_experts")
        xq, single = self.prepare_queries(queries)
        probs, top = self.decide(xq, top_experts, top_p=top_p, max_experts=max_experts)
        refused = self._refused(xq, abstain)
        res = self.search_experts(xq, k, top, merge=not per_expert, probs=probs, prior_weight=w)
        out = self.hits(res, probs, with_text, refused)
        return out[0] if single else out

    def hits(
        self, res: RoutedSearch, probs: np.ndarray, with_text: bool = True, refused: np.ndarray | None = None
    ) -> list[SearchHits]:
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
                row.append(
                    Hit(int(i), float(score), ex.name, ex.specialization, ex.parent, float(probs[q, e]), text, payload)
                )
            out.append(SearchHits(row, [self.experts[e].name for e in res.missing_of(q)]))
        return out

    # ---------------------------------------------------------------- stats

    def stats(self) -> list[ExpertStats]:
        """Per expert: vectors stored, queries routed to it, load share and mean confidence."""
        return self.routing_stats.table(
            self.expert_names,
            [e.specialization for e in self.experts],
            [e.parent for e in self.experts],
            [e.ntotal for e in self.experts],
        )

    def reset_stats(self) -> None:
        self.routing_stats.reset()

    # ---------------------------------------------------------------- copies and swaps

    def fork(self, private_store: bool = False) -> Router:
        """A router that can be changed while this one keeps serving.

        Shares what changes never modify in place (each Expert's index, the embedder, the store
        unless `private_store`); copies the expert list and the stats, deep-copies the gate. With
        `private_store` the metadata store is copied into memory, so deleting an expert's rows in the
        fork cannot reach readers of this router. Lifecycle operations that change an Expert in
        place must replace it in the fork instead.
        """
        with self.lock:
            out = Router(
                self.dim,
                self.metric,
                embedder=self.embedder,
                store=self.store.in_memory_copy() if private_store else self.store,
                backend=self.backend,
            )
            out.experts = list(self.experts)
            out.gate = copy.deepcopy(self.gate)
            out.routing_stats = self.routing_stats.copy()
            out.abstain_threshold = self.abstain_threshold
            out.prior_weight = self.prior_weight
            out.manifest = copy.deepcopy(self.manifest)
            out._next_id = max(out._next_id, self._next_id)
        return out

    def replace_parts(
        self,
        experts: Sequence[Expert],
        gate: Gate | None,
        stats: RoutingStats,
        item_moves: Sequence[tuple[Sequence[int], str]] = (),
        feedback_moves: Sequence[tuple[Sequence[int], str]] = (),
    ) -> None:
        """Swap in a new expert list, gate and stats, with the store changes that go with them.

        The store changes run first, in one transaction: if they fail nothing has changed.
        """
        if gate is not None and gate.num_experts != len(experts):
            raise ValueError(f"the gate has {gate.num_experts} outputs for {len(experts)} experts")
        if len(stats.counts) != len(experts):
            raise ValueError(f"stats for {len(stats.counts)} experts, but {len(experts)} experts given")
        with self.lock:
            self.store.apply_changes(item_moves, feedback_moves)
            self.experts = list(experts)
            self.gate = gate
            self.routing_stats = stats.copy()

    # ---------------------------------------------------------------- persistence

    def save(
        self, path: str | Path, config: dict | None = None, metrics: dict | None = None, recheck: bool = True
    ) -> Path:
        """Write the router as a new version of the checkpoint `path`, switched to atomically (moe_router.checkpoint).

        The only way to change a checkpoint on disk: a loaded router keeps its changes in memory until
        then. Unchanged experts' files are hard-linked after a sha256 check (`recheck=False`: after a
        stat check, for frequent saves such as the server's feedback). Refused before anything is
        written (ValueError) when `path` or a folder above it is a file, or when the gate holds NaN or inf.
        """
        path = Path(path)
        for p in (path, *path.parents):
            if p.exists():
                if not p.is_dir():
                    raise ValueError(
                        f"save: cannot write a checkpoint directory at {path}: "
                        f"{'it' if p == path else p} is a file, not a directory"
                    )
                break
        with self.lock:
            broken = self.gate.nonfinite() if self.gate is not None else []
            if broken:
                raise ValueError(
                    f"save: the gate holds NaN or inf in {', '.join(broken)}; refusing to save a gate "
                    "that cannot route (retrain it, or load the last good checkpoint)"
                )
            parts = CheckpointParts(
                dim=self.dim,
                metric=self.metric,
                embedder=self.embedder,
                gate=self.gate,
                experts=list(self.experts),
                store=self.store,
                counts=self.routing_stats.counts.copy(),
                confidence_sums=self.routing_stats.confidence_sums.copy(),
                abstain_threshold=self.abstain_threshold,
                prior_weight=self.prior_weight,
                config=config or {},
                metrics=metrics or {},
            )
            self.manifest = write_checkpoint(path, parts, recheck=recheck)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        verify: bool = True,
        cache_dir: str | Path | None = None,
        backend: str | ExpertBackend = "local",
        ray_address: str | None = None,
        backend_options: dict[str, Any] | None = None,
    ) -> Router:
        """Load a checkpoint directory, read-only; never unpickles or imports code from it.

        The router is private: its changes (experts, feedback) stay in memory until save().

        `backend` "local" reads the experts into this process; "ray" opens each expert (or group)
        in a Ray actor that reads its own files, on the cluster at `ray_address` (None: join the
        local cluster if one runs, else start one; see RayBackend), with RayBackend's
        `backend_options`. An ExpertBackend instance is used as it is.
        """
        if not isinstance(backend, str) and (ray_address is not None or backend_options):
            raise ValueError(
                f"ray_address and backend_options are for a backend given by name; {backend!r} is already built"
            )
        if isinstance(backend, str):
            options = dict(backend_options or {})
            if ray_address is not None:
                if backend != "ray":
                    raise ValueError(f"ray_address is only for backend='ray', got backend={backend!r}")
                options["address"] = ray_address
            backend = make_backend(backend, **options)
        parts = read_checkpoint(Path(path), verify=verify, cache_dir=cache_dir, open_experts=backend.open)
        try:
            router = cls(parts.dim, parts.metric, embedder=parts.embedder, store=parts.store, backend=backend)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path} has an invalid manifest or files: {exc}") from None
        router.experts = list(parts.experts)
        router.gate = parts.gate
        router.routing_stats = RoutingStats(parts.counts, parts.confidence_sums)
        router._next_id = max([router._next_id, *(int(e.max_id) + 1 for e in router.experts if e.ntotal)])
        router.abstain_threshold = parts.abstain_threshold
        router.prior_weight = parts.prior_weight
        router.manifest = parts.manifest
        return router

    def __repr__(self) -> str:
        return f"Router(dim={self.dim}, metric={self.metric!r}, experts={self.num_experts}, vectors={self.ntotal})"

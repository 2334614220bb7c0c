"""The router: a gate over named experts; routes queries and searches only the chosen experts.

Query-time work (prepare, route, search) plus a small set of documented changes (add_expert,
remove_expert, set_parent, record_feedback, set_gate, set_calibration, update, the two settings
abstain_threshold and prior_weight, set_training_info, reset_stats). A Router holds one
RouterParts record; a change builds a new record and swaps it in under the router's lock, so a
search never sees half a change. Persistence lives above routing: save/load delegate to
moe_router.checkpoint at call time.

Dimension legend: nq queries, d vector dim, E experts, t experts searched per query, k hits.
Plain PyTorch + FAISS + numpy: no Lightning, no Hydra.
"""

from __future__ import annotations

import copy
import importlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_router.checks import check_bool, check_decide_weight, check_new_name, check_prior_weight
from moe_router.embed.base import Embedder, check_text_list
from moe_router.gate.model import Gate, in_scope, infer
from moe_router.gate.surgery import refit_rows
from moe_router.index.expert import Expert
from moe_router.index.merge import merge_hits, redecide
from moe_router.metrics import top_p_experts
from moe_router.routing.backends import ExpertBackend, make_backend
from moe_router.routing.parts import (
    CalibrationSet,
    Change,
    RouterParts,
    check_abstain_threshold,
    json_object,
)
from moe_router.store import check_payloads
from moe_router.types import ExpertScore, ExpertSpec, ExpertStats, Hit, RoutedSearch, SearchHits, SearchParams
from moe_router.vectors import as_array, check_dim, check_metric, prepare, worst_score


@dataclass(frozen=True)
class Routing:
    """Array form of routing decisions for a batch of prepared queries."""

    probs: np.ndarray  # (nq, E) gate probabilities at the gate's temperature
    top: np.ndarray  # (nq, t) chosen expert indices, best first; -1 pads top-p rows
    refused: np.ndarray  # (nq,) True where the router abstains (params.abstain)


class Router:
    """Experts (FAISS flat indexes) + a gate that picks which of them to search.

    Vectors are L2-normalised on the way in when the metric is 'ip' (cosine similarity). The
    backend holds the experts' indexes and runs their searches (routing.backends): in this
    process by default, or in Ray actors (Router.load(path, backend="ray")).
    """

    __slots__ = ("_lock", "_parts", "_next_id")  # state changes only through the methods below

    def __init__(
        self, dim: int, metric: str = "ip", embedder: Embedder | None = None, backend: ExpertBackend | None = None
    ) -> None:
        self._lock = threading.RLock()  # held for every change; searches read one RouterParts and take no lock
        parts = {"dim": check_dim(dim), "metric": check_metric(metric), "embedder": embedder}
        self._parts = RouterParts(**parts, **({"backend": backend} if backend is not None else {}))
        self._next_id = 0

    @classmethod
    def from_parts(cls, parts: RouterParts) -> Router:
        """A router holding `parts` (checked when the record was built)."""
        router = cls.__new__(cls)
        router._lock = threading.RLock()
        router._parts = parts
        router._next_id = parts.next_id()
        return router

    def parts(self) -> RouterParts:
        """A snapshot of this router's parts (the stats copied; experts and gate shared, never changed in place)."""
        with self._lock:
            return self._parts.replace(stats=self._parts.stats.copy())

    # ---------------------------------------------------------------- read-only views

    @property
    def dim(self) -> int:
        return self._parts.dim

    @property
    def metric(self) -> str:
        return self._parts.metric

    @property
    def embedder(self) -> Embedder | None:
        return self._parts.embedder

    @property
    def backend(self) -> ExpertBackend:
        return self._parts.backend

    @property
    def gate(self) -> Gate | None:
        """The gate routing now (read-only: derive a new one from a copy and set_gate it)."""
        return self._parts.gate

    @property
    def experts(self) -> tuple[Expert, ...]:
        """The experts, in routing order (the gate's outputs)."""
        return self._parts.experts

    @property
    def expert_names(self) -> list[str]:
        return self._parts.names

    @property
    def num_experts(self) -> int:
        return len(self._parts.experts)

    @property
    def ntotal(self) -> int:
        return sum(e.ntotal for e in self._parts.experts)

    @property
    def config(self) -> dict:
        """The training config this router was made with (saved with it; {} when unknown)."""
        return self._parts.config

    @property
    def metrics(self) -> dict:
        """What training measured (saved with the router)."""
        return self._parts.metrics

    @property
    def calibration(self) -> CalibrationSet:
        """The judged queries the gate was calibrated on (replayed and refitted by train.fine_tune; may be empty)."""
        return self._parts.calibration

    def expert(self, name: str) -> Expert:
        return self._parts.experts[self._parts.position(name)]

    def expert_indices(self, names: Sequence[str]) -> np.ndarray:
        """(n,) position of each named expert in routing order; KeyError naming the known ones."""
        index = {e.name: i for i, e in enumerate(self._parts.experts)}
        missing = next((n for n in names if n not in index), None)
        if missing is not None:
            raise KeyError(f"unknown expert {missing!r}; known experts: {self.expert_names}")
        return np.array([index[n] for n in names], dtype=np.int64)

    def lookup(self, ids: Sequence[int]) -> dict[int, tuple[str | None, dict]]:
        """Stored row id -> (its text, its metadata) for the ids that exist."""
        return self._parts.store.get(ids)

    def feedback(self, expert: str | None = None) -> list:
        """Feedback records (FeedbackRecord), oldest first; only `expert`'s when given."""
        return self._parts.store.feedback(expert)

    # ---------------------------------------------------------------- settings

    @property
    def abstain_threshold(self) -> float | None:
        """In-scope score (Gate.in_scope_score) under which abstain=True answers "no expert is confident"."""
        return self._parts.abstain_threshold

    @abstain_threshold.setter
    def abstain_threshold(self, value: float | None) -> None:
        value = check_abstain_threshold(value)
        self.update(lambda parts: Change(parts.replace(abstain_threshold=value)))

    @property
    def prior_weight(self) -> float:
        """Merging several experts' hits ranks by score + prior_weight * log p(expert); 0 = by score alone."""
        return self._parts.prior_weight

    @prior_weight.setter
    def prior_weight(self, value: float) -> None:
        value = check_prior_weight(value)
        self.update(lambda parts: Change(parts.replace(prior_weight=value)))

    @property
    def decide_weight(self) -> float:
        """> 0: a search that reaches several experts keeps only one's hits, re-decided from the hits (0 = merge all).

        Each searched expert scores log p(expert) + decide_weight * the mean similarity of its best
        3 hits (index.merge.redecide); training fits it on the calibration queries when asked.
        """
        return self._parts.decide_weight

    @decide_weight.setter
    def decide_weight(self, value: float) -> None:
        value = check_decide_weight(value)
        self.update(lambda parts: Change(parts.replace(decide_weight=value)))

    def set_training_info(self, config: dict | None = None, metrics: dict | None = None) -> None:
        """Record the config the router was trained with and what training measured (saved with it)."""
        config, metrics = json_object(config, "config"), json_object(metrics, "metrics")
        self.update(lambda parts: Change(parts.replace(config=config, metrics=metrics)))

    # ---------------------------------------------------------------- changes

    def add_expert(
        self,
        name: str | ExpertSpec,
        vectors: Any = None,
        texts: Sequence[str] | None = None,
        specialization: str = "",
        parent: str | None = None,
        metadata: Sequence[dict] | None = None,
        fit_row: bool = True,
    ) -> Expert:
        """Add an expert from vectors and/or texts (texts are embedded when no vectors are given).

        With a gate present, the gate grows an output for it at once. With `fit_row` (default) that
        output is fitted against the other experts (gate.surgery.refit_rows): the new expert takes its own
        queries without drawing the others'. `fit_row=False` only points the new row at its vectors'
        mean feature (Gate.add_expert), which can draw many of the other experts' queries until the
        gate is fine-tuned. Nothing changes when any argument is refused or the fit fails. `name` may
        be an ExpertSpec (already checked where it entered), then without specialization or parent.
        """
        if isinstance(name, ExpertSpec):
            if specialization or parent is not None:
                raise ValueError("add_expert: give specialization and parent in the ExpertSpec, not beside it")
            spec = name
        else:
            spec = ExpertSpec(name, specialization, parent)
        name = spec.name
        check_new_name(name, self.expert_names, "add_expert")
        fit_row = check_bool(fit_row, "fit_row")
        xb = self.prepare_rows(texts, vectors, f"expert {name!r}")
        payloads = check_payloads(metadata, xb.shape[0])
        rows = list(texts) if texts is not None else [None] * len(xb)

        def plan(parts: RouterParts) -> Change:
            check_new_name(name, parts.names, "add_expert")
            ids = np.arange(self._next_id, self._next_id + xb.shape[0], dtype=np.int64)
            expert = parts.backend.create(spec, parts.dim, parts.metric, xb, ids)
            gate = None
            if parts.gate is not None:
                gate = copy.deepcopy(parts.gate)
                m = gate.prototypes_per_expert
                gate.add_expert(torch.from_numpy(xb), prototypes=torch.from_numpy(expert.prototypes(m)) if m else None)
            new = parts.replace(experts=(*parts.experts, expert), gate=gate, stats=parts.stats.appended(1))
            if fit_row and gate is not None and len(new.experts) > 1:
                new = new.replace(gate=refit_rows(new.gate, new.experts, [len(new.experts) - 1]))
            broken = new.gate.nonfinite() if new.gate is not None else []
            if broken:  # e.g. huge 'l2' vectors overflowing the gate's products: never route or save on NaN
                raise ValueError(
                    f"add_expert: expert {name!r}'s vectors made the gate non-finite ({', '.join(broken[:3])}); "
                    "scale the vectors down"
                )
            parts.store.add(ids, name, rows, payloads)  # last: nothing can fail after it
            return Change(new, created=(name,))

        self.update(plan)
        return self.expert(name)

    def prepare_rows(self, texts: Sequence[str] | None, vectors: Any, what: str) -> np.ndarray:
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

        def plan(parts: RouterParts) -> Change:
            i = parts.position(name)
            gate = None
            if parts.gate is not None:
                gate = copy.deepcopy(parts.gate)
                gate.remove_expert(i)
            experts = parts.experts[:i] + parts.experts[i + 1 :]
            parts.store.delete_expert(name)  # last: nothing can fail after it
            calibration = parts.calibration.without([name])
            return Change(
                parts.replace(experts=experts, gate=gate, stats=parts.stats.without(i), calibration=calibration)
            )

        self.update(plan)

    def set_parent(self, expert: str, parent: str | None) -> None:
        """Put `expert` under `parent` (None: no parent); saved with the checkpoint."""

        def plan(parts: RouterParts) -> Change:
            i = parts.position(expert)
            ex = parts.experts[i]
            moved = ex.with_spec(ex.spec.with_parent(parent))  # checked: a name, not the expert itself
            return Change(parts.replace(experts=parts.experts[:i] + (moved,) + parts.experts[i + 1 :]))

        self.update(plan)

    def record_feedback(self, query: Any, expert: str, positive: bool) -> int:
        """Record whether `expert` served `query` (text or vector) well; returns the record's id (on disk at save())."""
        positive = check_bool(positive, "record_feedback: positive")  # bool("no") is True: never coerce
        self._parts.position(expert)  # unknown expert -> KeyError naming the known ones
        text = query if isinstance(query, str) else None
        xq, single = self.prepare(query)
        if not single:
            raise ValueError("record_feedback takes one query, got a batch")
        return self._parts.store.add_feedback(text, xq[0], expert, positive)

    def set_gate(self, gate: Gate | None) -> None:
        """Route with `gate` from now on (None: no gate). The router owns it: copy it to derive another."""
        if gate is not None:
            defects = gate.defects()
            if defects:
                raise ValueError(f"set_gate: the gate cannot route: {'; '.join(defects[:3])}")
            gate = gate.eval()
        self.update(lambda parts: Change(parts.replace(gate=gate)))

    def set_calibration(self, calibration: CalibrationSet | None) -> None:
        """Keep `calibration` as the judged queries the gate is calibrated on (None: keep none)."""
        if calibration is not None and not isinstance(calibration, CalibrationSet):
            raise TypeError(f"set_calibration takes a CalibrationSet or None, got {type(calibration).__name__}")
        self.update(lambda parts: Change(parts.replace(calibration=calibration)))

    def update(self, plan: Callable[[RouterParts], Change]) -> Change:
        """Apply a change: `plan` gets a snapshot of the parts and returns the Change to make.

        Runs under the router's lock, so no other change lands between the snapshot and the swap.
        The store moves run first, in one transaction: if `plan` or the store fails, nothing changed.
        Routing counts recorded by searches while the plan ran are carried over (by expert name).
        """
        with self._lock:
            before = self._parts
            base = before.stats.copy()
            change = plan(before.replace(stats=base.copy()))
            if not isinstance(change, Change):
                raise TypeError(f"update: the plan must return a Change, got {type(change).__name__}")
            change.parts.store.apply_changes(change.item_moves, change.feedback_moves)
            meanwhile = before.stats.since(base)
            stats = change.parts.stats.carried(meanwhile, before.names, change.parts.names)
            self._parts = change.parts.replace(stats=stats)
            self._next_id = max(self._next_id, change.parts.next_id())
            return change

    def forget_feedback(self, seq: int) -> None:
        """Drop feedback record `seq` (the server takes back a row whose save failed: memory matches the disk)."""
        self._parts.store.delete_feedback(seq)

    def close(self) -> None:
        """Release the metadata store (a retired snapshot of the server); the router is unusable after."""
        self._parts.store.close()

    def reset_stats(self) -> None:
        self._parts.stats.reset()

    def fork(self, private_store: bool = False) -> Router:
        """A router that can be changed while this one keeps serving.

        Shares what changes never modify in place (experts, the gate, the embedder, the store unless
        `private_store`) and copies the stats. With `private_store` the metadata store is copied into
        memory, so deleting an expert's rows in the fork cannot reach readers of this router.
        """
        with self._lock:
            parts = self.parts()
            if private_store:
                parts = parts.replace(store=parts.store.in_memory_copy())
            out = Router.from_parts(parts)
            out._next_id = max(out._next_id, self._next_id)
            return out

    # ---------------------------------------------------------------- queries

    def prepare(self, queries: Any) -> tuple[np.ndarray, bool]:
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

    def check_params(self, params: SearchParams, hits: bool = True) -> SearchParams:
        """`params` if this router can answer them (k at most its vectors, top_experts at most its experts,
        a threshold for abstain), else a ValueError. The one check of what depends on the router.
        `hits=False`: for routing alone (k is not used)."""
        return _check(self._parts, params, hits)

    def select(self, xq: np.ndarray, params: SearchParams, record: bool = True) -> Routing:
        """The experts each prepared query goes to (array form); counted in the stats when `record`.

        Top `params.top_experts`, or with `params.top_p` the smallest set whose probability reaches
        top_p (1 to max_experts, capped at E; rows padded with -1).
        """
        parts = self._parts
        return _select(parts, xq, _check(parts, params, hits=False), record)

    def route(
        self, queries: Any, params: SearchParams | None = None, **options: Any
    ) -> list[ExpertScore] | list[list[ExpertScore]]:
        """Each query's chosen experts with their probabilities (one list for one query, a list per query).

        `params` or the SearchParams fields as keywords: top_experts (2), or top_p with max_experts
        (adaptive), abstain (an empty list for queries under the calibrated in-scope threshold).
        """
        parts = self._parts  # one snapshot for the whole call: a change meanwhile is not seen half-way
        params = _check(parts, SearchParams.of(params, **options), hits=False)
        xq, single = self.prepare(queries)
        r = _select(parts, xq, params, record=True)
        out = []
        for p, row, no in zip(r.probs, r.top, r.refused):
            row = [] if no else row[row >= 0]
            total = float(p[row].sum()) if len(row) else 0.0
            out.append([_score(parts.experts[e], float(p[e]), total) for e in row])
        return out[0] if single else out

    def search(self, queries: Any, params: SearchParams | None = None, **options: Any) -> SearchHits | list[SearchHits]:
        """Route each query, search only its chosen experts, return its k best hits merged by score.

        `params` or the SearchParams fields as keywords (k=10, top_experts=2, top_p, max_experts,
        per_expert, with_text, prior_weight, abstain). With per_expert, each searched expert
        contributes its own k best instead (grouped by expert, the most probable first: the
        tutorial's routeQuery(query, kPerExpert, topExperts)). Each query's hits are a list
        (SearchHits) whose `missing_experts` names chosen experts that did not answer (remote
        backends only). prior_weight (default: the router's) weighs the gate's probability into the merge.
        """
        parts = self._parts  # one snapshot for the whole call
        params = _check(parts, SearchParams.of(params, **options))
        xq, single = self.prepare(queries)
        r = _select(parts, xq, params, record=True)
        w = parts.prior_weight if params.prior_weight is None else params.prior_weight
        beta = parts.decide_weight if params.decide_weight is None else params.decide_weight
        res = _search_experts(parts, xq, params.k, r.top, not params.per_expert, r.probs, w, beta)
        out = _hits(parts, res, r.probs, params.with_text, r.refused)
        return out[0] if single else out

    def search_experts(
        self,
        xq: np.ndarray,
        k: int,
        experts: np.ndarray,
        merge: bool = True,
        probs: np.ndarray | None = None,
        prior_weight: float = 0.0,
        decide_weight: float = 0.0,
    ) -> RoutedSearch:
        """Search, for each query, only the experts in its row of `experts` (nq, t; -1 = none); merge by score.

        Queries are grouped by expert: one FAISS call per expert per batch, each expert sent only its
        own queries, all at once (the backend: side by side on the cores, or one call per expert
        actor). The merge is index.merge.merge_hits (with `probs` and `prior_weight`: the log-prior).
        With `merge=False` the result keeps every expert's own top k: (nq, t * k) arrays, expert by
        expert in the order of `experts`, each best first. An expert that did not answer (remote
        backend only) leaves its slots padded and is named in `missing`. With `decide_weight` > 0 and
        `probs`, a merged search keeps one expert's hits per query (index.merge.redecide).
        """
        return _search_experts(
            self._parts, xq, k, experts, merge, probs, prior_weight, check_decide_weight(decide_weight)
        )

    def hits(
        self, res: RoutedSearch, probs: np.ndarray, with_text: bool = True, refused: np.ndarray | None = None
    ) -> list[SearchHits]:
        """Per query, the Hit of each found row of a routed search (skipping padding and refused queries)."""
        return _hits(self._parts, res, probs, with_text, refused)

    def gate_probs(self, xq: np.ndarray) -> np.ndarray:
        """(nq, E) the gate's probabilities for prepared queries, at its temperature (nothing counted)."""
        return infer(_require_gate(self._parts), xq, "probs")

    # ---------------------------------------------------------------- stats

    def stats(self) -> list[ExpertStats]:
        """Per expert: vectors stored, queries routed to it, load share and mean confidence."""
        parts = self._parts
        return parts.stats.table(
            [e.name for e in parts.experts],
            [e.specialization for e in parts.experts],
            [e.parent for e in parts.experts],
            [e.ntotal for e in parts.experts],
        )

    def record_routing(self, top: np.ndarray, probs: np.ndarray) -> None:
        """Count routing decisions made outside select() (two-level routing): top (nq, t), -1 = none."""
        self._parts.stats.record(top, probs)

    # ---------------------------------------------------------------- persistence (moe_router.checkpoint)

    def save(self, path: str | Path, recheck: bool = True) -> Path:
        """Write the router as a new version of the checkpoint directory `path`, switched to atomically.

        The only way to change a checkpoint on disk: a loaded router keeps its changes in memory until
        then. See moe_router.checkpoint.save_router (recheck: how unchanged experts' files are trusted).
        """
        return _checkpoint().save_router(self, path, recheck=recheck)

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
        return _checkpoint().load_router(
            path, verify=verify, cache_dir=cache_dir, backend=resolve_backend(backend, ray_address, backend_options)
        )

    def __repr__(self) -> str:
        return f"Router(dim={self.dim}, metric={self.metric!r}, experts={self.num_experts}, vectors={self.ntotal})"


def _check(parts: RouterParts, params: SearchParams, hits: bool = True) -> SearchParams:
    """The router-dependent check; `hits=False` for routing alone, where k plays no part."""
    _require_gate(parts)
    ntotal = sum(e.ntotal for e in parts.experts)
    if hits and params.k > ntotal:
        raise ValueError(f"k must be between 1 and {ntotal} (the number of stored vectors), got {params.k}")
    if params.top_p is None and params.top_experts > len(parts.experts):
        raise ValueError(
            f"top_experts must be between 1 and {len(parts.experts)} (the number of experts), got {params.top_experts}"
        )
    if params.abstain and parts.abstain_threshold is None:
        raise ValueError(
            "abstain=True needs a calibrated abstain_threshold (set by training on data with "
            "out-of-scope validation queries, or assign router.abstain_threshold)"
        )
    return params


def _select(parts: RouterParts, xq: np.ndarray, params: SearchParams, record: bool) -> Routing:
    probs = infer(parts.gate, xq, "probs")
    if params.top_p is None:
        top = np.argsort(-probs, axis=1, kind="stable")[:, : params.top_experts]  # (nq, t)
    else:
        top, _ = top_p_experts(probs, params.top_p, min(params.max_experts, len(parts.experts)))  # (nq, t)
    refused = np.zeros(len(xq), dtype=bool)
    if params.abstain:
        refused = _in_scope(parts, xq) < parts.abstain_threshold
    if record:
        parts.stats.record(np.where(refused[:, None], -1, top), probs)
    return Routing(probs, top, refused)


def _search_experts(
    parts: RouterParts,
    xq: np.ndarray,
    k: int,
    experts: np.ndarray,
    merge: bool,
    probs: np.ndarray | None,
    prior_weight: float,
    decide_weight: float = 0.0,
) -> RoutedSearch:
    nq, t = experts.shape
    D = np.full((nq, t * k), worst_score(parts.metric), dtype=np.float32)
    I = np.full((nq, t * k), -1, dtype=np.int64)
    E = np.full((nq, t * k), -1, dtype=np.int64)
    scanned = np.zeros(nq, dtype=np.int64)
    groups = [(e, *np.nonzero(experts == e)) for e in np.unique(experts) if e >= 0]  # (expert, rows, slot)
    found = parts.backend.search([(parts.experts[e], xq[rows]) for e, rows, _ in groups], k)
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
        scanned[rows] += parts.experts[e].ntotal
    if merge and decide_weight > 0 and probs is not None and t > 1:
        D, I, E = redecide(D, I, E, t, parts.metric, probs, decide_weight)
    if merge:
        D, I, E = merge_hits(D, I, E, k, parts.metric, probs, prior_weight)
    return RoutedSearch(D, I, E, scanned, missing)


def _hits(
    parts: RouterParts, res: RoutedSearch, probs: np.ndarray, with_text: bool, refused: np.ndarray | None
) -> list[SearchHits]:
    meta = parts.store.get(res.I[res.I >= 0].tolist()) if with_text else {}
    out = []
    for q in range(res.I.shape[0]):
        row = []
        for score, i, e in zip(res.D[q], res.I[q], res.E[q]):
            if i < 0 or (refused is not None and refused[q]):
                continue
            ex = parts.experts[e]
            text, payload = meta.get(int(i), (None, {}))
            row.append(
                Hit(int(i), float(score), ex.name, ex.specialization, ex.parent, float(probs[q, e]), text, payload)
            )
        out.append(SearchHits(row, [parts.experts[e].name for e in res.missing_of(q)]))
    return out


def _in_scope(parts: RouterParts, xq: np.ndarray) -> np.ndarray:
    return in_scope(_require_gate(parts), xq)


def _score(expert: Expert, p: float, total: float) -> ExpertScore:
    return ExpertScore(expert.name, p, p / total if total > 0 else 0.0, expert.specialization, expert.parent)


def _require_gate(parts: RouterParts) -> Gate:
    if parts.gate is None:
        raise RuntimeError("the router has no gate; train one (moe_router.train.fit_router) or set_gate() one")
    return parts.gate


def _checkpoint() -> Any:
    """The checkpoint layer (above routing: imported when a router is saved or loaded, never at import)."""
    return importlib.import_module("moe_router.checkpoint")


def resolve_backend(
    backend: str | ExpertBackend, ray_address: str | None = None, options: dict[str, Any] | None = None
) -> ExpertBackend:
    """The backend named `backend` built with `options` (and `ray_address` for 'ray'), or `backend` itself."""
    if not isinstance(backend, str):
        if ray_address is not None or options:
            raise ValueError(
                f"ray_address and backend_options are for a backend given by name; {backend!r} is already built"
            )
        return backend
    options = dict(options or {})
    if ray_address is not None:
        if backend != "ray":
            raise ValueError(f"ray_address is only for backend='ray', got backend={backend!r}")
        options["address"] = ray_address
    return make_backend(backend, **options)

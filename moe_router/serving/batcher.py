"""Micro-batching: queries from concurrent requests share one embedder call, one gate pass and one
grouped FAISS pass (Router.route / Router.search over the stacked queries).

Dimension legend: n queries in one request, N queries in one pass, d vector dim.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_router.routing.router import Router
from moe_router.serving.config import BatchConfig
from moe_router.serving.state import RouterState

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """More queries are waiting than BatchConfig.max_queue allows."""


@dataclass
class Query:
    """One request's queries: texts (embedded in the pass) or prepared vectors (n, d)."""

    op: str  # "route" | "search"
    texts: list[str] | None = None
    xq: np.ndarray | None = None  # (n, d) float32, already checked and normalised
    k: int = 10  # hits per query (search only)
    top_experts: int = 2  # experts routed to / searched per query
    top_p: float | None = None  # set: the smallest set of experts whose probability reaches top_p instead
    max_experts: int = 4  # with top_p: the most experts per query (capped at the number of experts)
    with_text: bool = True  # search only: fetch each hit's text and metadata from the store
    per_expert: bool = False  # search only: k hits from each searched expert instead of k in all
    prior_weight: float | None = None  # search only: weight of log p(expert) in the merge; None = the router's
    submitted: float = field(default_factory=time.monotonic)

    @property
    def n(self) -> int:
        return len(self.texts) if self.texts is not None else int(self.xq.shape[0])


def _check(router: Router, q: Query) -> None:
    if q.top_p is not None:
        if not 0.0 < q.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {q.top_p}")
        if q.max_experts < 1:
            raise ValueError(f"max_experts must be >= 1, got {q.max_experts}")
    elif not 1 <= q.top_experts <= router.num_experts:
        raise ValueError(
            f"top_experts must be between 1 and {router.num_experts} (the number of experts), got {q.top_experts}"
        )
    if q.op == "search" and not 1 <= q.k <= router.ntotal:
        raise ValueError(f"k must be between 1 and {router.ntotal} (the number of stored vectors), got {q.k}")


def run_queries(router: Router, queries: list[Query]) -> list[list[Any] | Exception]:
    """Answer every query against one router: per request, a list (one entry per query) or its error.

    A bad request fails alone; the rest of the pass goes on. Requests are grouped by
    (op, top_experts, top_p, max_experts, with_text, per_expert, prior_weight) - one group in the common case - and each group is
    one Router.route or Router.search call over the stacked queries, searched with the group's
    largest k and cut back to each request's k (exact search: the top k of the top K). Per-expert
    searches are grouped by their k too, so nothing needs cutting.
    """
    out: list[list[Any] | Exception | None] = [None] * len(queries)
    xqs: dict[int, np.ndarray] = {}
    for i, q in enumerate(queries):
        try:
            _check(router, q)
            if q.xq is not None:
                xqs[i] = q.xq
        except ValueError as exc:
            out[i] = exc
    texted = [i for i, q in enumerate(queries) if out[i] is None and q.texts is not None]
    if texted:
        try:
            xq, _ = router.prepare([t for i in texted for t in queries[i].texts])  # (N, d): one embedder call
            bounds = np.cumsum([0] + [queries[i].n for i in texted])
            for i, start, stop in zip(texted, bounds[:-1], bounds[1:]):
                xqs[i] = xq[start:stop]
        except ValueError as exc:
            for i in texted:
                out[i] = exc
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in xqs:
        if out[i] is None:
            q = queries[i]
            adaptive = (q.top_p, q.max_experts) if q.top_p is not None else (None, None)
            groups[
                (
                    q.op,
                    q.top_experts,
                    *adaptive,
                    q.with_text,
                    q.per_expert,
                    q.prior_weight,
                    q.k if q.per_expert else None,
                )
            ].append(i)
    for (op, top_experts, top_p, max_experts, with_text, per_expert, prior_weight, _), idx in groups.items():
        adaptive = {"top_p": top_p, "max_experts": max_experts} if top_p is not None else {}
        xq = np.concatenate([xqs[i] for i in idx])  # (N, d)
        try:
            if op == "route":
                rows = router.route(xq, top_experts=top_experts, **adaptive)
            else:
                k = max(queries[i].k for i in idx)
                rows = router.search(
                    xq,
                    k=k,
                    top_experts=top_experts,
                    with_text=with_text,
                    per_expert=per_expert,
                    prior_weight=prior_weight,
                    **adaptive,
                )
        except ValueError as exc:
            for i in idx:
                out[i] = exc
            continue
        start = 0
        for i in idx:
            q = queries[i]
            part = rows[start : start + q.n]
            out[i] = [hits[: q.k] for hits in part] if op == "search" and not per_expert else part
            start += q.n
    return out  # type: ignore[return-value]


class MicroBatcher:
    """A worker thread that gathers queued queries into passes of at most max_batch queries.

    A pass starts when max_batch queries are waiting or when its oldest query has waited
    max_wait_ms, whichever is first; queries that queued while the previous pass ran go at
    once, so under load batches form without any added wait. When neither the queue nor the
    previous pass held more than one request, the pass starts at once (no wait for one client).
    """

    def __init__(self, state: RouterState, config: BatchConfig) -> None:
        self.state = state
        self.config = config
        self._queue: deque[tuple[Query, Future]] = deque()
        self._waiting = 0  # queries in _queue
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_pass = 0  # requests in the previous pass
        self.passes = 0
        self.queries = 0
        self.largest_pass = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="moe-router-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued queries, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def submit(self, query: Query) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._stopping or self._thread is None:
                raise Overloaded("the server is shutting down")
            if self._waiting > 0 and self._waiting + query.n > self.config.max_queue:
                raise Overloaded(f"{self._waiting} queries are already waiting (batching.max_queue)")
            self._queue.append((query, fut))
            self._waiting += query.n
            self._cond.notify()
        return fut

    def _take(self) -> list[tuple[Query, Future]] | None:
        max_batch, max_wait = self.config.max_batch, self.config.max_wait_ms / 1000
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0][0].submitted + max_wait
            # Wait for company only when there is some: a lone client (last pass and queue of one
            # request) would pay max_wait on every request for nothing.
            expect_more = len(self._queue) > 1 or self._last_pass > 1
            while expect_more and self._waiting < max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, rows = [], 0
            while self._queue and (not batch or rows + self._queue[0][0].n <= max_batch):
                item = self._queue.popleft()
                batch.append(item)
                rows += item[0].n
            self._waiting -= rows
            self._last_pass = len(batch)
        return batch

    def _loop(self) -> None:
        self.state.pin_threads()
        while (batch := self._take()) is not None:
            live = [(q, f) for q, f in batch if f.set_running_or_notify_cancel()]  # drop requests whose client left
            if not live:
                continue
            try:
                with self.state.lease() as snap:
                    results = run_queries(snap.router, [q for q, _ in live])
                for (_, fut), res in zip(live, results):
                    if isinstance(res, Exception):
                        fut.set_exception(res)
                    else:
                        fut.set_result((snap.generation, res))
            except Exception as exc:  # a server fault: every request of the pass gets it (a 500), the worker goes on
                log.exception("micro-batch of %d requests failed", len(live))
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
            n = sum(q.n for q, _ in live)
            self.passes += 1
            self.queries += n
            self.largest_pass = max(self.largest_pass, n)


def run_now(state: RouterState, query: Query) -> tuple[int, list[Any]]:
    """The unbatched path: one request, one pass (run in the server's thread pool)."""
    state.pin_threads()
    with state.lease() as snap:
        (res,) = run_queries(snap.router, [query])
    if isinstance(res, Exception):
        raise res
    return snap.generation, res

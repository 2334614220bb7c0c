"""Micro-batching: queries from concurrent requests share one embedder call, one gate pass and one
grouped FAISS pass (Router.route / Router.search over the stacked queries), grouped by their SearchParams.

Dimension legend: n queries in one request, N queries in one pass, d vector dim.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moe_router.embed.base import check_text_list
from moe_router.routing.router import Router
from moe_router.serving.config import BatchConfig
from moe_router.serving.state import RouterState
from moe_router.types import SearchParams

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """More queries are waiting than BatchConfig.max_queue allows."""


@dataclass
class Query:
    """One request's queries, texts (embedded in the pass) or prepared vectors (n, d), and what they ask (params)."""

    op: str  # "route" | "search"
    params: SearchParams  # checked when built; what depends on the router is checked in the pass
    texts: list[str] | None = None
    xq: np.ndarray | None = None  # (n, d) float32, already checked and normalised
    submitted: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.op not in ("route", "search") or (self.texts is None) == (self.xq is None) or self.n == 0:
            raise ValueError(f"a Query is a 'route' or 'search' of some texts or of some xq, got op={self.op!r}")

    @property
    def n(self) -> int:
        return len(self.texts) if self.texts is not None else int(self.xq.shape[0])


@dataclass
class PassTimes:
    """Where one pass's time went: embedding its texts, routing and searching its queries."""

    embed_s: float = 0.0
    search_s: float = 0.0  # Router.route / Router.search calls (the gate, FAISS, the hits' texts)


@dataclass
class PassCounters:
    """Totals over the passes a batcher ran (GET /stats); read without a lock, so a reader may see a pass half-added."""

    passes: int = 0
    queries: int = 0
    texts: int = 0  # queries sent as text, embedded in their pass
    largest_pass: int = 0
    pass_s: float = 0.0  # seconds in passes, all of it
    embed_s: float = 0.0
    search_s: float = 0.0

    def add(self, queries: int, texts: int, seconds: float, times: PassTimes) -> None:
        self.passes += 1
        self.queries += queries
        self.texts += texts
        self.largest_pass = max(self.largest_pass, queries)
        self.pass_s += seconds
        self.embed_s += times.embed_s
        self.search_s += times.search_s


def run_queries(router: Router, queries: list[Query], times: PassTimes | None = None) -> list[list[Any] | Exception]:
    """Answer every query against one router: per request, a list (one entry per query) or its error.

    A bad request fails alone (Router.check_params and the texts' check run per request); the rest
    of the pass goes on. Text queries share one embedder call. Requests are grouped by (op, params),
    one group in the common case, and each group is one Router.route or Router.search call over the
    stacked queries. A merged search's k is left out of its group's key: the group is searched with
    its largest k and each request's hits cut back to its own k (exact search: the top k of the top K).
    Per-expert searches are grouped by their k too, so nothing needs cutting. `times`, when given,
    gets the seconds spent embedding and searching added to it.
    """
    times = times if times is not None else PassTimes()
    out: list[list[Any] | Exception | None] = [None] * len(queries)
    asked: dict[int, SearchParams] = {}
    for i, q in enumerate(queries):
        try:
            asked[i] = router.check_params(q.params, hits=q.op == "search")
            if q.texts is not None:  # here, or one bad text would fail the pass's shared embedder call
                check_text_list(q.texts, "texts")
        except ValueError as exc:
            out[i] = exc
    xqs = {i: q.xq for i, q in enumerate(queries) if out[i] is None and q.xq is not None}
    texted = [i for i, q in enumerate(queries) if out[i] is None and q.texts is not None]
    if texted:
        started = time.perf_counter()
        try:
            xq, _ = router.prepare([t for i in texted for t in queries[i].texts])  # (N, d): one embedder call
            bounds = np.cumsum([0] + [queries[i].n for i in texted])
            for i, start, stop in zip(texted, bounds[:-1], bounds[1:]):
                xqs[i] = xq[start:stop]
        except ValueError as exc:
            for i in texted:
                out[i] = exc
        times.embed_s += time.perf_counter() - started
    started = time.perf_counter()
    groups: dict[tuple[str, SearchParams], list[int]] = defaultdict(list)
    for i in xqs:
        if out[i] is None:
            q, params = queries[i], asked[i]
            no_k = q.op == "route" or not params.per_expert  # k plays no part, or each request is cut to its own
            groups[(q.op, replace(params, k=1) if no_k else params)].append(i)
    for (op, params), idx in groups.items():
        xq = np.concatenate([xqs[i] for i in idx])  # (N, d)
        try:
            if op == "route":
                rows = router.route(xq, params)
            else:
                rows = router.search(xq, replace(params, k=max(asked[i].k for i in idx)))
        except ValueError as exc:
            for i in idx:
                out[i] = exc
            continue
        start = 0
        for i in idx:
            q = queries[i]
            part = rows[start : start + q.n]
            out[i] = [hits[: q.params.k] for hits in part] if op == "search" and not params.per_expert else part
            start += q.n
    times.search_s += time.perf_counter() - started
    return out  # type: ignore[return-value]


class MicroBatcher:
    """A worker thread that gathers queued queries into passes of at most max_batch queries.

    A pass starts when max_batch queries are waiting or when its oldest query has waited
    max_wait_ms, whichever is first; queries that queued while the previous pass ran go at once,
    so under load batches form without any added wait. When neither the queue nor the previous
    pass held more than one request, the pass starts at once (no wait for one client).

    After a busy pass (at least busy_pass queries: the batcher is what clients wait for), the next
    one also waits, up to busy_wait x that pass's duration, until as many queries wait as that pass
    answered plus those that were already waiting (the answered clients come back). Without it a
    closed loop of many clients settles into two cohorts that alternate, each pass taking the half
    that queued while the other half was being answered; a routed search scans each chosen expert
    once per pass, so one pass of both halves costs little more than a pass of one (docs/serving.md).

    Answers go back to the event loop that submitted them in one call per pass, not one per request.
    """

    def __init__(self, state: RouterState, config: BatchConfig) -> None:
        self.state = state
        self.config = config
        self._queue: deque[tuple[Query, asyncio.Future]] = deque()
        self._waiting = 0  # queries in _queue
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_pass = 0  # requests in the previous pass
        self._busy_until = 0.0  # after a busy pass: how long the next one may wait for company (monotonic)
        self._expected = 0  # after a busy pass: the queries the next one waits for
        self.counters = PassCounters()

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

    def submit(self, query: Query) -> asyncio.Future:
        """Queue `query`; its (generation, results) future, resolved on the calling event loop."""
        fut = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._stopping or self._thread is None:
                raise Overloaded("the server is shutting down")
            if self._waiting > 0 and self._waiting + query.n > self.config.max_queue:
                raise Overloaded(f"{self._waiting} queries are already waiting (batching.max_queue)")
            self._queue.append((query, fut))
            self._waiting += query.n
            self._cond.notify()
        return fut

    def _take(self) -> list[tuple[Query, asyncio.Future]] | None:
        max_batch, max_wait = self.config.max_batch, self.config.max_wait_ms / 1000
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0][0].submitted + max_wait
            wanted = max_batch
            if time.monotonic() < self._busy_until:
                deadline, wanted = self._busy_until, self._expected
            # Wait for company only when there is some: a lone client (last pass and queue of one
            # request) would pay max_wait on every request for nothing.
            expect_more = len(self._queue) > 1 or self._last_pass > 1
            while expect_more and self._waiting < wanted and not self._stopping:
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
            live = [(q, f) for q, f in batch if not f.cancelled()]  # drop requests whose client left
            if not live:
                continue
            started = time.monotonic()
            times = PassTimes()
            try:
                with self.state.lease() as snap:
                    results = run_queries(snap.router, [q for q, _ in live], times)
                answers: list[Any] = [r if isinstance(r, Exception) else (snap.generation, r) for r in results]
            except Exception as exc:  # a server fault: every request of the pass gets it (a 500), the worker goes on
                log.exception("micro-batch of %d requests failed", len(live))
                answers = [exc] * len(live)
            seconds = time.monotonic() - started
            n = sum(q.n for q, _ in live)
            with self._cond:
                busy = n >= self.config.busy_pass
                self._busy_until = time.monotonic() + self.config.busy_wait * seconds if busy else 0.0
                self._expected = min(self.config.max_batch, n + self._waiting)
            self.counters.add(n, sum(q.n for q, _ in live if q.texts is not None), seconds, times)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = defaultdict(list)
            for (_, fut), answer in zip(live, answers):
                by_loop[fut.get_loop()].append((fut, answer))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that loop has closed: nobody waits for these answers any more
                    log.warning("dropped %d answers: their event loop is closed", len(items))


def _deliver(items: list[tuple[asyncio.Future, Any]]) -> None:
    """Resolve a pass's futures (on their event loop); an answer is (generation, results) or an exception."""
    for fut, answer in items:
        if fut.cancelled():
            continue
        if isinstance(answer, Exception):
            fut.set_exception(answer)
        else:
            fut.set_result(answer)


def run_now(state: RouterState, query: Query) -> tuple[int, list[Any]]:
    """The unbatched path: one request, one pass (run in the server's thread pool)."""
    state.pin_threads()
    with state.lease() as snap:
        (res,) = run_queries(snap.router, [query])
    if isinstance(res, Exception):
        raise res
    return snap.generation, res

"""Experts in Ray actors: each expert (or a group of experts) lives in an actor that builds it from its source.

Sources are descriptions (routing.backends.ExpertSource): a checkpoint's StoredExpert, which the
actor reads from the checkpoint's files itself, or vectors sent with it (VectorSource).

The router process keeps the gate, the manifest and the metadata store; the vectors live only in
the actors. How many experts an actor holds, the CPUs it reserves and the node it runs on come
from routing.backends.layout (chosen from the cluster's CPUs unless given); with a placement, the
actors of one open share a placement group with one bundle per node (STRICT_SPREAD), so the
replicas of a group are on distinct nodes and a lost node's actors come back only on a node that
holds none of the group's other replicas.

A routed search sends each chosen expert its own queries, all experts at once, and waits a bounded
time: an expert whose actors died or did not answer in `timeout_s` is left out and named (Answer
None -> RoutedSearch.missing -> SearchHits.missing_experts), never waited on forever. A replica
that fails or is slow is asked no more (the next one is) until it answers a ping. Ray restarts a
dead actor (`max_restarts`); the restarted actor reads its files again.

Actors are never changed: lifecycle operations create new actors for new experts and the old ones
are retired by Ray when the last router holding their handles is gone (Ray's handle reference
counting), which gives the copy-on-write guarantee of the server: a search holds its router's
handles, so it sees the old set of experts or the new one. A placement group goes with the last
handle on its actors.

Dimension legend: n vectors of an expert, m queries sent to it, d vector dim, k hits.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import ray
from ray._private.state import available_resources_per_node  # DeveloperAPI; the public one needs a dashboard
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from moe_router.errors import CheckpointError
from moe_router.index.expert import Content, Expert
from moe_router.routing.backends.base import Answer, ExpertSource, VectorSource
from moe_router.routing.backends.layout import ACTORS_PER_CPU, PLACEMENTS, SHARE, Layout, NodeCpus, plan_layout
from moe_router.types import ExpertSpec

log = logging.getLogger(__name__)


class ExpertUnavailable(RuntimeError):
    """No replica of an expert answered within the backend's timeout."""


class ExpertGroup:
    """The body of an expert actor: some experts' FAISS indexes, built once from their sources."""

    def __init__(self, sources: list[tuple[str, ExpertSource]]) -> None:
        faiss.omp_set_num_threads(1)  # many actors share the cores; parallelism comes from the actors
        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        self.experts: dict[str, Expert] = {}
        for key, src in sources:
            if not context.was_current_actor_reconstructed:
                self.experts[key] = src.read()
                continue
            try:  # a restarted actor must hold exactly what it held: it checks what it reads
                self.experts[key] = src.read(recheck=True)
            except CheckpointError as exc:
                # Removed from the checkpoint since (a retired expert of this group): no router
                # asks for it any more; the group's other experts must still come back.
                log.warning("expert %r is not in the checkpoint any more; restarted without it (%s)", key, exc)

    def describe(self) -> tuple[str, list[tuple[str, int, int]]]:
        """The node this actor runs on and (key, ntotal, max_id) of each expert held."""
        return self.node, [(key, e.ntotal, e.max_id) for key, e in self.experts.items()]

    def search_many(
        self, jobs: list[tuple[str, np.ndarray]], k: int
    ) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
        """The node, and (D, I) of each (expert key, xq (m, d)) job: a search's jobs for this actor in one call."""
        return self.node, [self.experts[key].search(xq, k) for key, xq in jobs]

    def ping(self) -> str:
        """The node: a replica left out after a failure is asked again once this answers."""
        return self.node

    def read(self, key: str, what: str, *args: Any) -> Any:
        """An expert's ids, vectors, some rows, centroid or prototypes (what lifecycle and saving read)."""
        e = self.experts[key]
        if what == "ids":
            return e.ids
        if what not in ("vectors", "rows", "centroid", "prototypes"):
            raise ValueError(
                f"cannot read {what!r} from an expert actor; expected ids, vectors, rows, centroid or prototypes"
            )
        return getattr(e, what)(*args)

    def pid(self) -> int:
        """The actor's process id (tests check that a killed actor came back as a new process)."""
        return os.getpid()


class Traffic:
    """What searches sent to the actors: calls in all and by node id, and the query bytes they carried."""

    def __init__(self) -> None:
        self.calls = 0
        self.sent_bytes = 0
        self.by_node: Counter[str] = Counter()
        self._lock = threading.Lock()  # the server searches from several threads

    def count(self, node: str, nbytes: int) -> None:
        with self._lock:
            self.calls += 1
            self.sent_bytes += nbytes
            self.by_node[node] += 1

    def calls_by_node(self) -> dict[str, int]:
        with self._lock:
            return dict(self.by_node)


# Placement groups whose last actor handle is gone, removed by one thread: the finalizer that hands
# them over may run inside any Ray call (garbage collection), where calling into Ray is not safe.
_retired: queue.SimpleQueue[PlacementGroup] = queue.SimpleQueue()
_reaper_lock = threading.Lock()
_reaper: threading.Thread | None = None


def _remove_retired() -> None:
    while True:
        pg = _retired.get()
        if not ray.is_initialized():
            continue  # the driver left the cluster: its placement groups went with it
        try:
            remove_placement_group(pg)
        except Exception as exc:  # a background thread must outlive one failed removal (a cluster shutting down)
            log.debug("could not remove placement group %s: %s", pg.id.hex(), exc)


class Reservation:
    """A placement group (one bundle per node) held while any of its actors' replica sets is."""

    def __init__(self, pg: PlacementGroup) -> None:
        global _reaper
        with _reaper_lock:
            if _reaper is None:
                _reaper = threading.Thread(target=_remove_retired, name="ray-placement-reaper", daemon=True)
                _reaper.start()
        self.pg = pg
        self._release = weakref.finalize(self, _retired.put, pg)
        self._release.atexit = False  # at exit the group goes with the driver

    def release(self) -> None:
        """Remove the placement group now (its actors failed to start)."""
        self._release()


class ReplicaSet:
    """The actors holding one group of experts: the order a call tries them in, and which are left out.

    A replica that failed or did not answer in time is suspect: searches stop asking it and a ping is
    sent; it is asked again once a ping answers (a restarted actor, a backlog drained).
    """

    def __init__(
        self, keys: list[str], actors: list[Any], nodes: list[str], pinned: Any, reservation: Reservation | None
    ) -> None:
        self.keys = keys
        self.actors = actors  # handles; holding them keeps the actors alive
        self.nodes = nodes  # the node id each replica last reported
        self.pinned = pinned  # ObjectRef of the actors' constructor arguments, needed to restart them
        self.reservation = reservation
        self._turn = itertools.count()
        self._probes: dict[int, Any] = {}  # suspect replica -> its ping in flight
        self._lock = threading.Lock()

    def order(self, include_suspect: bool = False) -> list[int]:
        """Replicas to ask, round-robin over calls: the healthy ones (then the suspect, if asked for)."""
        self._settle()
        start, n = next(self._turn), len(self.actors)
        turn = [(start + a) % n for a in range(n)]
        with self._lock:
            down = set(self._probes)
        healthy = [i for i in turn if i not in down]
        return healthy + [i for i in turn if i in down] if include_suspect else healthy

    def suspect(self, i: int, why: str) -> None:
        with self._lock:
            if i in self._probes:
                return
            self._probes[i] = self.actors[i].ping.remote()
        log.warning("expert actor of %s (replica %d) %s; left out until it answers a ping", self.label, i, why)

    def answered(self, i: int, node: str) -> None:
        with self._lock:
            self.nodes[i] = node
            back = self._probes.pop(i, None) is not None
        if back:
            log.info("expert actor of %s (replica %d) answers again, on node %s", self.label, i, node[:8])

    @property
    def suspects(self) -> list[int]:
        self._settle()
        with self._lock:
            return sorted(self._probes)

    @property
    def label(self) -> str:
        return ", ".join(repr(k) for k in self.keys[:3]) + (", ..." if len(self.keys) > 3 else "")

    def _settle(self) -> None:
        """Take in the pings that have answered (without waiting); a failed ping is sent again."""
        with self._lock:
            probes = dict(self._probes)
        if not probes:
            return
        ready, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=0)
        for i, ref in probes.items():
            if ref not in ready:
                continue
            try:
                node = ray.get(ref)
            except RayError:  # dead, or restarting: the next settle sees the new ping
                with self._lock:
                    if self._probes.get(i) is ref:
                        self._probes[i] = self.actors[i].ping.remote()
                continue
            self.answered(i, node)


class RemoteExpert:
    """The router's handle on an expert held by Ray actors (its replicas); behaves like index.expert.Expert."""

    def __init__(
        self,
        spec: ExpertSpec,
        key: str,
        dim: int,
        metric: str,
        ntotal: int,
        max_id: int,
        group: ReplicaSet,
        timeout_s: float,
        traffic: Traffic,
        content: Content | None = None,
    ) -> None:
        self.spec = spec
        self.key = key  # what the actors call it (its name when it was created)
        self.dim, self.metric = dim, metric
        self.ntotal, self.max_id = ntotal, max_id
        self.group = group  # experts of one group share their actors (and a search's call to them)
        self.timeout_s = timeout_s
        self.traffic = traffic
        self.content = content if content is not None else Content()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def specialization(self) -> str:
        return self.spec.specialization

    @property
    def parent(self) -> str | None:
        return self.spec.parent

    @property
    def replicas(self) -> list[Any]:
        """The actor handles holding this expert."""
        return self.group.actors

    @property
    def nodes(self) -> list[str]:
        """The node id of each replica, as last reported."""
        return list(self.group.nodes)

    def with_spec(self, spec: ExpertSpec) -> RemoteExpert:
        """The same actors under another description."""
        return RemoteExpert(
            spec,
            self.key,
            self.dim,
            self.metric,
            self.ntotal,
            self.max_id,
            self.group,
            self.timeout_s,
            self.traffic,
            self.content,
        )

    def _read(self, what: str, *args: Any) -> Any:
        last: Exception | None = None
        for i in self.group.order(include_suspect=True):
            try:  # whole vectors may be large: more time than a search
                return ray.get(self.replicas[i].read.remote(self.key, what, *args), timeout=self.timeout_s * 10)
            except (RayError, GetTimeoutError) as exc:
                self.group.suspect(i, f"failed to read {what} ({type(exc).__name__})")
                last = exc
        raise ExpertUnavailable(f"expert {self.name!r}: no replica answered ({last})")

    @property
    def ids(self) -> np.ndarray:
        return self._read("ids")

    def vectors(self) -> np.ndarray:
        return self._read("vectors")

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self._read("rows", np.asarray(idx, dtype=np.int64))

    def centroid(self) -> np.ndarray:
        return self._read("centroid")

    def prototypes(self, m: int, seed: int = 0) -> np.ndarray:
        return self._read("prototypes", m, seed)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        answer = search_remote([(self, xq)], k, self.timeout_s, self.traffic)[0]
        if answer is None:
            raise ExpertUnavailable(f"expert {self.name!r} did not answer within {self.timeout_s} s")
        return answer

    def __repr__(self) -> str:
        return f"RemoteExpert({self.name!r}, ntotal={self.ntotal}, replicas={len(self.replicas)})"


def search_remote(
    jobs: Sequence[tuple[RemoteExpert, np.ndarray]], k: int, timeout_s: float, traffic: Traffic
) -> list[Answer]:
    """Every job's search sent at once, one call per actor group (its experts' jobs together).

    A group's call goes to its next healthy replica; one that fails is retried on the next at once,
    and one that has not answered after its share of the wait (timeout_s / replicas) is asked of the
    next replica too (the first answer wins). Returns None for a job no replica answered before the
    deadline (a dead node, an actor being restarted, or one slower than `timeout_s`).
    """
    start = time.monotonic()
    deadline = start + timeout_s
    answers: list[Answer] = [None] * len(jobs)
    by_group: dict[ReplicaSet, list[int]] = {}  # actor group -> its jobs
    for j, (expert, _) in enumerate(jobs):
        by_group.setdefault(expert.group, []).append(j)
    work = {g: [(jobs[j][0].key, jobs[j][1]) for j in idx] for g, idx in by_group.items()}
    order = {g: g.order() for g in by_group}  # no healthy replica: left out at once
    asked = dict.fromkeys(by_group, 0)
    hedge_at: dict[ReplicaSet, float] = {}
    pending: dict[Any, tuple[ReplicaSet, int]] = {}  # call -> (group, replica)

    def ask(g: ReplicaSet, now: float) -> None:
        if asked[g] == len(order[g]):
            return
        i = order[g][asked[g]]
        asked[g] += 1
        pending[g.actors[i].search_many.remote(work[g], k)] = (g, i)
        traffic.count(g.nodes[i], sum(int(xq.nbytes) for _, xq in work[g]))
        hedge_at[g] = now + timeout_s / len(g.actors)

    for g in by_group:
        ask(g, start)
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        wake = min([deadline, *(t for g, t in hedge_at.items() if asked[g] < len(order[g]))])
        # One answer a group: a hung call next to its group's hedge must not be waited for.
        waiting = len({g for g, _ in pending.values()})
        ready, _ = ray.wait(list(pending), num_returns=waiting, timeout=max(0.0, wake - now))
        for ref in ready:
            if ref not in pending:
                continue  # its group was answered by another replica
            g, i = pending.pop(ref)
            try:
                node, results = ray.get(ref)
            except RayError as exc:
                g.suspect(i, f"failed ({type(exc).__name__})")
                ask(g, time.monotonic())
                continue
            g.answered(i, node)
            for j, answer in zip(by_group[g], results):
                answers[j] = answer
            asked[g] = len(order[g])
            for other in [r for r, (h, _) in pending.items() if h is g]:
                del pending[other]
        now = time.monotonic()
        for g, t in list(hedge_at.items()):
            if t <= now and asked[g] < len(order[g]):
                for h, i in list(pending.values()):
                    if h is g:
                        g.suspect(i, f"did not answer in {now - start:.2f} s")
                ask(g, now)
    for g, i in pending.values():
        g.suspect(i, f"did not answer within timeout_s={timeout_s:g}")
    return answers


class RayBackend:
    """Experts in Ray actors: `experts_per_actor` experts an actor, `replicas` actors holding each group.

    `address`: the cluster to join (ray.init's rules: None joins RAY_ADDRESS or the cluster `ray start`
    last started on this machine, else starts a local one; "auto" joins or fails); a process that has
    already joined a cluster keeps using it. `num_cpus`: CPUs Ray reserves for each actor, and
    `experts_per_actor`: None (default) chooses them from the cluster's CPUs when experts are opened
    (routing.backends.layout: at most two actors a CPU, half of each node's CPUs reserved), logged
    and kept in `plan`; given values are kept and refused when the cluster cannot hold them.
    `placement`: "spread" deals the actor groups over the nodes with CPUs, "pack" puts each replica
    set on one node; both put the replicas of a group on distinct nodes (placement groups); None
    leaves placement to Ray. `max_restarts`: how often Ray restarts a dead actor. `timeout_s`: how
    long a search waits for an expert before leaving it out. `start_timeout_s`: how long actors
    may take to start (resources, reading their files) before opening fails.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: float | None = None,
        replicas: int = 1,
        experts_per_actor: int | None = None,
        placement: str | None = "spread",
        max_restarts: int = 3,
        timeout_s: float = 2.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        if (
            (num_cpus is not None and num_cpus < 0)
            or replicas < 1
            or (experts_per_actor is not None and experts_per_actor < 1)
            or max_restarts < -1
        ):
            raise ValueError(
                f"RayBackend needs num_cpus >= 0, replicas >= 1, experts_per_actor >= 1 (None: chosen from the "
                f"cluster) and max_restarts >= -1 (-1: forever), got num_cpus={num_cpus}, replicas={replicas}, "
                f"experts_per_actor={experts_per_actor}, max_restarts={max_restarts}"
            )
        if placement is not None and placement not in PLACEMENTS:
            raise ValueError(f"placement must be 'spread', 'pack' or None, got {placement!r}")
        if timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError(f"timeout_s and start_timeout_s must be > 0 seconds, got {timeout_s}, {start_timeout_s}")
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        self.num_cpus = None if num_cpus is None else float(num_cpus)
        self.experts_per_actor = None if experts_per_actor is None else int(experts_per_actor)
        self.replicas, self.placement = int(replicas), placement
        self.max_restarts, self.timeout_s, self.start_timeout_s = (
            int(max_restarts),
            float(timeout_s),
            float(start_timeout_s),
        )
        self.plan: Layout | None = None  # the layout of the last open (what was chosen, and why)
        self.traffic = Traffic()
        self._actor = ray.remote(ExpertGroup)

    @property
    def calls(self) -> int:
        """Actor calls sent by searches: one per actor group contacted, plus retries and hedges."""
        return self.traffic.calls

    @property
    def sent_bytes(self) -> int:
        """Query vector bytes sent to experts (the communication volume)."""
        return self.traffic.sent_bytes

    @property
    def calls_by_node(self) -> dict[str, int]:
        """Actor calls sent by searches, by the node id of the actor called."""
        return self.traffic.calls_by_node()

    @staticmethod
    def nodes() -> list[NodeCpus]:
        """The cluster's live nodes and their CPUs, in all and free now."""
        free = available_resources_per_node()
        return [
            NodeCpus(n["NodeID"], n["Resources"].get("CPU", 0.0), free.get(n["NodeID"], {}).get("CPU", 0.0))
            for n in ray.nodes()
            if n["Alive"]
        ]

    def open(self, sources: Sequence[ExpertSource]) -> list[RemoteExpert]:
        if not sources:
            return []
        layout = plan_layout(
            len(sources), self.nodes(), self.replicas, self.placement, self.num_cpus, self.experts_per_actor
        )
        log.info("Ray backend: %s", layout.reason)
        self.plan = layout
        keyed = [(src.spec.name, src) for src in sources]
        step = layout.experts_per_actor
        first = sources[0]
        return self._handles([keyed[a : a + step] for a in range(0, len(keyed), step)], layout, first.dim, first.metric)

    def create(self, spec: ExpertSpec, dim: int, metric: str, xb: np.ndarray, ids: np.ndarray) -> RemoteExpert:
        # A new expert's actors reserve what the opened ones do; before any open, the share an actor
        # gets in the fullest automatic plan (SHARE of a CPU over ACTORS_PER_CPU actors).
        num_cpus = self.num_cpus
        if num_cpus is None:
            num_cpus = self.plan.num_cpus if self.plan is not None else SHARE / ACTORS_PER_CPU
        layout = plan_layout(1, self.nodes(), self.replicas, self.placement, num_cpus, 1)
        src = VectorSource(spec, metric, np.ascontiguousarray(xb, np.float32), np.asarray(ids, np.int64))
        return self._handles([[(spec.name, src)]], layout, dim, metric)[0]

    def _start(
        self, groups: list[list[tuple[str, ExpertSource]]], layout: Layout
    ) -> list[tuple[ReplicaSet, list[tuple[str, int, int]]]]:
        """Start `replicas` actors per group, placed as `layout` says; each group's replica set and
        its experts' (key, ntotal, max_id), once every actor has opened its experts."""
        deadline = time.monotonic() + self.start_timeout_s
        reservation = None
        if layout.slots:
            bundles = [{"CPU": round(c * layout.num_cpus, 4)} for c in layout.actors_per_bundle()]
            reservation = Reservation(placement_group(bundles, strategy="STRICT_SPREAD"))
        # Ray restarts an actor from its constructor arguments; put in the object store and held
        # by the experts' handles (ReplicaSet.pinned), they outlive the call (ray-project/ray#53727).
        pinned = [ray.put(group) for group in groups]
        actors = []
        for g, ref in enumerate(pinned):
            row = []
            for r in range(self.replicas):
                where = {}
                if reservation is not None:
                    where["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        reservation.pg, placement_group_bundle_index=layout.slots[g][r]
                    )
                # A call on an actor that dies fails at once (max_task_retries=0): the search's deadline decides.
                options = dict(num_cpus=layout.num_cpus, max_restarts=self.max_restarts, max_task_retries=0)
                row.append(self._actor.options(**options, **where).remote(ref))
            actors.append(row)
        try:
            if reservation is not None:
                ray.get(reservation.pg.ready(), timeout=self.start_timeout_s)  # the nodes' CPUs, reserved
            described = ray.get(
                [a.describe.remote() for row in actors for a in row], timeout=max(0.0, deadline - time.monotonic())
            )
        except (RayError, GetTimeoutError) as exc:
            for row in actors:
                for a in row:
                    ray.kill(a, no_restart=True)
            if reservation is not None:
                reservation.release()
            if isinstance(exc, GetTimeoutError):
                raise RuntimeError(
                    f"expert actors did not start within start_timeout_s={self.start_timeout_s:g} s "
                    f"(waiting for resources: {layout.reason}; or reading their files)"
                ) from exc
            text = str(exc)  # the actor's own error, as text: a bad checkpoint reads as it does locally
            marker = "CheckpointError: "
            if marker in text:
                raise CheckpointError(text[text.rindex(marker) + len(marker) :].strip().splitlines()[0]) from None
            raise RuntimeError(f"an expert actor failed to start: {text.strip().splitlines()[-1]}") from exc
        out = []
        for g, (row, ref, sources) in enumerate(zip(actors, pinned, groups)):
            mine = described[g * self.replicas : (g + 1) * self.replicas]
            group = ReplicaSet([key for key, _ in sources], row, [node for node, _ in mine], ref, reservation)
            out.append((group, mine[0][1]))
        return out

    def _handles(
        self, groups: list[list[tuple[str, ExpertSource]]], layout: Layout, dim: int, metric: str
    ) -> list[RemoteExpert]:
        out = []
        for (group, described), sources in zip(self._start(groups, layout), groups):
            for (key, src), (_, ntotal, max_id) in zip(sources, described):
                out.append(
                    RemoteExpert(src.spec, key, dim, metric, ntotal, max_id, group, self.timeout_s, self.traffic)
                )
        return out

    def search(self, jobs: Sequence[tuple[RemoteExpert, np.ndarray]], k: int) -> list[Answer]:
        return search_remote(jobs, k, self.timeout_s, self.traffic)

    def __repr__(self) -> str:
        plan = self.plan  # what "auto" chose at the last open
        num_cpus = (
            f"{self.num_cpus:g}" if self.num_cpus is not None else "auto" + (f":{plan.num_cpus:g}" if plan else "")
        )
        per_actor = self.experts_per_actor or "auto" + (f":{plan.experts_per_actor}" if plan else "")
        return (
            f"RayBackend(num_cpus={num_cpus}, replicas={self.replicas}, experts_per_actor={per_actor}, "
            f"placement={self.placement!r}, max_restarts={self.max_restarts}, timeout_s={self.timeout_s:g})"
        )

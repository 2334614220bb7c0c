"""Experts in Ray actors: each expert (or a group of experts) lives in an actor that builds it from its source.

Sources are descriptions (routing.backends.ExpertSource): a checkpoint's StoredExpert, which the
actor reads from the checkpoint's files itself, or vectors sent with it (VectorSource).

The router process keeps the gate, the manifest and the metadata store; the vectors live only in
the actors. A routed search sends each chosen expert its own queries, all experts at once, and
waits a bounded time: an expert whose actor died or did not answer in `timeout_s` is left out and
named (Answer None -> RoutedSearch.missing -> SearchHits.missing_experts), never waited on
forever. Ray restarts a dead actor (`max_restarts`); the restarted actor reads its files again.

Actors are never changed: lifecycle operations create new actors for new experts and the old ones
are retired by Ray when the last router holding their handles is gone (Ray's handle reference
counting), which gives the copy-on-write guarantee of the server: a search holds its router's
handles, so it sees the old set of experts or the new one.

Dimension legend: n vectors of an expert, m queries sent to it, d vector dim, k hits.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayError

from moe_router.errors import CheckpointError
from moe_router.index.expert import Content, Expert
from moe_router.routing.backends.base import Answer, ExpertSource, VectorSource
from moe_router.types import ExpertSpec

log = logging.getLogger(__name__)


class ExpertUnavailable(RuntimeError):
    """No replica of an expert answered within the backend's timeout."""


class ExpertGroup:
    """The body of an expert actor: some experts' FAISS indexes, built once from their sources."""

    def __init__(self, sources: list[tuple[str, ExpertSource]]) -> None:
        faiss.omp_set_num_threads(1)  # many actors share the cores; parallelism comes from the actors
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.experts: dict[str, Expert] = {}
        for key, src in sources:
            if not restarted:
                self.experts[key] = src.read()
                continue
            try:  # a restarted actor must hold exactly what it held: it checks what it reads
                self.experts[key] = src.read(recheck=True)
            except CheckpointError as exc:
                # Removed from the checkpoint since (a retired expert of this group): no router
                # asks for it any more; the group's other experts must still come back.
                log.warning("expert %r is not in the checkpoint any more; restarted without it (%s)", key, exc)

    def describe(self) -> list[tuple[str, int, int]]:
        """(key, ntotal, max_id) of each expert held."""
        return [(key, e.ntotal, e.max_id) for key, e in self.experts.items()]

    def search_many(self, jobs: list[tuple[str, np.ndarray]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(D, I) of each (expert key, xq (m, d)) job: a routed search's jobs for this actor in one call."""
        return [self.experts[key].search(xq, k) for key, xq in jobs]

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
        replicas: list[Any],
        pinned: Any,
        group: int,
        timeout_s: float,
        content: Content | None = None,
    ) -> None:
        self.spec = spec
        self.key = key  # what the actors call it (its name when it was created)
        self.dim, self.metric = dim, metric
        self.ntotal, self.max_id = ntotal, max_id
        self.replicas = replicas  # actor handles; holding them keeps the actors alive
        self.pinned = pinned  # ObjectRef of the actors' constructor arguments, needed to restart them
        self.group = group  # experts of one group share their actors (and a search's call to them)
        self.timeout_s = timeout_s
        self.content = content if content is not None else Content()
        self._turn = itertools.count()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def specialization(self) -> str:
        return self.spec.specialization

    @property
    def parent(self) -> str | None:
        return self.spec.parent

    def with_spec(self, spec: ExpertSpec) -> RemoteExpert:
        """The same actors under another description."""
        out = RemoteExpert(
            spec,
            self.key,
            self.dim,
            self.metric,
            self.ntotal,
            self.max_id,
            self.replicas,
            self.pinned,
            self.group,
            self.timeout_s,
            self.content,
        )
        out._turn = self._turn
        return out

    def turn(self) -> int:
        """Where this call starts in the replicas: round-robin over calls; a retry takes the next one."""
        return next(self._turn)

    def replica(self, turn: int, attempt: int = 0) -> Any:
        return self.replicas[(turn + attempt) % len(self.replicas)]

    def _read(self, what: str, *args: Any) -> Any:
        turn = self.turn()
        for attempt in range(len(self.replicas)):
            try:  # whole vectors may be large: more time than a search
                return ray.get(
                    self.replica(turn, attempt).read.remote(self.key, what, *args), timeout=self.timeout_s * 10
                )
            except (RayError, GetTimeoutError) as exc:
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
        answer = RayBackend.search_with([(self, xq)], k, self.timeout_s)[0]
        if answer is None:
            raise ExpertUnavailable(f"expert {self.name!r} did not answer within {self.timeout_s} s")
        return answer

    def __repr__(self) -> str:
        return f"RemoteExpert({self.name!r}, ntotal={self.ntotal}, replicas={len(self.replicas)})"


class RayBackend:
    """Experts in Ray actors: `experts_per_actor` experts an actor, `replicas` actors holding each group.

    `address`: the cluster to join (ray.init's rules: None joins RAY_ADDRESS or the cluster `ray start`
    last started on this machine, else starts a local one; "auto" joins or fails); a process that has
    already joined a cluster keeps using it. `num_cpus`: CPUs Ray reserves for each actor (fractions let many
    experts share a core). `max_restarts`: how often Ray restarts a dead actor. `timeout_s`: how
    long a search waits for an expert before leaving it out. `start_timeout_s`: how long actors
    may take to start (resources, reading their files) before opening fails.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: float = 1.0,
        replicas: int = 1,
        experts_per_actor: int = 1,
        max_restarts: int = 3,
        timeout_s: float = 2.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        if num_cpus < 0 or replicas < 1 or experts_per_actor < 1 or max_restarts < -1:
            raise ValueError(
                f"RayBackend needs num_cpus >= 0, replicas >= 1, experts_per_actor >= 1 and "
                f"max_restarts >= -1 (-1: forever), got num_cpus={num_cpus}, replicas={replicas}, "
                f"experts_per_actor={experts_per_actor}, max_restarts={max_restarts}"
            )
        if timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError(f"timeout_s and start_timeout_s must be > 0 seconds, got {timeout_s}, {start_timeout_s}")
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        self.num_cpus, self.replicas, self.experts_per_actor = float(num_cpus), int(replicas), int(experts_per_actor)
        self.max_restarts, self.timeout_s, self.start_timeout_s = (
            int(max_restarts),
            float(timeout_s),
            float(start_timeout_s),
        )
        self.sent_bytes = 0  # query vector bytes sent to experts (the communication volume)
        self.calls = 0  # actor calls made by searches (one per actor group contacted)
        self._groups = itertools.count()  # ids of actor groups
        # A call on an actor that dies fails at once (max_task_retries=0): the search's deadline decides.
        self._actor = ray.remote(ExpertGroup).options(
            num_cpus=self.num_cpus, max_restarts=self.max_restarts, max_task_retries=0
        )

    def _start(self, groups: list[list[tuple[str, ExpertSource]]]) -> tuple[list[list[Any]], list[Any]]:
        """Start `replicas` actors per group; (their handles per group, each group's pinned sources),
        once every actor has opened its experts."""
        need = self.num_cpus * self.replicas * len(groups)
        have = ray.cluster_resources().get("CPU", 0.0)
        if need > have:  # a bad setting for this cluster: fail now rather than wait for resources
            raise ValueError(
                f"the Ray backend needs {need:g} CPUs ({len(groups)} actors x {self.replicas} replicas x "
                f"num_cpus={self.num_cpus:g}) but the cluster has {have:g}; lower num_cpus, raise "
                f"experts_per_actor or add nodes"
            )
        # Ray restarts an actor from its constructor arguments; put in the object store and held
        # by the experts' handles (RemoteExpert.pinned), they outlive the call (ray-project/ray#53727).
        pinned = [ray.put(group) for group in groups]
        actors = [[self._actor.remote(ref) for _ in range(self.replicas)] for ref in pinned]
        refs = [a.describe.remote() for row in actors for a in row]
        try:
            ray.get(refs, timeout=self.start_timeout_s)
        except (RayError, GetTimeoutError) as exc:
            for row in actors:
                for a in row:
                    ray.kill(a, no_restart=True)
            if isinstance(exc, GetTimeoutError):
                raise RuntimeError(
                    f"expert actors did not start within start_timeout_s={self.start_timeout_s:g} s "
                    f"(waiting for resources, or reading their files)"
                ) from exc
            text = str(exc)  # the actor's own error, as text: a bad checkpoint reads as it does locally
            marker = "CheckpointError: "
            if marker in text:
                raise CheckpointError(text[text.rindex(marker) + len(marker) :].strip().splitlines()[0]) from None
            raise RuntimeError(f"an expert actor failed to start: {text.strip().splitlines()[-1]}") from exc
        return actors, pinned

    def _handles(self, groups: list[list[tuple[str, ExpertSource]]], dim: int, metric: str) -> list[RemoteExpert]:
        actors, pinned = self._start(groups)
        described = ray.get([row[0].describe.remote() for row in actors])
        out = []
        for row, ref, group_sources, desc in zip(actors, pinned, groups, described):
            group = next(self._groups)
            for (key, src), (_, ntotal, max_id) in zip(group_sources, desc):
                out.append(RemoteExpert(src.spec, key, dim, metric, ntotal, max_id, row, ref, group, self.timeout_s))
        return out

    def open(self, sources: Sequence[ExpertSource]) -> list[RemoteExpert]:
        if not sources:
            return []
        keyed = [(src.spec.name, src) for src in sources]
        step = self.experts_per_actor
        first = sources[0]
        return self._handles([keyed[a : a + step] for a in range(0, len(keyed), step)], first.dim, first.metric)

    def create(self, spec: ExpertSpec, dim: int, metric: str, xb: np.ndarray, ids: np.ndarray) -> RemoteExpert:
        src = VectorSource(spec, metric, np.ascontiguousarray(xb, np.float32), np.asarray(ids, np.int64))
        return self._handles([[(spec.name, src)]], dim, metric)[0]

    def search(self, jobs: Sequence[tuple[RemoteExpert, np.ndarray]], k: int) -> list[Answer]:
        self.sent_bytes += sum(int(xq.nbytes) for _, xq in jobs)
        self.calls += len({expert.group for expert, _ in jobs})
        return self.search_with(jobs, k, self.timeout_s)

    @staticmethod
    def search_with(jobs: Sequence[tuple[RemoteExpert, np.ndarray]], k: int, timeout_s: float) -> list[Answer]:
        """Every job's search sent at once, one call per actor group (its experts' jobs together);
        a failed replica is retried on the next one while time is left.

        Returns None for a job no replica answered before the deadline (a dead actor being
        restarted, or one slower than `timeout_s`).
        """
        deadline = time.monotonic() + timeout_s
        answers: list[Answer] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}  # actor group -> its jobs
        for j, (expert, _) in enumerate(jobs):
            groups.setdefault(expert.group, []).append(j)
        turns = {g: jobs[idx[0]][0].turn() for g, idx in groups.items()}

        def send(g: int, attempt: int) -> Any:
            idx = groups[g]
            actor = jobs[idx[0]][0].replica(turns[g], attempt)
            return actor.search_many.remote([(jobs[j][0].key, jobs[j][1]) for j in idx], k)

        pending = {send(g, 0): (g, 0) for g in groups}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=left)
            if not ready:
                break
            for ref in ready:
                g, attempt = pending.pop(ref)
                first = jobs[groups[g][0]][0]
                try:
                    for j, answer in zip(groups[g], ray.get(ref)):
                        answers[j] = answer
                except RayError as exc:
                    log.warning("expert actor of %r: replica %d failed (%s)", first.name, attempt, type(exc).__name__)
                    if attempt + 1 < len(first.replicas):
                        pending[send(g, attempt + 1)] = (g, attempt + 1)
        return answers

    def __repr__(self) -> str:
        return (
            f"RayBackend(num_cpus={self.num_cpus:g}, replicas={self.replicas}, experts_per_actor="
            f"{self.experts_per_actor}, max_restarts={self.max_restarts}, timeout_s={self.timeout_s:g})"
        )

"""The served router: copy-on-write snapshots, durable mutations through saves.

Readers take a lease on the current snapshot and use it to the end of their request. A change
to the expert set (add, remove, merge, split) forks the router, changes the fork, saves it as a
new version of the checkpoint, and only then swaps it in. A reader therefore sees the old set of
experts or the new one, never a mix, and nothing a client was told succeeded can be lost by a
crash, because every write reaches the disk the one way a checkpoint changes, Router.save:

- feedback is added to the served router's in-memory store and the router is saved (a new
  version; unchanged files are hard-linked after a stat check, so only the store, the gate and
  the manifest are written) before the reply; rows that arrive while a save runs share the next
  one (group commit). If the save fails the rows are taken out again and their clients get an
  error: memory and disk still agree;
- an expert change is acknowledged only after Router.save has switched CURRENT to the new version.

Saves are serialised by one lock: one save at a time, in this process. Another process must not
save the same checkpoint meanwhile (several writer processes are not supported). Any failure of a
save (the disk, the writer's own schema check, SQLite) is a PersistError: nothing changed.

Routing statistics are part of the state. The fork an expert change saves holds the counts of its
fork time; searches still running on the old snapshot go on counting there, and once its last
lease ends what they counted since the fork is carried into the snapshot then current (by expert
name: an expert the change removed, merged or split drops its share, as Router.update does). Counts
reach the disk with the next save (any feedback or change) and at a graceful shutdown (flush); a
kill -9 loses the counts since the last save, never an acknowledged write.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np
import torch

from moe_router.checkpoint.format import current_version
from moe_router.index.expert import Expert
from moe_router.lifecycle import merge_experts, split_expert
from moe_router.routing.backends import ExpertBackend
from moe_router.routing.parts import Change, RouterParts
from moe_router.routing.router import Router
from moe_router.routing.stats import RoutingStats
from moe_router.types import ExpertSpec

log = logging.getLogger(__name__)
T = TypeVar("T")


class ExpertConflict(ValueError):
    """The change contradicts the current expert set (duplicate name, removing the last expert)."""


class PersistError(RuntimeError):
    """The change was valid but could not be written to disk; nothing was changed."""


class UnknownExpert(KeyError):
    """A change names an expert the served router does not have."""


@dataclass
class Snapshot:
    """One immutable-by-convention router and its generation (bumped by every expert change)."""

    router: Router
    generation: int
    leases: int = 0
    retired: bool = False
    forked: RoutingStats | None = None  # its stats when the change that replaced it forked it
    forked_names: list[str] = field(default_factory=list)  # its experts then, in the order of `forked`


def _known(router: Router, *names: str) -> None:
    """UnknownExpert naming the known experts when one of `names` is not an expert of `router`."""
    try:
        router.expert_indices(list(names))
    except KeyError as exc:
        raise UnknownExpert(*exc.args) from None


def _counts(router: Router) -> dict[str, int]:
    """Queries routed to each expert so far (what a stats-only save would change)."""
    return {s.name: s.queries for s in router.stats()}


def _current_or_none(ckpt: Path) -> int | None:
    """The checkpoint's current version, or None when it cannot be read (then a failed save may have switched it)."""
    try:
        return current_version(ckpt)
    except Exception:
        return None


def _free_names(router: Router, names: Sequence[str]) -> None:
    """ExpertConflict when one of `names` is already an expert's."""
    taken = [n for n in names if n in router.expert_names]
    if taken:
        raise ExpertConflict(f"an expert named {taken[0]!r} already exists; expert names must be unique")


class RouterState:
    """The checkpoint being served: leases for readers, serialised durable writes for mutations."""

    def __init__(
        self,
        ckpt: str | Path,
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        backend: str | ExpertBackend = "local",
    ) -> None:
        self.ckpt = Path(ckpt)
        self.threads = threads  # torch + FAISS threads per pass (None: the libraries' defaults)
        if threads is not None:
            torch.set_num_threads(int(threads))
        router = Router.load(self.ckpt, cache_dir=cache_dir, backend=backend)  # where the experts live
        if router.gate is None:
            raise ValueError(f"checkpoint {self.ckpt} has no gate; train one first (scripts/train.py)")
        self._current = Snapshot(router, 0)
        self._swap_lock = threading.Lock()  # guards _current and the lease counts
        self._write_lock = threading.Lock()  # one save at a time (held while it runs)
        # Feedback is recorded under _record_lock, which a save does not hold: rows recorded while a
        # save runs wait together for the next one (group commit). Lock order: _write_lock, then _record_lock.
        self._record_lock = threading.Lock()
        self._saved = threading.Condition(self._record_lock)  # notified when a feedback save ends
        self._pending: set[int] = set()  # feedback rows in memory, not yet taken by a save
        self._in_flight: set[int] = set()  # rows the running feedback save holds
        self._committing = False  # a request is saving the pending rows (the others wait for it)
        self._lost: set[int] = set()  # rows whose save failed (taken out again); their requests get PersistError
        self.failed: str | None = None  # set when a save could not be followed through; writes then refuse
        self._saved_counts = _counts(router)  # routing counts the checkpoint on disk holds (as far as we know)
        self.dim = router.dim
        self.metric = router.metric

    def pin_threads(self) -> None:
        """Apply `threads` to the calling thread: FAISS's OpenMP setting is per thread, so each
        thread that runs passes (the batch worker, the pool threads of the unbatched path) calls this."""
        if self.threads is not None and faiss.omp_get_max_threads() != self.threads:
            faiss.omp_set_num_threads(int(self.threads))

    @property
    def generation(self) -> int:
        return self._current.generation

    @contextmanager
    def lease(self) -> Iterator[Snapshot]:
        """The current snapshot, kept open (its store not closed) until the block ends."""
        with self._swap_lock:
            snap = self._current
            snap.leases += 1
        try:
            yield snap
        finally:
            with self._swap_lock:
                snap.leases -= 1
                close = snap.retired and snap.leases == 0
                if close:
                    self._carry(snap)
            if close:
                snap.router.close()

    def record_feedback(self, query: str | np.ndarray, expert: str, positive: bool) -> int:
        """Record one feedback row and save the checkpoint with it; returns its id. UnknownExpert: no such expert.

        The row is acknowledged only once a save holding it has switched CURRENT (PersistError
        otherwise, with the row taken out again). Rows that arrive while a save runs are recorded
        when it ends and share the next save, so concurrent feedback costs one save per batch, not
        per row, and a save never holds a row it was not asked to keep.
        """
        with self._saved:
            self._check_writable()
            while self._in_flight:  # a save is reading the store: a row recorded now could reach the disk in it
                self._saved.wait()  # and then be refused with the next batch (acknowledged never, kept anyway)
                self._check_writable()
            with self.lease() as snap:
                _known(snap.router, expert)
                seq = snap.router.record_feedback(query, expert, positive)
            self._pending.add(seq)
            while (seq in self._pending and self._committing) or seq in self._in_flight:
                self._saved.wait()  # a save is running: the next one takes every row recorded meanwhile
            if seq not in self._pending:  # a save that has ended took it
                return self._outcome(seq)  # (the lock is held: _outcome does not take it)
            self._committing = True  # this request saves every pending row
        try:
            with self._write_lock:
                with self._saved:
                    batch, self._pending, self._in_flight = self._pending, set(), self._pending
                if batch:
                    with self.lease() as snap:
                        try:
                            self._save(snap.router, recheck=False)  # expert files were hashed when loaded or written
                        except BaseException:
                            for row in batch:
                                snap.router.forget_feedback(row)
                            with self._saved:
                                self._lost |= batch - {seq}  # this request gets the error itself
                            raise
        finally:  # success or not, the waiting requests learn their rows' fate
            with self._saved:
                self._committing = False
                self._in_flight = set()
                self._saved.notify_all()
        return seq  # saved (a failed save raised above)

    def _outcome(self, seq: int) -> int:
        """`seq` once the save that took it has ended: PersistError if that save failed. Hold _record_lock."""
        if seq in self._lost:
            self._lost.discard(seq)
            raise PersistError(f"could not save the checkpoint {self.ckpt}; feedback #{seq} was not kept")
        return seq

    def add_expert(
        self,
        spec: ExpertSpec,
        vectors: np.ndarray | None = None,
        texts: Sequence[str] | None = None,
        metadata: Sequence[dict] | None = None,
    ) -> tuple[Expert, int]:
        """Add the expert `spec` describes, save the checkpoint, swap it in; the expert and the new generation."""

        def check(router: Router) -> None:
            _free_names(router, [spec.name])

        def change(fork: Router) -> Expert:
            return fork.add_expert(spec, vectors, texts, metadata=metadata)

        return self._change(check, change)

    def remove_expert(self, name: str) -> int:
        """Remove an expert, save the checkpoint, swap it in; returns the new generation."""

        def check(router: Router) -> None:
            _known(router, name)
            if router.num_experts == 1:
                raise ExpertConflict(f"{name!r} is the only expert; a router needs at least one")

        return self._change(check, lambda fork: fork.remove_expert(name))[1]

    def merge_experts(
        self, a: str, b: str, name: str | None = None, specialization: str | None = None
    ) -> tuple[Expert, int]:
        """Merge two experts into one (lifecycle.merge_experts), save, swap in; the merged expert and the generation."""

        def check(router: Router) -> None:
            _known(router, a, b)
            if name is not None and name not in (a, b):
                _free_names(router, [name])

        return self._change(check, lambda fork: merge_experts(fork, a, b, name, specialization))

    def split_expert(self, name: str, parts: int = 2, names: Sequence[str] | None = None) -> tuple[list[Expert], int]:
        """Split an expert by k-means (lifecycle.split_expert), save, swap in; the parts and the generation."""

        def check(router: Router) -> None:
            _known(router, name)
            _free_names(router, [n for n in (names or []) if n != name])

        return self._change(check, lambda fork: split_expert(fork, name, parts, names))

    def _change(self, check: Callable[[Router], None], change: Callable[[Router], T]) -> tuple[T, int]:
        """One durable expert change: check it against the served router, make it on a copy, save, swap.

        A failed check, change or save leaves the served router and the checkpoint as they were.
        """
        with self._write_lock, self._record_lock:  # no feedback lands in the old store between the copy and the swap
            self._check_writable()
            with self.lease() as snap:
                check(snap.router)
                fork = snap.router.fork(private_store=True)
                forked = fork.parts().stats  # what the fork holds; the old snapshot counts on from here
            try:
                result = change(fork)
                self._save(fork, recheck=True)
            except BaseException:
                fork.close()
                raise
            self._pending.clear()  # the fork's store held them: they are saved now
            generation = self._swap(fork, forked, snap.router.expert_names)
            self._saved.notify_all()
            return result, generation

    def _check_writable(self) -> None:
        if self.failed is not None:
            raise PersistError(f"writes are off until a restart: {self.failed}")

    def _save(self, router: Router, recheck: bool) -> None:
        """Save `router` as the checkpoint's new version; PersistError (nothing changed on disk) when it cannot be.

        Whatever the failure (the disk, the writer's own schema check, SQLite, a bug), the client is
        told the change was not kept: a 503, never a 500 or a reset connection, and never a 422 (the
        writer's CheckpointError is a ValueError). The traceback is logged.
        """
        counts = _counts(router)
        before = None
        try:
            before = current_version(self.ckpt)
            router.save(self.ckpt, recheck=recheck)
        except Exception as exc:
            log.exception("saving the checkpoint %s failed", self.ckpt)
            if before is not None and _current_or_none(self.ckpt) != before:
                # CURRENT was switched but the save failed after (an fsync): the disk holds a version the
                # served router may not match; refuse writes until a restart loads it.
                self.failed = f"the checkpoint was saved but the save could not be finished ({exc})"
                log.error("%s; restart the server to serve the saved checkpoint", self.failed)
            raise PersistError(f"could not save the checkpoint {self.ckpt}: {exc}") from exc
        self._saved_counts = counts

    def flush(self) -> bool:
        """Save the checkpoint if routing counts changed since the last save (a graceful shutdown); whether it did.

        A stats-only save: unchanged expert files are hard-linked after a stat check. A failure is
        logged, not raised: the server is stopping, and only counts since the last save are lost.
        """
        with self._write_lock, self._record_lock:
            if self.failed is not None:
                log.error("routing statistics since the last save are not saved: %s", self.failed)
                return False
            with self.lease() as snap:
                if _counts(snap.router) == self._saved_counts:
                    return False
                try:
                    self._save(snap.router, recheck=False)
                except PersistError as exc:
                    log.error("routing statistics since the last save are lost: %s", exc)
                    return False
            self._pending.clear()  # the store saved with them held any rows still waiting: they are saved now
            self._saved.notify_all()
            return True

    def _swap(self, fork: Router, forked: RoutingStats, forked_names: list[str]) -> int:
        """Serve `fork`; the old snapshot's counts since `forked` are carried into it when its last lease ends."""
        with self._swap_lock:
            old = self._current
            old.forked, old.forked_names = forked, forked_names
            self._current = Snapshot(fork, old.generation + 1)
            old.retired = True
            close = old.leases == 0
            if close:
                self._carry(old)
        if close:
            old.router.close()  # else the last lease closes it
        return old.generation + 1

    def _carry(self, old: Snapshot) -> None:
        """Add what `old` counted since it was forked to the current snapshot, by expert name. Hold _swap_lock.

        Under the lock nothing retires the current snapshot meanwhile; counts added to it after a later
        fork of it are part of what it counts since, so they are carried on in turn, never twice.
        """
        if old.forked is None:
            return
        delta = old.router.parts().stats.since(old.forked)
        names = old.forked_names

        def plan(parts: RouterParts) -> Change:
            return Change(parts.replace(stats=parts.stats.carried(delta, names, parts.names)))

        self._current.router.update(plan)

    def close(self) -> None:
        with self._write_lock, self._swap_lock:
            self._current.retired = True
            if self._current.leases == 0:
                self._current.router.close()

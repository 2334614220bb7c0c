"""One expert = a FAISS flat index over its vectors + their ids; metadata lives in SQLite.

FAISS vocabulary: xb stored vectors (n, d), xq queries (nq, d), results (D, I) of shape (nq, k).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import faiss
import numpy as np

from moe_router.vectors import check_metric

# FAISS only takes its BLAS path at >= 128000 / d queries per call (334 at d = 384). A routed
# search sends each expert a slice of the batch, so we lower the threshold: measured here,
# 20 turned a 0.65x slowdown into a 6x speed-up for 2-of-16 shards (DESIGN.md).
BLAS_THRESHOLD = 20


def lower_blas_threshold(threshold: int = BLAS_THRESHOLD) -> None:
    """Lower FAISS's process-wide BLAS threshold to `threshold` (never raises it)."""
    if faiss.cvar.distance_compute_blas_threshold > threshold:
        faiss.cvar.distance_compute_blas_threshold = threshold


# One FAISS search parallelises inside itself with OpenMP, two barriers per block of 1024 stored
# vectors; on a busy, shared CPU a barrier waits for a descheduled thread. Several experts'
# searches instead run side by side, one FAISS thread each, with no barrier at all: measured here at
# 1M x 384, 2-of-16 experts, batch 1,000, 2 cores under load, 12.5 s -> 1.9 s (docs/speed.md).
_MIN_SPLIT_ROWS = 64  # never split a search into pieces smaller than this (keeps each on FAISS's BLAS path)
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)
_pool_lock = threading.Lock()


def _expert_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            # omp_set_num_threads in a worker sets that thread's own OpenMP setting only.
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="moe_router-expert",
                                                 initializer=faiss.omp_set_num_threads, initargs=(1,)))
        return _pool[1]


def _forget_pool_after_fork() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # the parent's worker threads do not exist in the child


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def search_each(jobs: Sequence[tuple["Expert", np.ndarray]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(D, I) of each (expert, xq) search; several run side by side, one FAISS thread each.

    Uses as many workers as FAISS has OpenMP threads (faiss.omp_set_num_threads / OMP_NUM_THREADS);
    with one thread or one job it is a plain loop. A search holding more than its share of the work
    is cut into pieces of queries (at least _MIN_SPLIT_ROWS each), so the workers finish together.
    """
    workers = faiss.omp_get_max_threads()
    if workers < 2 or len(jobs) < 2:
        return [expert.search(xq, k) for expert, xq in jobs]
    work = [len(xq) * expert.ntotal for expert, xq in jobs]
    share = sum(work) / workers
    pieces = []  # (job, first row, end row)
    for j, (expert, xq) in enumerate(jobs):
        n = max(1, min(int(np.ceil(work[j] / share)), len(xq) // _MIN_SPLIT_ROWS))
        bounds = np.linspace(0, len(xq), n + 1).astype(int)
        pieces += [(j, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    pieces.sort(key=lambda p: -(p[2] - p[1]) * jobs[p[0]][0].ntotal)  # largest first: the workers end together
    pool = _expert_pool(workers)
    futures = [pool.submit(jobs[j][0].search, jobs[j][1][a:b], k) for j, a, b in pieces]
    parts: list[list] = [[] for _ in jobs]
    for (j, a, _), f in sorted(zip(pieces, futures), key=lambda pf: (pf[0][0], pf[0][1])):
        parts[j].append(f.result())
    return [(np.concatenate([D for D, _ in p]), np.concatenate([I for _, I in p])) for p in parts]


def worst_score(metric: str) -> float:
    """The padding score that sorts after every real hit."""
    return -np.inf if metric == "ip" else np.inf


@dataclass(frozen=True)
class SavedCopy:
    """Files that hold exactly an expert's current vectors and ids, with their sha256 (set by save/load).

    A later save links these files into the new checkpoint (after checking them) instead of
    writing them again; any change to the expert's rows clears it.
    """

    vectors: Path
    ids: Path
    vectors_sha256: str
    ids_sha256: str


@dataclass
class Expert:
    """A named FAISS flat index. Vectors are expected already checked (and normalised for 'ip')."""

    name: str
    dim: int
    metric: str = "ip"
    specialization: str = ""
    parent: str | None = None
    saved: SavedCopy | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_metric(self.metric)
        self.index = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        self.ids = np.empty(0, dtype=np.int64)  # (n,) global id of each stored row

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, xb: np.ndarray, ids: np.ndarray) -> None:
        if xb.shape[0] != len(ids):
            raise ValueError(f"expert {self.name!r}: {xb.shape[0]} vectors but {len(ids)} ids")
        self.index.add(np.ascontiguousarray(xb, dtype=np.float32))
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.saved = None

    def add_in_place(self, ids: np.ndarray) -> np.ndarray:
        """Append len(ids) zero rows with these ids; return them as a writable (n, d) float32 view to fill.

        Lets a checkpoint be read straight into the index, without a second copy of the vectors in
        memory. Fill the rows before the expert is searched.
        """
        start, n = self.ntotal, len(ids)
        self.index.codes.resize((start + n) * self.index.code_size)
        self.index.ntotal = start + n
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.saved = None
        xb = faiss.rev_swig_ptr(self.index.get_xb(), (start + n) * self.dim)  # a view of the index's memory
        return xb.reshape(start + n, self.dim)[start:]

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over this expert: (D, I) of shape (nq, k) with global ids, -1 padded."""
        nq = xq.shape[0]
        D = np.full((nq, k), worst_score(self.metric), dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        if kk == 0:
            return D, I
        Dk, rows = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), kk)
        D[:, :kk] = Dk
        I[:, :kk] = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        return D, I

    def vectors(self) -> np.ndarray:
        """A copy of the stored vectors (n, d), in insertion order."""
        if self.ntotal == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim).copy()

    def centroid(self) -> np.ndarray:
        """Mean vector (d,); for 'ip' re-normalised so it compares like a query."""
        c = self.vectors().mean(axis=0)
        if self.metric == "ip":
            c = c / max(float(np.linalg.norm(c)), 1e-12)
        return c.astype(np.float32)

    def prototypes(self, m: int, seed: int = 0) -> np.ndarray:
        """(min(m, n), d) k-means centroids of this expert's vectors (spherical for 'ip'); all vectors if n <= m."""
        xb = self.vectors()
        if len(xb) <= m:
            return xb
        km = faiss.Kmeans(self.dim, m, niter=20, seed=seed, spherical=self.metric == "ip",
                          min_points_per_centroid=1, max_points_per_centroid=256)
        km.train(xb)
        return np.ascontiguousarray(km.centroids, dtype=np.float32)

    def remove_ids(self, ids: Iterable[int]) -> int:
        """Delete the rows with these global ids; returns how many were removed."""
        drop = np.isin(self.ids, np.fromiter(ids, dtype=np.int64))
        if not drop.any():
            return 0
        keep_vectors = self.vectors()[~drop]
        self.index.reset()
        self.index.add(keep_vectors)
        removed = int(drop.sum())
        self.ids = self.ids[~drop]
        self.saved = None
        return removed


_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    expert TEXT NOT NULL,
    text TEXT,
    payload TEXT
);
CREATE INDEX IF NOT EXISTS items_expert ON items(expert);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    query TEXT,
    vector BLOB,
    expert TEXT NOT NULL,
    positive INTEGER NOT NULL,
    created REAL NOT NULL,
    removed REAL  -- when its expert was removed (kept as an audit log); NULL while the expert exists
);
"""


class MetadataStore:
    """Per-vector metadata (text, JSON payload) keyed by global id, in SQLite.

    `path=None` keeps it in memory until the router is saved; a loaded checkpoint's store is
    the file inside the checkpoint, opened in WAL mode so writes are durable.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.RLock()
        try:
            self.conn = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False)
            if self.path:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
                status = self.conn.execute("PRAGMA quick_check").fetchone()[0]
                if status != "ok":
                    raise sqlite3.DatabaseError(status)
            self.conn.executescript(_SCHEMA)
            columns = {row[1] for row in self.conn.execute("PRAGMA table_info(feedback)")}
            if "removed" not in columns:  # a store written before feedback of removed experts was set apart
                with self.conn:
                    self.conn.execute("ALTER TABLE feedback ADD COLUMN removed REAL")
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"metadata store {self.path} is not a valid SQLite database: {exc}") from None

    def add(self, ids: Sequence[int], expert: str, texts: Sequence[str | None], payloads: Sequence[dict | None]) -> None:
        rows = [
            (int(i), expert, t, json.dumps(p) if p is not None else None)
            for i, t, p in zip(ids, texts, payloads, strict=True)
        ]
        with self._lock, self.conn:
            self.conn.executemany("INSERT INTO items (id, expert, text, payload) VALUES (?, ?, ?, ?)", rows)

    def get(self, ids: Iterable[int]) -> dict[int, tuple[str | None, dict]]:
        """id -> (text, payload) for the ids that exist."""
        wanted = sorted({int(i) for i in ids if i >= 0})
        out: dict[int, tuple[str | None, dict]] = {}
        with self._lock:
            for start in range(0, len(wanted), 900):  # SQLite's default limit on bound parameters is 999
                chunk = wanted[start : start + 900]
                marks = ",".join("?" * len(chunk))
                for i, text, payload in self.conn.execute(
                    f"SELECT id, text, payload FROM items WHERE id IN ({marks})", chunk
                ):
                    out[i] = (text, json.loads(payload) if payload else {})
        return out

    def max_id(self) -> int:
        with self._lock:
            row = self.conn.execute("SELECT MAX(id) FROM items").fetchone()
        return -1 if row[0] is None else int(row[0])

    def rename_expert(self, old: str, new: str) -> None:
        with self._lock, self.conn:
            self.conn.execute("UPDATE items SET expert = ? WHERE expert = ?", (new, old))

    def delete_expert(self, name: str) -> None:
        """Delete the expert's items; its feedback stays as an audit log, set apart from any later expert of that name."""
        with self._lock, self.conn:
            self.conn.execute("DELETE FROM items WHERE expert = ?", (name,))
            self.conn.execute("UPDATE feedback SET removed = ? WHERE expert = ? AND removed IS NULL", (time.time(), name))

    def set_expert(self, ids: Sequence[int], expert: str) -> None:
        with self._lock, self.conn:
            self.conn.executemany("UPDATE items SET expert = ? WHERE id = ?", [(expert, int(i)) for i in ids])

    def add_feedback(self, query: str | None, vector: np.ndarray, expert: str, positive: bool) -> int:
        with self._lock, self.conn:
            cur = self.conn.execute(
                "INSERT INTO feedback (query, vector, expert, positive, created) VALUES (?, ?, ?, ?, ?)",
                (query, np.asarray(vector, dtype=np.float32).tobytes(), expert, int(positive), time.time()),
            )
        return int(cur.lastrowid)

    def feedback(
        self, expert: str | None = None, include_removed: bool = False,
    ) -> list[tuple[int, str | None, np.ndarray, str, bool, float]]:
        """(seq, query text, query vector, expert, positive, unix time) rows, oldest first.

        Rows of removed experts are left out unless `include_removed` (the full audit log).
        """
        where = [] if include_removed else ["removed IS NULL"]
        args: tuple = ()
        if expert is not None:
            where.append("expert = ?")
            args = (expert,)
        sql = "SELECT seq, query, vector, expert, positive, created FROM feedback"
        sql += " WHERE " + " AND ".join(where) if where else ""
        with self._lock:
            rows = self.conn.execute(sql + " ORDER BY seq", args).fetchall()
        return [(s, q, np.frombuffer(v, dtype=np.float32), e, bool(p), c) for s, q, v, e, p, c in rows]

    def backup_to(self, path: Path) -> None:
        """Copy the whole store into a new SQLite file at `path` (consistent even while in use)."""
        with self._lock:
            dest = sqlite3.connect(str(path))
            try:
                self.conn.backup(dest)
            finally:
                dest.close()

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # Expert lifecycle (moe_router.lifecycle): several changes in one transaction, so a failing
    # operation leaves the store as it was.

    def apply_changes(
        self,
        item_moves: Sequence[tuple[Sequence[int], str]] = (),
        feedback_moves: Sequence[tuple[Sequence[int], str]] = (),
    ) -> None:
        """Move items (by id) and feedback rows (by seq) to other experts, all or nothing."""
        with self._lock, self.conn:
            for ids, expert in item_moves:
                self.conn.executemany("UPDATE items SET expert = ? WHERE id = ?", [(expert, int(i)) for i in ids])
            for seqs, expert in feedback_moves:
                self.conn.executemany("UPDATE feedback SET expert = ? WHERE seq = ?", [(expert, int(s)) for s in seqs])

    def feedback_counts(self) -> dict[str, tuple[int, int]]:
        """expert -> (feedback rows, positive rows)."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT expert, COUNT(*), SUM(positive) FROM feedback WHERE removed IS NULL GROUP BY expert").fetchall()
        return {e: (int(n), int(p or 0)) for e, n, p in rows}

    def experts_of(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> expert name recorded for the item."""
        wanted = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        with self._lock:
            for start in range(0, len(wanted), 900):
                chunk = wanted[start : start + 900]
                marks = ",".join("?" * len(chunk))
                out.update(self.conn.execute(f"SELECT id, expert FROM items WHERE id IN ({marks})", chunk).fetchall())
        return out

    def in_memory_copy(self) -> "MetadataStore":
        """A private in-memory copy: changes to it never touch this store's file (saved later, atomically)."""
        copy = MetadataStore(None)
        with self._lock:
            self.conn.backup(copy.conn)
        return copy


def ensure_unique(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"duplicate expert name {n!r}; expert names must be unique")
        seen.add(n)


def payloads_or_none(payloads: Sequence[dict[str, Any]] | None, n: int) -> list[dict | None]:
    if payloads is None:
        return [None] * n
    if len(payloads) != n:
        raise ValueError(f"got {len(payloads)} metadata entries for {n} vectors; expected one per vector")
    return list(payloads)

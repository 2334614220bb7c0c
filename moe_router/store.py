"""Per-vector metadata (text, JSON payload) and the feedback log, in SQLite."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_router.sqlite import select_in
from moe_router.types import FeedbackRecord

SCHEMA = """
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

    `path=None` keeps it in memory until the router is saved; so is a loaded checkpoint's store
    (from_image: a private copy, so nothing reaches the checkpoint before Router.save). A `path`
    opens that file in WAL mode, and every write goes to it at once.
    """

    def __init__(self, path: str | Path | None = None, image: bytes | None = None) -> None:
        self.path = Path(path) if path is not None and image is None else None
        self._lock = threading.RLock()
        what = path if path is not None else "(in memory)"
        try:
            self.conn = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False)
            if image is not None:
                self._load_image(image, what)
            if self.path:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
            if self.path or image is not None:
                status = self.conn.execute("PRAGMA quick_check").fetchone()[0]
                if status != "ok":
                    raise sqlite3.DatabaseError(status)
            self.conn.executescript(SCHEMA)
            columns = {row[1] for row in self.conn.execute("PRAGMA table_info(feedback)")}
            if "removed" not in columns:  # a store written before feedback of removed experts was set apart
                with self.conn:
                    self.conn.execute("ALTER TABLE feedback ADD COLUMN removed REAL")
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"metadata store {what} is not a valid SQLite database: {exc}") from None

    @classmethod
    def from_image(cls, image: bytes, what: str | Path) -> MetadataStore:
        """A private in-memory store holding the database file whose bytes are `image` (nothing refers to the file).

        How a checkpoint's store is loaded: read once (and checksummed) by the caller, so loading
        opens no SQLite file, creates no journal and works on read-only storage.
        """
        return cls(what, image=image)

    def _load_image(self, image: bytes, what: str | Path) -> None:
        if len(image) < 100:  # SQLite's file header alone is 100 bytes
            raise sqlite3.DatabaseError(f"the file holds {len(image)} bytes, not a database")
        data = bytearray(image)
        if data[18:20] == b"\x02\x02":  # a WAL-mode file (format 1 stores): memory databases use the rollback journal
            data[18:20] = b"\x01\x01"
        self.conn.deserialize(bytes(data))
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"items", "feedback"} <= tables:
            raise sqlite3.DatabaseError(f"it has no items and feedback tables (tables: {sorted(tables)})")

    def add(
        self, ids: Sequence[int], expert: str, texts: Sequence[str | None], payloads: Sequence[dict | None]
    ) -> None:
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
            for i, text, payload in select_in(
                self.conn, "SELECT id, text, payload FROM items WHERE id IN ({marks})", wanted
            ):
                out[i] = (text, json.loads(payload) if payload else {})
        return out

    def max_id(self) -> int:
        with self._lock:
            row = self.conn.execute("SELECT MAX(id) FROM items").fetchone()
        return -1 if row[0] is None else int(row[0])

    def delete_expert(self, name: str) -> None:
        """Delete the expert's items; its feedback stays as an audit log, apart from any later expert of that name."""
        with self._lock, self.conn:
            self.conn.execute("DELETE FROM items WHERE expert = ?", (name,))
            self.conn.execute(
                "UPDATE feedback SET removed = ? WHERE expert = ? AND removed IS NULL", (time.time(), name)
            )

    def add_feedback(self, query: str | None, vector: np.ndarray, expert: str, positive: bool) -> int:
        with self._lock, self.conn:
            cur = self.conn.execute(
                "INSERT INTO feedback (query, vector, expert, positive, created) VALUES (?, ?, ?, ?, ?)",
                (query, np.asarray(vector, dtype=np.float32).tobytes(), expert, int(positive), time.time()),
            )
        return int(cur.lastrowid)

    def delete_feedback(self, seq: int) -> None:
        """Drop one feedback row (the server undoes a row whose save failed, so memory matches the disk)."""
        with self._lock, self.conn:
            self.conn.execute("DELETE FROM feedback WHERE seq = ?", (int(seq),))

    def feedback(
        self,
        expert: str | None = None,
        include_removed: bool = False,
    ) -> list[FeedbackRecord]:
        """Feedback records, oldest first.

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
        return [FeedbackRecord(s, q, np.frombuffer(v, dtype=np.float32), e, bool(p), c) for s, q, v, e, p, c in rows]

    def image(self) -> bytes:
        """The whole store as the bytes of one self-contained SQLite file (consistent even while in use).

        What a checkpoint saves (and hashes, from memory); from_image reads it back.
        """
        with self._lock:
            return self.conn.serialize()

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
                "SELECT expert, COUNT(*), SUM(positive) FROM feedback WHERE removed IS NULL GROUP BY expert"
            ).fetchall()
        return {e: (int(n), int(p or 0)) for e, n, p in rows}

    def experts_of(self, ids: Iterable[int]) -> dict[int, str]:
        """id -> expert name recorded for the item."""
        wanted = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        with self._lock:
            out.update(select_in(self.conn, "SELECT id, expert FROM items WHERE id IN ({marks})", wanted))
        return out

    def in_memory_copy(self) -> MetadataStore:
        """A private in-memory copy: changes to it never touch this store's file (saved later, atomically)."""
        copy = MetadataStore(None)
        with self._lock:
            self.conn.backup(copy.conn)
        return copy


def check_payloads(payloads: Sequence[dict[str, Any]] | None, n: int) -> list[dict | None]:
    """One payload per vector, each checked: a dict with str keys whose values JSON can hold (no NaN/inf)."""
    if payloads is None:
        return [None] * n
    if isinstance(payloads, (str, bytes, dict)) or not isinstance(payloads, (Sequence, np.ndarray)):
        raise ValueError(f"metadata must be a list of dicts (one per vector), got {type(payloads).__name__}")
    if len(payloads) != n:
        raise ValueError(f"got {len(payloads)} metadata entries for {n} vectors; expected one per vector")
    for i, p in enumerate(payloads):
        if not isinstance(p, dict):
            raise ValueError(f"metadata entry {i} is {type(p).__name__} {p!r:.40}; expected a dict (one per vector)")
        keys = [k for k in p if not isinstance(k, str)]
        if keys:
            raise ValueError(f"metadata entry {i} has a key {keys[0]!r} that is not a str; expected str keys")
        try:
            json.dumps(p, allow_nan=False)
        except (TypeError, ValueError) as exc:  # a set, an object, NaN: JSON could not store or answer it
            raise ValueError(f"metadata entry {i} is not JSON-serialisable ({exc}); expected JSON values") from None
    return list(payloads)

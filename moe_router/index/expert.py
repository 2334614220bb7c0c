"""One expert = a FAISS flat index over its vectors + their global ids.

FAISS vocabulary: xb stored vectors (n, d), xq queries (nq, d), results (D, I) of shape (nq, k).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from moe_router.index.clustering import kmeans_centroids
from moe_router.vectors import check_metric, flat_index, worst_score


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
    # (st_dev, st_ino, st_size, st_mtime_ns) of each file when its sha256 was last checked or it was
    # written: Router.save(recheck=False) links a file whose stat still matches without re-hashing it.
    vectors_stat: tuple[int, int, int, int] | None = None
    ids_stat: tuple[int, int, int, int] | None = None


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
        self.index = flat_index(self.dim, self.metric)
        self.ids = np.empty(0, dtype=np.int64)  # (n,) global id of each stored row

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def max_id(self) -> int:
        """The largest global id stored (-1 when empty)."""
        return int(self.ids.max()) if len(self.ids) else -1

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
        return self._view().copy()

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """A copy of the stored vectors at row positions idx (m,): (m, d), without copying the others."""
        if self.ntotal == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._view()[np.asarray(idx, dtype=np.int64)]

    def _view(self) -> np.ndarray:
        """(n, d) view of the index's own memory: valid until the index changes."""
        return faiss.rev_swig_ptr(self.index.get_xb(), self.ntotal * self.dim).reshape(self.ntotal, self.dim)

    def centroid(self) -> np.ndarray:
        """Mean vector (d,); for 'ip' re-normalised so it compares like a query."""
        c = self.vectors().mean(axis=0)
        if self.metric == "ip":
            c = c / max(float(np.linalg.norm(c)), 1e-12)
        return c.astype(np.float32)

    def prototypes(self, m: int, seed: int = 0) -> np.ndarray:
        """(min(m, n), d) k-means centroids of this expert's vectors (spherical for 'ip'); all vectors if n <= m."""
        return kmeans_centroids(self.vectors(), m, self.metric, seed)

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


def sample_vectors(experts: Sequence[Expert], skip: Sequence[int], limit: int = 4096, seed: int = 0) -> np.ndarray:
    """A seeded sample of up to `limit` vectors of the experts not in `skip` (where new rows must behave as before)."""
    others = [e for i, e in enumerate(experts) if i not in skip and e.ntotal]
    if not others:
        return np.empty((0, experts[0].dim), np.float32)
    sizes = [e.ntotal for e in others]
    if sum(sizes) <= limit:
        return np.concatenate([e.vectors() for e in others])
    # Pick the rows first and copy only those: copying every vector (300 MB at 200k x 384) held the
    # GIL long enough to stall the server's searches while an expert was added (issue 12).
    pick = np.sort(np.random.default_rng(seed).choice(sum(sizes), size=limit, replace=False))  # over the concatenation
    starts = np.cumsum([0, *sizes])
    return np.concatenate(
        [e.rows(pick[(pick >= a) & (pick < b)] - a) for e, a, b in zip(others, starts[:-1], starts[1:])]
    )


def centroids(experts: Sequence[Expert]) -> np.ndarray:
    """(E, d) each expert's centroid (Expert.centroid)."""
    return np.stack([e.centroid() for e in experts])

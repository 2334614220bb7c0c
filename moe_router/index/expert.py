"""One expert = a FAISS flat index over its vectors + their global ids, described by an ExpertSpec.

An Expert is not changed once it is built: a change of its description makes a new Expert that
shares the index (with_spec), a change of its rows a new one with its own (without_ids). Routers
that share an Expert (forks, the server's copy-on-write snapshots) therefore never see each
other's changes. `content` identifies the rows: Experts that share it hold the same vectors and ids.

FAISS vocabulary: xb stored vectors (n, d), xq queries (nq, d), results (D, I) of shape (nq, k).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import faiss
import numpy as np

from moe_router.index.clustering import kmeans_centroids
from moe_router.types import ExpertSpec
from moe_router.vectors import check_metric, flat_index, worst_score


class Content:
    """Identity of an expert's rows (vectors + ids); weak-referenceable, so a cache can key on it."""

    __slots__ = ("__weakref__",)


class Expert:
    """A named FAISS flat index. Vectors are expected already checked (and normalised for 'ip')."""

    def __init__(self, spec: ExpertSpec, index: faiss.Index, ids: np.ndarray, content: Content | None = None) -> None:
        if index.ntotal != len(ids):
            raise ValueError(f"expert {spec.name!r}: {index.ntotal} vectors but {len(ids)} ids")
        self.spec = spec
        self.index = index
        self.ids = ids  # (n,) global id of each stored row
        self.content = content if content is not None else Content()

    @classmethod
    def build(cls, spec: ExpertSpec, xb: np.ndarray, ids: np.ndarray, metric: str = "ip") -> Expert:
        """An expert holding the prepared vectors xb (n, d) with global ids (n,)."""
        xb = np.ascontiguousarray(xb, dtype=np.float32)
        index = flat_index(xb.shape[1], check_metric(metric))
        if len(xb) != len(ids):
            raise ValueError(f"expert {spec.name!r}: {len(xb)} vectors but {len(ids)} ids")
        index.add(xb)
        return cls(spec, index, np.asarray(ids, dtype=np.int64).copy())

    @classmethod
    def to_fill(cls, spec: ExpertSpec, dim: int, metric: str, ids: np.ndarray) -> tuple[Expert, np.ndarray]:
        """An expert of len(ids) zero rows and a writable (n, d) float32 view of them, to fill before it is searched.

        Lets a reader put vectors straight into the index, without a second copy in memory.
        """
        index = flat_index(dim, check_metric(metric))
        n = len(ids)
        index.codes.resize(n * index.code_size)
        index.ntotal = n
        expert = cls(spec, index, np.asarray(ids, dtype=np.int64).copy())
        view = faiss.rev_swig_ptr(index.get_xb(), n * dim) if n else np.empty(0, np.float32)
        return expert, view.reshape(n, dim)

    # ------------------------------------------------------------ description

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
    def dim(self) -> int:
        return self.index.d

    @property
    def metric(self) -> str:
        return "ip" if self.index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def max_id(self) -> int:
        """The largest global id stored (-1 when empty)."""
        return int(self.ids.max()) if len(self.ids) else -1

    def with_spec(self, spec: ExpertSpec) -> Expert:
        """This expert's rows under another description (shared, not copied)."""
        return Expert(spec, self.index, self.ids, self.content)

    def without_ids(self, ids: Iterable[int]) -> Expert:
        """A new expert without the rows of these global ids."""
        keep = ~np.isin(self.ids, np.fromiter(ids, dtype=np.int64))
        return Expert.build(self.spec, self.vectors()[keep], self.ids[keep], self.metric)

    # ------------------------------------------------------------ reads

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
        """(n, d) view of the index's own memory."""
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

    def __repr__(self) -> str:
        return f"Expert({self.name!r}, ntotal={self.ntotal}, dim={self.dim}, metric={self.metric!r})"


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


def labelled_sample(experts: Sequence[Expert], per_expert: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stored vectors as pseudo-queries labelled with their expert: a seeded sample of up to per_expert each.

    Returns (x (m, d), gold (m,) expert index).
    """
    rng = np.random.default_rng(seed)
    xs, gold = [], []
    for i, e in enumerate(experts):
        x = e.vectors()
        if len(x) > per_expert:
            x = x[np.sort(rng.choice(len(x), size=per_expert, replace=False))]
        xs.append(x)
        gold.append(np.full(len(x), i, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(gold)


def centroids(experts: Sequence[Expert]) -> np.ndarray:
    """(E, d) each expert's centroid (Expert.centroid)."""
    return np.stack([e.centroid() for e in experts])

"""Checking and normalising vectors at the library's public boundaries (one place for both)."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

METRICS = ("ip", "l2")


# FAISS only takes its BLAS path at >= 128000 / d queries per call (334 at d = 384). A routed search
# sends each expert a slice of the batch, so the threshold is lowered: measured here, 20 turned a
# 0.65x slowdown into a 6x speed-up for 2-of-16 shards at 1M x 384 (docs/speed.md). Set once, when the
# library is imported, so that every search of a process takes the same path: the float sums of the
# two paths differ in the last bits, and exact neighbours (training targets) must not depend on
# whether a routed search happened to run first.
BLAS_THRESHOLD = 20
faiss.cvar.distance_compute_blas_threshold = min(faiss.cvar.distance_compute_blas_threshold, BLAS_THRESHOLD)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(
            f"metric must be one of {METRICS} ('ip' = inner product on normalised vectors), got {metric!r}"
        )
    return metric


# Squared L2 norm allowed for an unnormalised ('l2') vector: with |x|^2 and |y|^2 at most this, every
# squared distance |x - y|^2 <= 2|x|^2 + 2|y|^2 and FAISS's |x|^2 + |y|^2 - 2<x, y> stay finite in float32.
MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 4


def check_dim(dim: Any, what: str = "dim") -> int:
    """A vector dimension: an integer >= 1 (not a bool, not a float), else a ValueError naming `what`."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"{what} must be an integer >= 1 (the vector dimension), got {dim!r}")
    return int(dim)


def _first_bad_element(x: Any) -> str:
    """Where a nested list stops being a rectangle of real numbers, for an error message ("row 1 is a str ...")."""
    rows = list(x) if isinstance(x, (list, tuple)) else []
    lengths = []
    for i, row in enumerate(rows):
        if isinstance(row, (list, tuple, np.ndarray)):
            for j, v in enumerate(row):
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                    return f"row {i}, item {j} is {type(v).__name__} {v!r:.40}"
            lengths.append(len(row))
        elif isinstance(row, (int, float, np.integer, np.floating)) and not isinstance(row, bool):
            lengths.append("a number")
        else:
            return f"row {i} is {type(row).__name__} {row!r:.40}"
    if len(set(lengths)) > 1:
        return f"the rows have different lengths (first rows: {lengths[:5]}); every row needs the same length"
    return "expected a rectangle of real numbers"


def as_array(x: Any, what: str = "vectors") -> np.ndarray:
    """x (numpy array, torch tensor, nested lists of numbers) as a real float32 array of any shape, or a ValueError.

    Refuses what numpy would silently change or reject with an internal message: complex values (the
    imaginary part would be dropped), booleans (True would become 1.0), strings, None and other
    objects, ragged lists.
    """
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    if isinstance(x, (str, bytes)) or x is None:
        raise ValueError(f"{what} must be numeric arrays of shape (n, d), got {type(x).__name__} {x!r:.40}")
    try:
        raw = x if isinstance(x, np.ndarray) else np.asarray(x)
    except (TypeError, ValueError):  # ragged nesting
        raise ValueError(f"{what} must be numeric arrays of shape (n, d): {_first_bad_element(x)}") from None
    if raw.dtype.kind == "c":
        raise ValueError(f"{what} are complex ({raw.dtype}); expected real numbers (take .real or abs() first)")
    if raw.dtype.kind == "b":
        raise ValueError(f"{what} are booleans; expected real numbers (convert them with .astype(float) if meant)")
    if raw.dtype.kind not in "iuf":
        raise ValueError(
            f"{what} must be numeric arrays of shape (n, d), got dtype {raw.dtype}: {_first_bad_element(x)}"
        )
    with np.errstate(over="ignore"):  # float64 past float32's range becomes inf, rejected by as_matrix
        return raw.astype(np.float32, copy=False)


def as_matrix(x: Any, dim: int | None, what: str = "vectors") -> np.ndarray:
    """Return x as a C-contiguous float32 (n, dim) array, or raise a ValueError saying what is wrong.

    Accepts numpy arrays, torch tensors and nested lists; a single 1-D vector becomes (1, dim).
    """
    if dim is not None:
        check_dim(dim)
    arr = as_array(x, what)
    if arr.size == 0:
        raise ValueError(f"{what}: empty batch (0 rows); expected at least one vector")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must have shape (n, d) or (d,), got an array with shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what}: empty batch (0 rows); expected at least one vector")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{what} have dimension {arr.shape[1]}, expected {dim}")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{what} contain NaN or inf in {len(bad)} row(s) (first: row {bad[0]}); expected finite values"
        )
    return np.ascontiguousarray(arr)


def check_l2_range(x: np.ndarray, what: str = "vectors") -> np.ndarray:
    """x unchanged if every row's squared norm is at most MAX_SQUARED_NORM, else a ValueError.

    Computed in float64: in float32 the squared norm itself would overflow to inf (values near 1e19
    and up), and FAISS's distances with it, so a search would find nothing and a gate would give NaN.
    """
    sq = np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64))  # (n,)
    over = np.flatnonzero(sq > MAX_SQUARED_NORM)
    if len(over):
        raise ValueError(
            f"{what}: {len(over)} row(s) too large for metric 'l2' (first: row {over[0]}, squared norm "
            f"{sq[over[0]]:.3g}); expected squared norms <= {MAX_SQUARED_NORM:.3g} so float32 "
            "distances stay finite (scale the vectors down)"
        )
    return x


def normalize_rows(x: np.ndarray, what: str = "vectors") -> np.ndarray:
    """L2-normalise each row (for inner-product search); a zero row is an error, not a NaN."""
    # Scale by each row's largest entry first, so huge or tiny (subnormal) values neither overflow nor vanish.
    peak = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    if (peak == 0).any():
        row = int(np.flatnonzero(peak[:, 0] == 0)[0])
        raise ValueError(f"{what}: row {row} is the zero vector, which has no direction to normalise (metric 'ip')")
    scaled = x.astype(np.float64) / peak
    return np.ascontiguousarray(scaled / np.linalg.norm(scaled, axis=1, keepdims=True), dtype=np.float32)


def prepare(x: Any, dim: int | None, metric: str, what: str = "vectors") -> np.ndarray:
    """as_matrix, then normalise ('ip') or check the range ('l2'): the one place vectors are made ready for an index."""
    arr = as_matrix(x, dim, what)
    return normalize_rows(arr, what) if check_metric(metric) == "ip" else check_l2_range(arr, what)


def worst_score(metric: str) -> float:
    """The padding score that sorts after every real hit."""
    return -np.inf if metric == "ip" else np.inf


def flat_index(d: int, metric: str) -> faiss.Index:
    """An exact FAISS index for `metric`: IndexFlatIP ('ip') or IndexFlatL2 ('l2')."""
    d = check_dim(d, "index dimension d")
    return faiss.IndexFlatIP(d) if check_metric(metric) == "ip" else faiss.IndexFlatL2(d)


def similarity(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    """(nq, nb) similarity, higher is closer: inner product ('ip') or negative squared L2 distance ('l2')."""
    if check_metric(metric) == "ip":
        return xq @ xb.T
    return -(((xq[:, None, :] - xb[None]) ** 2).sum(-1))

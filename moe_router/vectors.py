"""Checking and normalising vectors at the library's public boundaries (one place for both)."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

METRICS = ("ip", "l2")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS} ('ip' = inner product on normalised vectors), got {metric!r}")
    return metric


def as_matrix(x: Any, dim: int | None, what: str = "vectors") -> np.ndarray:
    """Return x as a C-contiguous float32 (n, dim) array, or raise a ValueError saying what is wrong.

    Accepts numpy arrays, torch tensors and nested lists; a single 1-D vector becomes (1, dim).
    """
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numeric arrays of shape (n, d); could not convert: {exc}") from None
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
        raise ValueError(f"{what} contain NaN or inf in {len(bad)} row(s) (first: row {bad[0]}); expected finite values")
    return np.ascontiguousarray(arr)


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
    """as_matrix, then normalise when the metric is inner product."""
    arr = as_matrix(x, dim, what)
    return normalize_rows(arr, what) if metric == "ip" else arr


def worst_score(metric: str) -> float:
    """The padding score that sorts after every real hit."""
    return -np.inf if metric == "ip" else np.inf


def flat_index(d: int, metric: str) -> faiss.Index:
    """An exact FAISS index for `metric`: IndexFlatIP ('ip') or IndexFlatL2 ('l2')."""
    return faiss.IndexFlatIP(d) if check_metric(metric) == "ip" else faiss.IndexFlatL2(d)


def similarity(xq: np.ndarray, xb: np.ndarray, metric: str) -> np.ndarray:
    """(nq, nb) similarity, higher is closer: inner product ('ip') or negative squared L2 distance ('l2')."""
    if check_metric(metric) == "ip":
        return xq @ xb.T
    return -(((xq[:, None, :] - xb[None]) ** 2).sum(-1))

"""Expert (one FAISS flat index + global ids) and the SQLite metadata store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest

from moe_router.index.expert import Expert, sample_vectors
from moe_router.store import MetadataStore
from moe_router.types import ExpertSpec
from moe_router.vectors import prepare, worst_score
from tests.helpers import DIM, clusters, make_router


def _expert(metric: str, n: int = 60, first_id: int = 1000) -> tuple[Expert, np.ndarray, np.ndarray]:
    xb = prepare(np.concatenate(clusters(3, 20, DIM, seed=3))[:n], DIM, metric)
    ids = np.arange(first_id, first_id + n, dtype=np.int64) * 7  # global ids: not row numbers
    return Expert.build(ExpertSpec("e"), xb, ids, metric), xb, ids


def _flat(metric: str, xb: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(DIM) if metric == "ip" else faiss.IndexFlatL2(DIM)
    index.add(xb)
    return index


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_expert_search__equals_exact_flat_index(metric: str) -> None:
    expert, xb, ids = _expert(metric)
    xq = prepare(np.random.default_rng(0).normal(size=(25, DIM)), DIM, metric)
    D, I = expert.search(xq, 7)
    D_ref, rows = _flat(metric, xb).search(xq, 7)
    np.testing.assert_array_equal(D, D_ref)
    np.testing.assert_array_equal(I, ids[rows])


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_expert_search_k_above_ntotal__pads_with_minus_one_and_worst_score(metric: str) -> None:
    expert, xb, ids = _expert(metric, n=5)
    xq = prepare(np.random.default_rng(1).normal(size=(4, DIM)), DIM, metric)
    D, I = expert.search(xq, 9)
    D_ref, rows = _flat(metric, xb).search(xq, 5)
    assert D.shape == I.shape == (4, 9)
    np.testing.assert_array_equal(D[:, :5], D_ref)
    np.testing.assert_array_equal(I[:, :5], ids[rows])
    assert (I[:, 5:] == -1).all()
    assert (D[:, 5:] == worst_score(metric)).all()


def test_empty_expert_search__is_all_padding() -> None:
    empty = Expert.build(ExpertSpec("empty"), np.empty((0, DIM), np.float32), np.empty(0, np.int64))
    D, I = empty.search(np.ones((2, DIM), dtype=np.float32), 3)
    assert (I == -1).all() and (D == -np.inf).all()


def test_expert_vectors__returns_a_copy_in_insertion_order() -> None:
    expert, xb, _ = _expert("l2")
    got = expert.vectors()
    np.testing.assert_array_equal(got, xb)
    got[:] = 0
    np.testing.assert_array_equal(expert.vectors(), xb)


def test_expert_centroid__is_unit_mean_direction_for_ip() -> None:
    expert, xb, _ = _expert("ip")
    mean = xb.mean(axis=0)
    np.testing.assert_allclose(expert.centroid(), mean / np.linalg.norm(mean), rtol=1e-5)


def test_expert_without_ids__drops_exactly_those_rows_and_leaves_the_original() -> None:
    original, xb, ids = _expert("l2")
    drop = ids[[0, 5, 59]]
    expert = original.without_ids([*drop, 123456789])  # an unknown id is ignored
    assert expert.ntotal == len(ids) - 3 and original.ntotal == len(ids) and expert.content is not original.content
    keep = ~np.isin(ids, drop)
    np.testing.assert_array_equal(expert.ids, ids[keep])
    np.testing.assert_array_equal(expert.vectors(), xb[keep])
    _, I = expert.search(xb[[5]], 1)
    assert I[0, 0] != ids[5]


def test_expert_add__rejects_mismatched_ids() -> None:
    with pytest.raises(ValueError, match="3 vectors but 2 ids"):
        Expert.build(ExpertSpec("e"), np.ones((3, DIM), dtype=np.float32), np.arange(2))


def test_expert__rejects_unknown_metric() -> None:
    with pytest.raises(ValueError, match="metric must be one of"):
        Expert.build(ExpertSpec("e"), np.ones((3, DIM), dtype=np.float32), np.arange(3), metric="cosine")


def test_metadata_store_get__returns_text_and_payload_beyond_sqlite_parameter_limit() -> None:
    store = MetadataStore()
    n = 2500  # more than SQLite's 999 bound parameters in one IN (...)
    store.add(range(n), "e", [f"t{i}" for i in range(n)], [{"i": i} if i % 2 else None for i in range(n)])
    got = store.get([*range(n), -1, n + 5])  # -1 (padding) and unknown ids are skipped
    assert len(got) == n
    assert got[2001] == ("t2001", {"i": 2001})
    assert got[2000] == ("t2000", {})
    assert store.max_id() == n - 1


def test_metadata_store_of_an_older_checkpoint__gains_the_removed_column_and_keeps_its_feedback(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    conn = sqlite3.connect(str(path))
    conn.executescript("""
        CREATE TABLE items (id INTEGER PRIMARY KEY, expert TEXT NOT NULL, text TEXT, payload TEXT);
        CREATE TABLE feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT, query TEXT, vector BLOB,
                               expert TEXT NOT NULL, positive INTEGER NOT NULL, created REAL NOT NULL);
    """)
    conn.execute(
        "INSERT INTO feedback (query, vector, expert, positive, created) VALUES (?, ?, ?, ?, ?)",
        ("q", np.ones(4, dtype=np.float32).tobytes(), "a", 1, 1.0),
    )
    conn.commit()
    conn.close()
    store = MetadataStore(path)
    assert [(r.seq, r.query, r.expert, r.positive) for r in store.feedback()] == [(1, "q", "a", True)]
    store.delete_expert("a")
    assert store.feedback() == [] and len(store.feedback(include_removed=True)) == 1
    store.close()


@pytest.mark.parametrize("skip, limit, seed", [((0,), 100, 0), ((1, 2), 37, 3), ((), 10_000, 1), ((3,), 5, 7)])
def test_sample_vectors__equals_sampling_the_concatenation(skip: tuple, limit: int, seed: int) -> None:
    """Rows are picked before copying, yet the sample is the one drawn from all the vectors stacked."""
    router = make_router("ip")
    others = [e for i, e in enumerate(router.experts) if i not in skip]
    stacked = np.concatenate([e.vectors() for e in others])
    if len(stacked) > limit:
        stacked = stacked[np.sort(np.random.default_rng(seed).choice(len(stacked), size=limit, replace=False))]
    np.testing.assert_array_equal(sample_vectors(router.experts, skip, limit, seed), stacked)

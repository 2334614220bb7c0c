"""Dataset files (load_jsonl / load_dataset), what each kind of data answers the training pipeline, routing targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_router.data.base import Dataset, TrainingDefaults
from moe_router.data.beir import load_beir
from moe_router.data.datasets import Record, VectorDataset, carve_validation, demo_path, load_dataset, load_jsonl
from moe_router.data.synthetic import synthetic_dataset
from moe_router.index.exact import exact_neighbours, neighbour_counts
from moe_router.train.targets import make_targets
from tests.helpers import REPO, VOCAB, brute_force, clusters, write_beir, write_jsonl

ROW = {"text": "a question about stars", "domain": "astronomy", "label": "stars", "split": "train"}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_jsonl__reads_records_and_skips_blank_lines(dataset_file: Path) -> None:
    records = load_jsonl(dataset_file)
    assert len(records) == 3 * (12 + 4 + 4)
    assert {r.domain for r in records} == set(VOCAB)
    assert {r.split for r in records} == {"train", "val", "test"}
    _write(dataset_file, [ROW, "", "   ", ROW])
    assert load_jsonl(dataset_file) == [Record(**ROW)] * 2


@pytest.mark.parametrize(
    "line, message",
    [
        ({k: v for k, v in ROW.items() if k != "label"}, r":2: missing field\(s\) \['label'\]"),
        ('{"text": "unterminated', ":2: not valid JSON"),
        ("[1, 2]", ":2: expected a JSON object"),
        ({**ROW, "split": "dev"}, ":2: split must be one of"),
        ({**ROW, "domain": ""}, ":2: field 'domain' must be a non-empty string"),
        ({**ROW, "text": 42}, ":2: field 'text' must be a non-empty string"),
    ],
)
def test_load_jsonl_bad_line__raises_naming_the_line(tmp_path: Path, line: object, message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", [ROW, line])
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_load_jsonl_missing_or_empty_file__raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no records"):
        load_jsonl(_write(tmp_path / "empty.jsonl", [""]))


def test_load_dataset_without_train_rows__raises(tmp_path: Path) -> None:
    path = _write(tmp_path / "no_train.jsonl", [{**ROW, "split": "test"}, {**ROW, "split": "val"}])
    with pytest.raises(ValueError, match="no training rows"):
        load_dataset(str(path))


def test_load_dataset__experts_are_sorted_train_domains_and_unknown_ones_are_minus_one(tmp_path: Path) -> None:
    rows = [{**ROW, "domain": d} for d in ("b", "a", "c", "a")] + [{**ROW, "domain": "zzz", "split": "test"}]
    ds = load_dataset(str(_write(tmp_path / "d.jsonl", rows)), val_fraction=0.0)
    assert ds.experts == ["a", "b", "c"] and ds.name == "d"
    assert ds.expert_ids("train").tolist() == [1, 0, 2, 0]
    assert ds.expert_ids("test").tolist() == [-1]


def test_load_dataset_expert_key_label__with_domain_parents(dataset_file: Path) -> None:
    ds = load_dataset(str(dataset_file), name="tiny", expert_key="label", parent_key="domain")
    assert len(ds.experts) == 6 and ds.parents["cooking_1"] == "cooking"
    with pytest.raises(ValueError, match="expert_key/parent_key must be 'domain' or 'label'"):
        load_dataset(str(dataset_file), expert_key="text")


def test_carve_validation__moves_a_seeded_share_of_train_only_when_there_is_no_val(tmp_path: Path) -> None:
    records = [Record(f"t{i}", "d", "l", "train") for i in range(40)] + [Record("q", "d", "l", "test")]
    carved = carve_validation(records, 0.25, seed=3)
    assert sum(r.split == "val" for r in carved) == 10 and sum(r.split == "train" for r in carved) == 30
    assert carved == carve_validation(records, 0.25, seed=3)
    assert carved != carve_validation(records, 0.25, seed=4)
    assert [r.text for r in carved] == [r.text for r in records] and carved[-1].split == "test"
    with_val = [*records, Record("v", "d", "l", "val")]
    assert carve_validation(with_val, 0.25, seed=3) == with_val


def test_demo_corpus__ships_with_the_package_and_loads() -> None:
    assert demo_path().is_file()
    ds = load_dataset(None, name="demo")
    assert len(ds.experts) == 10 and ds.split("val") and ds.split("test")


@pytest.mark.skipif(
    not (REPO.parent / "shared" / "datasets" / "banking77").is_dir(), reason="../shared/datasets absent"
)
def test_shared_banking77__loads_with_label_experts() -> None:
    path = REPO.parent / "shared" / "datasets" / "banking77" / "banking77.jsonl"
    ds = load_dataset(str(path), name="banking77", expert_key="label", val_fraction=0.1)
    assert len(ds.experts) == 77
    assert ds.split("val") and ds.split("test") and (ds.expert_ids("test") >= 0).all()


# ---------------------------------------------------------------- routing targets


# ---------------------------------------------------------------- what the training pipeline asks of each kind


def _answers(data: Dataset, seed: int = 0) -> tuple:
    return data.stored(), data.validation(seed), data.training_queries(), data.defaults()


def test_text_dataset__stores_train_rows_and_validates_on_val_rows_of_its_experts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", train=4, val=2, test=1)
    with open(path, "a") as f:  # a val row of an expert train does not have: no gold expert to validate against
        f.write(json.dumps({**ROW, "domain": "music", "label": "jazz", "split": "val"}) + "\n")
    data = load_dataset(str(path))
    stored, val, queries, defaults = _answers(data)
    train = data.split("train")
    assert stored.texts == [r.text for r in train] and stored.vectors is None
    assert stored.experts == [r.domain for r in train] and stored.metadata == data.metadata()
    known = [r for r in data.split("val") if r.domain != "music"]
    assert val.queries == [r.text for r in known] and val.experts == [r.domain for r in known] and not val.stored
    assert data.gold_experts("val")[-1] == "music"  # evaluation sees it (and scores it as unknown)
    assert queries == ([], []) and data.pseudo_queries("title") == ([], [])
    assert defaults == TrainingDefaults(monitor="recall", calibrate_bias=False, prior_weight=0.0)
    assert data.needs_embedder and not data.has_judgments


def test_vector_dataset__stores_vectors_without_labels() -> None:
    data = synthetic_dataset(vectors=60, dim=8, sources=2, val=5, test=3)
    stored, val, queries, defaults = _answers(data)
    assert stored.texts is None and stored.experts is None and stored.metadata is None
    np.testing.assert_array_equal(stored.vectors, data.vectors["train"])
    np.testing.assert_array_equal(val.queries, data.vectors["val"])
    assert val.experts is None and not val.stored and data.gold_experts("test") is None
    assert queries == ([], []) and defaults.monitor == "recall" and defaults.prior_weight == 0.0
    assert not data.needs_embedder and not data.has_judgments


def test_beir_dataset__validates_on_dev_judgments_and_trains_on_judged_train_queries(tmp_path: Path) -> None:
    data = load_beir(write_beir(tmp_path / "b", queries={"train": 2, "dev": 3, "test": 1}))
    stored, val, queries, defaults = _answers(data)
    assert stored.texts == [t for s in data.sources for t in data.documents(s)]
    assert stored.experts == [s for s in data.sources for _ in data.docs[s].ids]
    assert [m["_id"] for m in stored.metadata] == [i for s in data.sources for i in data.docs[s].ids]
    assert val.queries == data.queries("dev") and val.experts == data.gold_sources("dev") and not val.stored
    assert queries == (data.queries("train"), data.gold_sources("train"))
    assert data.gold_experts("test") == data.gold_sources("test")
    assert defaults == TrainingDefaults(monitor="acc@1", calibrate_bias=True, prior_weight=0.1)
    assert data.pseudo_queries("title")[0] and data.needs_embedder and data.has_judgments


def test_beir_dataset_without_dev__validates_on_a_seeded_tenth_of_its_documents(tmp_path: Path) -> None:
    data = load_beir(write_beir(tmp_path / "b", docs=20, queries={"test": 2}))
    val = data.validation(seed=3)
    rows = {(r.text, r.domain) for r in data.split("train")}
    assert len(val.queries) == 6 and set(zip(val.queries, val.experts)) <= rows  # 60 documents, with their source
    assert val.stored  # a prototype gate holds these: the untrained gate is no candidate
    assert data.validation(seed=3) == val and data.validation(seed=4) != val
    assert data.training_queries() == ([], [])
    assert data.defaults() == TrainingDefaults(monitor="recall", calibrate_bias=False, prior_weight=0.1)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_neighbours__equals_brute_force(metric: str) -> None:
    xb = np.concatenate(clusters(3, 30, 16, seed=2))
    xq = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
    _, I_ref = brute_force(xq, xb, np.arange(len(xb)), 7, metric)
    np.testing.assert_array_equal(exact_neighbours(xq, xb, 7, metric), I_ref)


def test_exact_neighbours_exclude_self__drops_each_query_own_row() -> None:
    xb = np.concatenate(clusters(3, 30, 16, seed=2))
    got = exact_neighbours(xb, xb, 5, "l2", exclude_self=True)
    _, I_ref = brute_force(xb, xb, np.arange(len(xb)), 6, "l2")
    assert (got != np.arange(len(xb))[:, None]).all()
    np.testing.assert_array_equal(got, I_ref[:, 1:])


def test_exact_neighbours_k_above_collection__returns_all_rows() -> None:
    xb = np.eye(4, dtype=np.float32)
    assert exact_neighbours(xb[:1], xb, 10).shape == (1, 4)
    assert exact_neighbours(xb, xb, 10, exclude_self=True).shape == (4, 3)


def test_neighbour_counts__counts_neighbours_per_owning_expert() -> None:
    neighbours = np.array([[0, 1, 4], [4, 3, 2]])
    owner = np.array([0, 0, 1, 2, 2])
    np.testing.assert_array_equal(neighbour_counts(neighbours, owner, 3), [[2, 0, 1], [0, 1, 2]])


def test_make_targets__label_neighbours_and_mix() -> None:
    labels = np.array([0, 2])
    counts = np.array([[2.0, 0.0, 2.0], [0.0, 1.0, 3.0]])
    np.testing.assert_array_equal(make_targets("label", labels, None, 3), [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(make_targets("neighbours", labels, counts, 3), [[0.5, 0, 0.5], [0, 0.25, 0.75]])
    mix = make_targets("mix", labels, counts, 3, label_weight=0.2)
    np.testing.assert_allclose(mix, [[0.6, 0, 0.4], [0, 0.2, 0.8]], rtol=1e-6)  # 0.2 one-hot + 0.8 shares
    np.testing.assert_allclose(mix.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "kind, counts, weight, message",
    [
        ("mix", None, 0.5, "need neighbour counts"),
        ("mix", np.ones((1, 2)), 1.5, r"label_weight must be in \[0, 1\]"),
        ("soft", np.ones((1, 2)), 0.5, "targets must be 'label', 'neighbours' or 'mix'"),
    ],
)
def test_make_targets_bad_arguments__raise(kind: str, counts: np.ndarray | None, weight: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_targets(kind, np.array([0]), counts, 2, weight)


# ---------------------------------------------------------------- vector datasets and the synthetic set


def test_synthetic_dataset__is_seeded_unit_vectors_in_three_splits() -> None:
    a = synthetic_dataset(vectors=1000, dim=16, sources=4, seed=3, val=50, test=70)
    b = synthetic_dataset(vectors=1000, dim=16, sources=4, seed=3, val=50, test=70)
    c = synthetic_dataset(vectors=1000, dim=16, sources=4, seed=4, val=50, test=70)
    assert {k: v.shape for k, v in a.vectors.items()} == {"train": (1000, 16), "val": (50, 16), "test": (70, 16)}
    assert all(np.array_equal(a.vectors[k], b.vectors[k]) for k in a.vectors)
    assert not np.array_equal(a.vectors["train"], c.vectors["train"])
    assert np.allclose(np.linalg.norm(a.vectors["train"], axis=1), 1.0, atol=1e-5)
    assert a.queries("test") is a.vectors["test"] and a.queries("missing").shape == (0, 16) and a.oos_texts("val") == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vectors": 1}, r"vectors must be an integer >= 2, got 1"),
        ({"sources": True}, r"sources must be an integer >= 2, got True"),
        ({"test": 0}, r"test must be an integer >= 1, got 0"),
    ],
)
def test_synthetic_dataset__rejects_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synthetic_dataset(**{"vectors": 100, "dim": 8, "sources": 2, "val": 5, "test": 5, **kwargs})


def test_vector_dataset__rejects_missing_train_unknown_splits_and_mismatched_dims() -> None:
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"no training vectors"):
        VectorDataset("v", {"val": x})
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['dev'\]"):
        VectorDataset("v", {"train": x, "dev": x})
    with pytest.raises(ValueError, match=r"split 'test' has shape \(3, 5\); expected \(n, 4\)"):
        VectorDataset("v", {"train": x, "test": np.ones((3, 5), dtype=np.float32)})

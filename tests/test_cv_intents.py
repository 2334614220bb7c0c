"""Held-out folds of intent data's validation rows and benchmarks/cv_intents.py's smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moe_router.data.datasets import HELDOUT, load_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folds", [2, 4])
def test_holdout_folds__partition_val_per_expert_and_leave_train_and_test_alone(folds: int) -> None:
    whole = load_dataset(None, expert_key="domain")
    val = sorted(whole.texts("val"))
    seen: list[str] = []
    sizes = []
    for f in range(folds):
        data = load_dataset(None, expert_key="domain", holdout_folds=folds, holdout_fold=f)
        held, rest = data.texts(HELDOUT), data.texts("val")
        assert not set(held) & set(rest)  # training never sees the fold it is measured on
        assert sorted(held + rest) == val
        assert data.texts("train") == whole.texts("train") and data.texts("test") == whole.texts("test")
        per_expert = Counter(data.gold_experts(HELDOUT))
        assert set(per_expert) == set(whole.gold_experts("val"))  # every fold keeps the experts' mix
        sizes.append(len(held))
        seen += held
    assert sorted(seen) == val  # the folds cover val once each
    assert max(sizes) - min(sizes) <= 1  # the deal continues across experts: equal folds
    again = load_dataset(None, holdout_folds=folds, holdout_fold=0).texts(HELDOUT)
    assert again == load_dataset(None, holdout_folds=folds, holdout_fold=0).texts(HELDOUT)  # seeded


@pytest.mark.parametrize(
    ("folds", "fold", "message"),
    [(1, 0, "holdout_folds must be"), (3, 3, "holdout_fold must be"), (True, 0, "holdout_folds must be")],
)
def test_holdout_folds_out_of_range__raises_naming_the_setting(folds: object, fold: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset(None, holdout_folds=folds, holdout_fold=fold)


def test_holdout_folds_more_than_val_rows__raises_with_the_counts(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "domain": "a", "label": "x", "split": "train"} for i in range(4)]
    rows.append({"text": "v", "domain": "a", "label": "x", "split": "val"})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"needs at least 2 'val' rows, the data has 1"):
        load_dataset(str(path), holdout_folds=2)


def test_cv_intents_smoke_mode__chooses_per_fold_and_measures_the_held_out_fold() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cv_intents.py"), "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| **all (query-weighted) ± fold sd** | 80 |" in proc.stdout  # the demo's 80 val rows, each scored once
    assert "(chosen)" in proc.stdout and "logreg_acc@1" in proc.stdout


class _Split:
    """A dataset of one split: query vectors and (optionally) their labelled experts."""

    name = "vectors"

    def __init__(self, xq: np.ndarray, labels: list[str] | None) -> None:
        self.xq, self.labels = xq, labels

    def queries(self, split: str) -> np.ndarray:
        return self.xq

    def gold_experts(self, split: str) -> list[str] | None:
        return self.labels


def test_split_gold__is_the_nearest_shard_for_kmeans_experts_else_the_label() -> None:
    from moe_router.eval.intents import split_gold
    from tests.helpers import DIM, clusters, make_router

    router = make_router("ip")
    xq = np.concatenate(clusters(4, 5, DIM, seed=0))  # make_router's centres: 5 queries near each expert
    near = np.repeat(np.arange(4), 5)
    labels = ["expert3"] * 10 + ["unknown"] * 10  # labels that disagree with the vectors
    assert split_gold(router, _Split(xq, labels), "heldout").tolist() == [3] * 10 + [-1] * 10
    router.set_training_info({"partition": 4}, {})
    assert split_gold(router, _Split(xq, labels), "heldout").tolist() == near.tolist()  # labels unused
    router.set_training_info({}, {})
    with pytest.raises(ValueError, match="has no labels, so it can only evaluate a checkpoint whose experts are"):
        split_gold(router, _Split(xq, None), "heldout")

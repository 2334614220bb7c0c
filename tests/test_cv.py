"""benchmarks/cv.py: the folds, the operating-point rule, the ECE noise floor, the smoke run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moe_router.data.beir import HELDOUT, load_beir
from moe_router.eval.adaptive import OperatingPoint, cheapest_at_least, safest_within
from moe_router.metrics import ece_noise_floor, expected_calibration_error
from tests.helpers import VOCAB, import_benchmark, write_beir

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folds", [2, 4])
def test_holdout_folds__partition_dev_per_source_and_never_overlap_the_rest(tmp_path: Path, folds: int) -> None:
    root = write_beir(tmp_path / "beir", queries={"train": 2, "dev": 9, "test": 2})
    dev = load_beir(root).query_ids("dev")
    seen: list[str] = []
    for f in range(folds):
        data = load_beir(root, holdout_folds=folds, holdout_fold=f)
        held, rest = data.query_ids(HELDOUT), data.query_ids("dev")
        assert not set(held) & set(rest)  # training never sees the fold it is measured on
        assert sorted(held + rest) == sorted(dev)
        per_source = Counter(q.split("-")[0] for q in held)
        assert set(per_source) == set(VOCAB)  # dealt per source: every fold keeps the sources' mix
        assert max(per_source.values()) - min(per_source.values()) <= 1
        assert data.query_ids("test") == load_beir(root).query_ids("test")
        seen += held
    assert sorted(seen) == sorted(dev)  # the folds cover dev once each
    again = load_beir(root, holdout_folds=folds, holdout_fold=0).query_ids(HELDOUT)
    assert again == load_beir(root, holdout_folds=folds, holdout_fold=0).query_ids(HELDOUT)  # seeded


def point(setting: str, experts: float, quality: float, w: float = 0.0) -> OperatingPoint:
    return OperatingPoint(setting, 4, w, experts, quality)


def test_cheapest_at_least__fewest_sources_reaching_the_reference() -> None:
    points = [point("top-1", 1.0, 0.40), point("p=0.8", 1.3, 0.52), point("p=0.9", 1.6, 0.55), point("top-8", 8, 0.5)]
    assert cheapest_at_least(points, 0.50).setting == "p=0.8"
    assert cheapest_at_least(points, 0.30).setting == "top-1"
    tied = [point("p=0.8", 1.3, 0.52, w=0.1), point("p=0.8", 1.3, 0.53, w=0.2)]
    assert cheapest_at_least(tied, 0.5).prior_weight == 0.2  # same cost: the better one
    assert cheapest_at_least(points, 0.9).setting == "p=0.9"  # none reaches it: the best
    with pytest.raises(ValueError, match="at least one operating point"):
        cheapest_at_least([], 0.5)


def test_safest_within__best_inside_the_budget_widest_among_its_ties() -> None:
    points = [
        point("top-1", 1.0, 0.5240),
        point("p=0.7", 1.03, 0.5262),
        point("p=0.99", 1.14, 0.5258),  # within 0.001 of the best: the wider wins
        point("p=0.99", 1.14, 0.5250),  # same cost, lower: loses the tie
        point("top-2", 2.0, 0.5300),  # the best of all, but over the budget
    ]
    chosen = safest_within(points, 1.5, tol=1e-3)
    assert (chosen.setting, chosen.experts, chosen.quality) == ("p=0.99", 1.14, 0.5258)
    assert safest_within(points, 1.5, tol=0.0).setting == "p=0.7"  # no tolerance: the best inside
    assert safest_within(points, 2.0, tol=1e-3).setting == "top-2"
    assert safest_within(points, 0.5).setting == "top-1"  # nothing inside: the cheapest
    with pytest.raises(ValueError, match="at least one operating point"):
        safest_within([], 1.5)


def test_ece_noise_floor__its_90th_percentile_bounds_a_calibrated_gate_nine_times_in_ten() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, size=150)
    floor = ece_noise_floor(conf, draws=400, seed=1)
    # fresh calibrated outcomes (other seeds than the floor's own draws) fall under q90 about 90% of the time
    inside = np.mean([expected_calibration_error(conf, rng.random(150) < conf) <= floor.q90 for _ in range(400)])
    assert 0.85 <= inside <= 0.95
    overconfident = expected_calibration_error(conf, rng.random(150) < conf - 0.2)  # 20 points less often right
    assert overconfident > floor.q90
    assert floor.mean < floor.q90


def test_cv_smoke_mode__writes_a_report_per_fold() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cv.py"), "--smoke"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| **mean ± sd** |" in proc.stdout and "## Settings chosen per fold" in proc.stdout


def test_cv_common_write_reports__keeps_a_partial_file_meanwhile_and_writes_slim_reports(tmp_path: Path) -> None:
    import json

    common = import_benchmark("cv_common")
    seen: list[bool] = []

    def run_fold(f: int) -> dict:
        seen.append((tmp_path / "x.partial.json").is_file())  # the folds done so far are on disk
        return {"fold": f, "acc@1": 0.5 + f / 10, "confidence": [0.9], "correct": [True]}

    common.write_reports(
        tmp_path,
        "x",
        3,
        run_fold,
        lambda folds: {"mean": sum(f["acc@1"] for f in folds) / len(folds), "n": len(folds)},
        lambda folds, summary: f"# x: {summary['n']} folds",
    )
    assert seen == [False, True, True]
    report = json.loads((tmp_path / "x.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1, 2] and report["summary"]["n"] == 3
    assert not any(k in f for f in report["folds"] for k in common.PER_QUERY)
    assert (tmp_path / "x.md").read_text() == "# x: 3 folds" and not (tmp_path / "x.partial.json").exists()

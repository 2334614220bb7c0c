"""The retrieval benchmarks and the load probe run end to end on toy data (numbers meaningless, code paths real).

benchmarks/retrieval_routing.py trains through the real Hydra configs on a tiny BEIR folder;
benchmarks/retrieval_summary.py reads the reports scripts/evaluate.py writes (all of dev and two
held-out folds, as benchmarks/retrieval_dev.sh lays them out); benchmarks/load_probe.py loads a
checkpoint in a fresh process and reports what it cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_router, write_beir

REPO = Path(__file__).resolve().parents[1]
TINY = ["embedder=hashing", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_retrieval_routing__trains_and_scores_every_router_on_dev(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir")
    out = tmp_path / "result.json"
    text = run(
        [
            str(REPO / "benchmarks/retrieval_routing.py"),
            "--data",
            "beir",
            "--json",
            str(out),
            f"data.root={root}",
            *TINY,
        ],
        tmp_path,
    )
    result = json.loads(out.read_text())
    assert result["dev_queries"] == 3 * result["experts"]  # write_beir: 3 dev queries per source
    gate = result["routers"]["gate (ours)"]
    assert 0.0 <= gate["acc@1"] <= gate["acc@2"] <= 1.0 and 0.0 <= gate["ece_cross_fitted"] <= 1.0
    assert "| gate (ours) |" in text and "| centroid |" in text


@pytest.mark.slow
def test_retrieval_summary__reads_the_reports_evaluate_writes(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir", queries={"train": 6, "dev": 6, "test": 3})
    reports = tmp_path / "reports"
    data = ["data=beir", f"data.root={root}"]
    for name, fold in (("beir", []), ("beir_fold0", ["data.holdout_folds=2", "data.holdout_fold=0"])):
        ckpt = tmp_path / "ckpt" / name
        run([str(REPO / "scripts/train.py"), *data, *fold, f"out={ckpt}", *TINY], tmp_path)
        split = "split=heldout" if fold else "split=dev"
        run(
            [
                str(REPO / "scripts/evaluate.py"),
                f"ckpt={ckpt}",
                *data,
                *fold,
                split,
                f"report={reports / name / 'report.json'}",
                f"out_dir={reports / name}",
                "baselines=[centroid,multi_prototype]",
                "speed_batches=[1]",
            ],
            tmp_path,
        )
    table = run([str(REPO / "benchmarks/retrieval_summary.py"), str(reports)], tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| beir |")]
    assert len(rows) == 3, table  # all of dev, the cross-validated fold, the best baseline
    assert "in-sample" in rows[0] and "1-fold cross-validated" in rows[1] and "best baseline" in rows[2]


def test_load_probe__reports_the_time_and_memory_of_a_load(tmp_path: Path) -> None:
    router = make_router()
    router.save(tmp_path / "ckpt")
    report = json.loads(run([str(REPO / "benchmarks/load_probe.py"), str(tmp_path / "ckpt")], tmp_path))
    assert (report["vectors"], report["dim"], report["verify"]) == (router.ntotal, router.dim, True)
    assert report["seconds"] > 0 and report["after_kb"]["VmHWM"] >= report["before_kb"]["VmRSS"] > 0, report

"""The calibration set a router keeps (judged queries), through changes, checkpoints and fine-tunes.

Seeded synthetic clusters with a small gate; each Lightning fit is a few steps. The last test runs
benchmarks/add_source.py --smoke (leave one classic source out, add it back) end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_router import Router
from moe_router import lifecycle as lc
from moe_router.checkpoint.format import CALIBRATION_FILE
from moe_router.errors import CheckpointError
from moe_router.gate import initial_gate
from moe_router.gate.confidence import fit_bias_temperature
from moe_router.gate.model import infer
from moe_router.index.clustering import nearest_centroid
from moe_router.index.expert import centroids
from moe_router.metrics import accuracy_at_k
from moe_router.routing.parts import CalibrationSet
from moe_router.train.calibrate import MIN_BIAS_QUERIES, unjudged_at_mean
from moe_router.train.finetune import FineTuneConfig, _keep_better, fine_tune, judged_queries
from tests.helpers import DIM, MANIFEST, clusters, version_path, write_manifest

REPO = Path(__file__).resolve().parents[1]

FAST = FineTuneConfig(steps=5, replay=1.0, min_replay=0)


def calibrated_router() -> tuple[Router, list[np.ndarray]]:
    """Four experts over clusters 0-3 (80 stored vectors each), 20 held-out queries each as the calibration set."""
    xs = clusters(5, 120, DIM, seed=3, noise=0.9)
    router = Router(DIM, "ip")
    for i in range(4):
        router.add_expert(f"e{i}", xs[i][:80])
    torch.manual_seed(0)
    router.set_gate(initial_gate(router.experts, hidden_dims=[32], dropout=0.0))
    xq = np.concatenate([xs[i][80:100] for i in range(4)])
    router.set_calibration(CalibrationSet(router.prepare(xq)[0], [f"e{i}" for i in range(4) for _ in range(20)]))
    return router, xs


# ---------------------------------------------------------------- the record and the router's changes


def test_calibration_set__naming_an_unknown_expert__is_refused() -> None:
    router, xs = calibrated_router()
    with pytest.raises(ValueError, match="'nope', which is not an expert"):
        router.set_calibration(CalibrationSet(xs[0][:2], ["e0", "nope"]))
    with pytest.raises(ValueError, match="calibration queries are 5-d"):
        router.set_calibration(CalibrationSet(np.ones((2, 5)), ["e0", "e1"]))
    with pytest.raises(ValueError, match="2 queries but 1 experts"):
        CalibrationSet(xs[0][:2], ["e0"])
    assert len(router.calibration) == 80  # a refused change leaves the set as it was


def test_remove_expert__drops_its_calibration_queries_only() -> None:
    router, _ = calibrated_router()
    kept = router.calibration.x[20:]
    router.remove_expert("e0")
    assert router.calibration.experts == tuple(f"e{i}" for i in range(1, 4) for _ in range(20))
    np.testing.assert_array_equal(router.calibration.x, kept)


def test_merge__gives_both_experts_queries_to_the_merged_one() -> None:
    router, _ = calibrated_router()
    lc.merge_experts(router, "e0", "e2", name="both")
    got = np.array(router.calibration.experts)
    assert (got[:20] == "both").all() and (got[40:60] == "both").all() and (got[20:40] == "e1").all()


def test_split__gives_each_query_to_the_part_nearest_it() -> None:
    router, _ = calibrated_router()
    x = router.calibration.x[20:40].copy()
    parts = lc.split_expert(router, "e1", 2, names=["e1a", "e1b"])
    want = np.array(["e1a", "e1b"])[nearest_centroid(x, centroids(parts), router.metric)]
    assert list(router.calibration.experts[20:40]) == list(want)
    assert set(router.calibration.experts) == {"e0", "e1a", "e1b", "e2", "e3"}


# ---------------------------------------------------------------- checkpoints


def test_save_load__keeps_the_calibration_set_and_its_settings(tmp_path: Path) -> None:
    router, _ = calibrated_router()
    cal = router.calibration
    router.set_calibration(CalibrationSet(cal.x, cal.experts, load_floor=0.4, bias=True))
    router.save(tmp_path / "ckpt")
    back = Router.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(back.calibration.x, router.calibration.x)
    assert back.calibration.experts == router.calibration.experts
    assert (back.calibration.load_floor, back.calibration.bias) == (0.4, True)
    np.testing.assert_array_equal(back.gate_probs(back.calibration.x), router.gate_probs(router.calibration.x))


def test_checkpoint_without_calibration__loads_with_an_empty_set(tmp_path: Path) -> None:
    router, _ = calibrated_router()
    router.save(tmp_path / "ckpt")
    manifest = json.loads((version_path(tmp_path / "ckpt") / MANIFEST).read_text())
    del manifest["calibration"], manifest["files"][CALIBRATION_FILE]  # as a checkpoint written before the set
    write_manifest(tmp_path / "ckpt", manifest)
    back = Router.load(tmp_path / "ckpt")
    assert len(back.calibration) == 0 and back.calibration.dim == DIM


def test_checkpoint_whose_calibration_names_no_expert__is_refused(tmp_path: Path) -> None:
    router, _ = calibrated_router()
    router.save(tmp_path / "ckpt")
    manifest = json.loads((version_path(tmp_path / "ckpt") / MANIFEST).read_text())
    manifest["calibration"]["experts"][3] = "gone"
    write_manifest(tmp_path / "ckpt", manifest)
    with pytest.raises(CheckpointError, match=r"calibration.experts\[3\] is 'gone', which is not an expert"):
        Router.load(tmp_path / "ckpt")


def test_checkpoint_with_a_changed_calibration_file__is_refused(tmp_path: Path) -> None:
    router, _ = calibrated_router()
    router.save(tmp_path / "ckpt")
    path = version_path(tmp_path / "ckpt") / CALIBRATION_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="calibration.npy is corrupted"):
        Router.load(tmp_path / "ckpt")


# ---------------------------------------------------------------- fine-tunes


def test_fine_tune__replays_the_calibration_queries_and_recalibrates() -> None:
    router, xs = calibrated_router()
    router.add_expert("e4", xs[4][:80])
    temperature = float(router.gate.temperature)
    result = fine_tune(router, ["e4"], FineTuneConfig(**{**vars(FAST), "query_weight": 0.5}))
    assert result.queries == 80 and result.recalibrated
    assert result.pairs == 80 + 80 + 80  # e4's vectors, as many replayed, the judged queries
    assert result.old_acc is not None and result.new_acc is not None
    assert float(router.gate.temperature) != temperature  # refitted on the calibration set
    cal = router.calibration
    new_acc = accuracy_at_k(router.gate_probs(cal.x), router.expert_indices(cal.experts), 1)
    assert new_acc == pytest.approx(result.old_acc if result.kept_old_gate else result.new_acc)


def test_fine_tune_with_replay_and_recalibration_off__trains_as_before() -> None:
    router, xs = calibrated_router()
    router.add_expert("e4", xs[4][:80])
    temperature = float(router.gate.temperature)
    off = FineTuneConfig(steps=5, replay=1.0, min_replay=0, query_weight=0.0, recalibrate=False, keep_margin=None)
    result = fine_tune(router, ["e4"], off)
    assert (result.queries, result.recalibrated, result.kept_old_gate, result.pairs) == (0, False, False, 160)
    assert float(router.gate.temperature) == temperature


def test_keep_better__puts_the_old_gate_back_only_when_the_new_one_is_worse() -> None:
    router, _ = calibrated_router()
    before = router.gate
    x, gold = router.calibration.x, router.expert_indices(router.calibration.experts)
    broken = initial_gate(router.experts, hidden_dims=[32], dropout=0.0)
    broken.shift_bias(torch.tensor([0.0, 0.0, 0.0, 100.0]))  # everything goes to e3: 1/4 of the queries right
    router.set_gate(broken)
    kept, old, new = _keep_better(router, before, x, gold, np.ones(len(x), bool), 0.01)
    assert kept and router.gate is before and new == pytest.approx(0.25) and old > 0.5
    assert old == accuracy_at_k(infer(before, x, "probs"), gold, 1)
    kept, old2, new2 = _keep_better(router, broken, x, gold, np.ones(len(x), bool), 0.01)
    assert not kept and router.gate is before and (old2, new2) == (new, old)


def test_fine_tune_from_a_worse_gate__is_refused_by_the_margin_and_kept_by_none() -> None:
    router, xs = calibrated_router()
    router.add_expert("e4", xs[4][:80])
    harsh = FineTuneConfig(steps=30, lr=0.5, replay=0.0, min_replay=0, query_weight=0.0, recalibrate=False)
    before = router.gate
    result = fine_tune(router, ["e4"], harsh)  # a huge step on e4 alone: the old experts' queries go to e4
    assert result.new_acc < result.old_acc - 0.01 and result.kept_old_gate and router.gate is before
    result = fine_tune(router, ["e4"], FineTuneConfig(**{**vars(harsh), "keep_margin": None}))
    assert not result.kept_old_gate and router.gate is not before


def test_bias_refit_without_an_experts_queries__leaves_it_at_the_others_mean_offset() -> None:
    router, xs = calibrated_router()
    router.add_expert("e4", xs[0][:80] + 0.3 * xs[4][:80])  # near e0; no calibration query belongs to e4
    cal = router.calibration
    gold = router.expert_indices(cal.experts)
    raw, _ = fit_bias_temperature(infer(router.gate, cal.x, "logits"), gold, min_queries=MIN_BIAS_QUERIES)
    assert raw[4] == 0.0 and raw[:4].mean() > 0.05  # fitted alone, the others all rise against e4
    fixed = unjudged_at_mean(raw, gold)
    assert fixed[4] == pytest.approx(raw[:4].mean()) and np.array_equal(fixed[:4], raw[:4])
    assert np.array_equal(unjudged_at_mean(raw[:4], gold), raw[:4])  # every expert judged: unchanged


# ---------------------------------------------------------------- judged queries that arrive later


def test_judged_queries__add_positive_feedback_on_current_experts() -> None:
    router, xs = calibrated_router()
    router.record_feedback(xs[1][100], "e1", True)
    router.record_feedback(xs[2][100], "e2", False)  # negative: not a judged query of e2
    router.record_feedback(xs[3][100], "e3", True)
    judged = judged_queries(router)
    assert len(judged) == 82 and judged.experts[80:] == ("e1", "e3")
    assert len(judged_queries(router, feedback=False)) == 80
    router.remove_expert("e3")
    assert judged_queries(router).experts[60:] == ("e1",)


def test_add_judged_file__adds_its_queries_and_names_a_bad_line(tmp_path: Path) -> None:
    router, xs = calibrated_router()
    router.add_expert("e4", xs[4][:80])
    n = lc.add_judged_queries(router, xs[4][100:110], ["e4"] * 10)
    assert n == 10 and router.calibration.experts[-10:] == ("e4",) * 10
    with pytest.raises(KeyError, match="unknown expert 'e9'"):
        lc.add_judged_queries(router, xs[4][:1], ["e9"])
    bad = tmp_path / "judged.jsonl"
    bad.write_text('{"text": "a question", "expert": "e4"}\n{"text": "", "expert": "e4"}\n')
    with pytest.raises(ValueError, match=r"judged.jsonl:2: 'text' must be a non-empty string"):
        lc.read_judged_file(bad)
    bad.write_text('{"text": "a question", "expert": "e4"}\n')
    assert lc.read_judged_file(bad) == (["a question"], ["e4"])
    assert len(router.calibration) == 90


def test_train_router__keeps_the_queries_it_calibrated_on(tmp_path: Path) -> None:
    from moe_router.apps.train import train
    from tests.test_training import _train_overrides, compose_config

    result = train(compose_config("train", _train_overrides(tmp_path)))
    router = result.router
    dataset_val = router.calibration
    assert len(dataset_val) > 0 and set(dataset_val.experts) <= set(router.expert_names)
    assert dataset_val.load_floor == 0.4  # train.yaml's load_floor, recorded for the recalibration
    back = Router.load(tmp_path / "ckpt")
    np.testing.assert_array_equal(back.calibration.x, dataset_val.x)


# ---------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_add_source_benchmark_smoke_mode__runs_to_the_end(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "add_source.py"), "--smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "+ fine_tune (default: recalibrate, guard)" in proc.stdout

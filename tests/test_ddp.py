"""trainer=ddp: two CPU processes (gloo) train to the quality of one process and write one checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_router import Router
from moe_router.data.datasets import load_dataset
from moe_router.metrics import accuracy_at_k
from tests.helpers import REPO

# Same data, seed and epochs; with 2 processes each optimiser step sees 2 batches, so there are
# half as many steps. One demo validation or test query is 0.01 of acc@1.
TOLERANCE = 0.03


def _train(tmp_path: Path, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    ckpt = tmp_path / "out" / name
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "embedder=hashing",
            "trainer.enable_progress_bar=false",
            f"out={ckpt}",
            f"cache_dir={tmp_path}/cache",
            f"hydra.run.dir={tmp_path}/hydra_{name}",
            *overrides,
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, ckpt


def _test_acc1(router: Router) -> float:
    data = load_dataset()  # the demo corpus, as trained on
    xq, _ = router.prepare(data.texts("test"))
    gold = np.array([router.expert_indices([e])[0] for e in (r.domain for r in data.split("test"))])
    return accuracy_at_k(router.gate_probs(xq), gold, 1)


@pytest.mark.slow  # two trainings, three Python processes importing torch and Lightning: about 40 s
def test_trainer_ddp__two_cpu_processes_match_one_process_and_write_one_checkpoint(tmp_path: Path) -> None:
    _, single = _train(tmp_path, "single", "trainer=default", "trainer.accelerator=cpu")
    ddp_run, ddp = _train(tmp_path, "ddp", "trainer=ddp")

    log = ddp_run.stdout + ddp_run.stderr
    # Two processes ran the training (Lightning's own "distributed_backend=gloo" INFO lines are silenced by the
    # entry points): rank 1 re-ran the script under Hydra and finished.
    assert log.count("Trained a gate over 10 experts") == 2, log[-3000:]
    # Rank 1 shares rank 0's Hydra run directory and writes no second .hydra config there.
    assert sorted(p.name for p in (tmp_path / "hydra_ddp").iterdir() if p.name.startswith(".")) == [".hydra"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ddp", "single"]  # no temporary leftovers

    one, two = Router.load(single), Router.load(ddp)
    assert two.config["trainer"]["strategy"] == "ddp"
    assert two.config["trainer"]["devices"] == 2
    assert two.expert_names == one.expert_names
    for key in ("val/acc@1", "val/recall@10"):
        assert abs(two.metrics[key] - one.metrics[key]) <= TOLERANCE, (
            key,
            one.metrics,
            two.metrics,
        )
    assert abs(_test_acc1(two) - _test_acc1(one)) <= TOLERANCE, (_test_acc1(one), _test_acc1(two))
    assert _test_acc1(two) > 0.3  # a trained gate (10 experts: chance is 0.1; measured 0.69 and 0.71), not a fresh one

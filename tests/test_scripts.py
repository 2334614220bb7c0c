"""The thin entry points: scripts/train.py and scripts/evaluate.py (Hydra), and the `moe-router` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_router import Router
from moe_router.cli import main as cli_main
from tests.helpers import REPO, write_jsonl

BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path = REPO, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_then_evaluate_scripts__write_checkpoint_and_report(tmp_path: Path) -> None:
    ckpt, report = tmp_path / "ckpt", tmp_path / "r.json"
    train = _run(
        [
            sys.executable,
            "scripts/train.py",
            "embedder=hashing",
            "trainer.max_epochs=2",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            f"out={ckpt}",
            f"log_dir={tmp_path}/logs",
            f"cache_dir={tmp_path}/c",
            f"hydra.run.dir={tmp_path}/hydra_train",
        ]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "Trained a gate over 10 experts (400 vectors)" in train.stdout and str(ckpt) in train.stdout
    assert Router.load(ckpt).config["trainer"]["max_epochs"] == 2

    evaluate = _run(
        [
            sys.executable,
            "scripts/evaluate.py",
            f"ckpt={ckpt}",
            f"cache_dir={tmp_path}/c",
            f"report={report}",
            f"hydra.run.dir={tmp_path}/hydra_eval",
            f"++out_dir={tmp_path}/eval_out",  # ++: set or add the key
        ]
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads(report.read_text())
    for key in ("acc@1", "acc@2", "recall@10@1", "recall@10@2", "recall@10@4", "scanned@1", "scanned@2", "scanned@4"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["scanned@2"] == pytest.approx(0.2)  # 10 equal experts of 40 vectors: 2 of them = 20%
    assert {"load@1", "queries", "experts", "vectors"} <= set(result)
    assert (result["dataset"], result["split"], result["queries"]) == ("demo", "test", 100)
    assert "acc@1" in evaluate.stdout and str(report) in evaluate.stdout

    route = _run([str(BIN / "moe-router"), "route", "--ckpt", str(ckpt), "How do I fix an auth bug?"])
    assert route.returncode == 0, route.stderr
    names = set(Router.load(ckpt).expert_names)
    printed = [line.split()[0] for line in route.stdout.splitlines() if "confidence" in line]
    assert len(printed) == 2 and set(printed) <= names


@pytest.fixture
def saved_ckpt(text_router: Router, tmp_path: Path) -> Path:
    return text_router.save(tmp_path / "ckpt")


def test_evaluate_script__evaluates_a_checkpoint_without_importing_lightning(saved_ckpt: Path, tmp_path: Path) -> None:
    """scripts/evaluate.py and the whole evaluation it runs never load the training framework."""
    code = f"""
import importlib.util, sys
from hydra import compose, initialize_config_dir
spec = importlib.util.spec_from_file_location("evaluate_script", "scripts/evaluate.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
with initialize_config_dir(config_dir={str(REPO / "configs")!r}, version_base="1.3"):
    cfg = compose("eval", ["data=jsonl", "data.path={write_jsonl(tmp_path / "d.jsonl")}", "ckpt={saved_ckpt}",
                           "speed_batches=[1]", "out_dir={tmp_path / "out"}"])
report = sys.modules["moe_router.apps.evaluate"].evaluate_checkpoint(cfg)
assert report["queries"] == 12, report["queries"]
print(sorted(m for m in sys.modules if m == "lightning" or m.startswith(("lightning.", "pytorch_lightning"))))
"""
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_cli_entry_point_route__prints_expert_names_with_confidence(saved_ckpt: Path) -> None:
    proc = _run(
        [
            str(BIN / "moe-router"),
            "route",
            "--ckpt",
            str(saved_ckpt),
            "--top-experts",
            "1",
            "a question about comet orbit",
            "a question about flour and butter",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if "confidence" in line]
    assert [line[0] for line in lines] == ["astronomy", "cooking"]
    assert all(0.0 < float(line[2]) <= 1.0 for line in lines)


def test_cli_missing_checkpoint__exits_2_with_clear_message(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "moe_router.cli", "route", "--ckpt", str(tmp_path / "missing"), "query"])
    assert proc.returncode == 2
    assert f"moe-router: error: no checkpoint at {tmp_path / 'missing'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_search__prints_hits_grouped_by_expert(saved_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        cli_main(["search", "--ckpt", str(saved_ckpt), "-k", "2", "--top-experts", "1", "a question about bond"]) == 0
    )
    out = capsys.readouterr().out
    assert "finance (confidence" in out and out.count("score ") == 2 and "a question about" in out


def test_cli_search_per_expert__prints_k_hits_for_each_expert(saved_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "search",
        "--ckpt",
        str(saved_ckpt),
        "-k",
        "2",
        "--top-experts",
        "2",
        "--per-expert",
        "a question about bond",
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("(confidence") == 2 and out.count("score ") == 4


def test_cli_stats__lists_every_expert(saved_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["stats", "--ckpt", str(saved_ckpt)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["astronomy", "cooking", "finance"]
    assert out.count("vectors 15") == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["route", "--top-experts", "9", "query"], "top_experts must be between 1 and 3"),
        (["search", "-k", "0", "query"], "k must be an integer >= 1, got int 0"),
        (["search", "-k", "46", "query"], "k must be between 1 and 45"),
        (["search", "--prior-weight", "-1", "query"], "prior_weight must be a finite number >= 0"),
    ],
)
def test_cli_bad_arguments__exit_2_with_message(
    saved_ckpt: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert cli_main([args[0], "--ckpt", str(saved_ckpt), *args[1:]]) == 2
    assert message in capsys.readouterr().err


def test_cli_corrupted_checkpoint__exits_2(saved_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    (saved_ckpt / "CURRENT").write_text("{")
    assert cli_main(["stats", "--ckpt", str(saved_ckpt)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_confidence__never_prints_a_rounded_certainty() -> None:
    from moe_router.cli import confidence

    assert [confidence(p) for p in (0.99999, 1.0, 1e-5, 0.0, 0.5)] == ["> 0.999", "1.000", "< 0.001", "0.000", "0.500"]

"""What the two cross-validation scripts (cv.py on retrieval, cv_intents.py on intent sets) share."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
PER_QUERY = ("confidence", "correct")  # per-query arrays a fold keeps for the pooled ECE; left out of the files


def compose_cfg(name: str, overrides: list[str]) -> DictConfig:
    """configs/<name>.yaml with `overrides`, as the scripts compose it."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(name, overrides=overrides)


def slim(folds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in f.items() if k not in PER_QUERY} for f in folds]


def write_reports(
    out: Path,
    data: str,
    folds: int,
    run_fold: Callable[[int], dict[str, Any]],
    summarise: Callable[[list[dict[str, Any]]], dict[str, Any]],
    markdown: Callable[[list[dict[str, Any]], dict[str, Any]], str],
) -> None:
    """Run every fold of `data` (<data>.partial.json kept meanwhile: it survives a stopped run), then
    write <out>/<data>.md and <data>.json and print the markdown."""
    done: list[dict[str, Any]] = []
    partial = out / f"{data}.partial.json"
    for f in range(folds):
        done.append(run_fold(f))
        partial.write_text(json.dumps(slim(done), indent=1))
    summary = summarise(done)
    text = markdown(done, summary)
    (out / f"{data}.md").write_text(text)
    (out / f"{data}.json").write_text(json.dumps({"folds": slim(done), "summary": summary}, indent=1))
    partial.unlink()
    print(text)

"""scripts/evaluate.py: evaluate a checkpoint on a dataset split; write the report where the config says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from moe_router.apps.common import run_dir
from moe_router.embed.cache import default_cache_dir
from moe_router.eval.intents import evaluate_intents
from moe_router.eval.report import write_outputs, write_retrieval_outputs
from moe_router.eval.retrieval import evaluate_retrieval
from moe_router.logs import quiet_libraries
from moe_router.routing.router import Router


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate cfg.ckpt on cfg.data's cfg.split against the baselines (data with judgments: against them).

    Tables and plots go to cfg.out_dir (default: Hydra's run directory, never the published
    reports/), the JSON report also to cfg.report when set.
    """
    quiet_libraries()
    router = Router.load(cfg.ckpt, cache_dir=cfg.cache_dir or default_cache_dir())
    dataset = instantiate(cfg.data)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir()
    if dataset.has_judgments:  # documents and judged queries: IR metrics against the qrels
        report, _ = evaluate_retrieval(
            router,
            dataset,
            split=cfg.split,
            top_p=cfg.top_p,
            max_experts=cfg.max_experts,
            p_grid=list(cfg.p_grid),
            baselines=list(cfg.baselines),
            seed=cfg.seed,
            checkpoint=str(cfg.ckpt),
        )
        write_retrieval_outputs(report, out_dir)
    else:
        report, scores = evaluate_intents(
            router,
            dataset,
            split=cfg.split,
            k=int(cfg.k),
            experts_searched=list(cfg.experts_searched),
            baselines=list(cfg.baselines),
            capacity_factor=cfg.capacity_factor,
            speed_batches=list(cfg.speed_batches),
            seed=cfg.seed,
            checkpoint=str(cfg.ckpt),
            top_p=cfg.top_p,
            max_experts=cfg.max_experts,
            p_grid=list(cfg.p_grid),
        )
        write_outputs(report, out_dir, report["experts_searched"], report["k"], router, scores)
    report["out_dir"] = str(out_dir)
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.report).write_text(json.dumps(report, indent=2))
    return report

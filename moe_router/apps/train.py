"""scripts/train.py: the dataset, embedder, gate, trainer and module from the config -> train_router -> save."""

from __future__ import annotations

import logging
from dataclasses import fields

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_router.apps.common import run_dir
from moe_router.embed.cache import CachedEmbedder, default_cache_dir
from moe_router.logs import quiet_libraries
from moe_router.train.pipeline import TargetsConfig, TrainConfig, TrainResult, train_router

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> TrainResult:
    """Train a router as configs/train.yaml says and save it to cfg.out (by rank 0 when training is distributed)."""
    quiet_libraries()
    warning = layout_mismatch(cfg)
    if warning:
        log.warning(warning)
    dataset = instantiate(cfg.data)
    embedder = (
        CachedEmbedder(instantiate(cfg.embedder), cfg.cache_dir or default_cache_dir())
        if dataset.needs_embedder
        else None
    )
    result = train_router(
        dataset,
        embedder,
        train_config(cfg),
        gate=instantiate(cfg.model, _partial_=True),
        trainer=instantiate(cfg.trainer, _partial_=True),
        module=instantiate(cfg.module),
        log_dir=cfg.log_dir or run_dir(),
        record=OmegaConf.to_container(cfg, resolve=True),
    )
    if result.global_zero:
        result.router.save(cfg.out)
    return result


def train_config(cfg: DictConfig) -> TrainConfig:
    """The training settings of configs/train.yaml (its top level and `targets`) as a TrainConfig."""
    node = OmegaConf.to_container(cfg, resolve=True)
    settings = {f.name: node[f.name] for f in fields(TrainConfig) if f.name != "targets"}
    return TrainConfig(**settings, targets=TargetsConfig(**node["targets"]))


def layout_mismatch(cfg: DictConfig) -> str | None:
    """Why configs/cv_chosen/<data>.yaml's settings do not fit this run's experts, or None when they do.

    Cross-validation chose them for one layout of the data (its `chosen_for`: no partition, and for
    the intent sets the default expert_key); k-means shards or label experts are other routing
    problems, which that choice never looked at.
    """
    chosen = cfg.get("chosen_for")
    if not chosen:
        return None
    run = {"partition": cfg.get("partition"), "expert_key": cfg.data.get("expert_key")}
    differ = [key for key in chosen if key in run and chosen[key] != run[key]]
    if not differ:
        return None
    wanted = ", ".join(f"{key}={_shown(chosen[key])}" for key in differ)
    got = ", ".join(f"{key}={_shown(run[key])}" for key in differ)
    return (
        f"configs/cv_chosen/{cfg.data.name}.yaml was chosen by cross-validation for {wanted}, but this run "
        f"trains {got}: its settings were not chosen for these experts; add ~cv_chosen to train with "
        "train.yaml's own values (or set them on the command line)"
    )


def _shown(value: object) -> str:
    """A config value as it is written on the command line (None as null)."""
    return "null" if value is None else str(value)

"""scripts/train.py: the dataset, embedder, gate, trainer and module from the config -> train_router -> save."""

from __future__ import annotations

from dataclasses import fields

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_router.apps.common import run_dir
from moe_router.embed.cache import CachedEmbedder, default_cache_dir
from moe_router.logs import quiet_libraries
from moe_router.train.pipeline import TargetsConfig, TrainConfig, TrainResult, train_router


def train(cfg: DictConfig) -> TrainResult:
    """Train a router as configs/train.yaml says and save it to cfg.out (by rank 0 when training is distributed)."""
    quiet_libraries()
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

"""scripts/train.py: the dataset, embedder, gate, trainer and module from the config -> train_router -> save."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_router.apps.common import run_dir
from moe_router.embed.cache import CachedEmbedder, default_cache_dir
from moe_router.logs import quiet_libraries
from moe_router.train.pipeline import TargetsConfig, TrainConfig, TrainResult, train_router

log = logging.getLogger(__name__)
CV_CHOSEN = (
    Path(__file__).resolve().parents[2] / "configs" / "cv_chosen"
)  # the repository's configs (scripts/ read them)


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


def layout_mismatch(cfg: DictConfig, chosen_dir: Path = CV_CHOSEN) -> str | None:
    """Why the cv_chosen file's settings do not fit this run's experts, or None when they do.

    Cross-validation chose them for one layout of the data (the file's `chosen_for`: its data, its
    partition and, where it names one, the partition's size cap, and for the intent sets its
    expert_key); k-means shards or label experts are other routing problems, which that choice never
    looked at. When another file in `chosen_dir` was chosen for this run's layout, the message names it.
    """
    chosen = cfg.get("chosen_for")
    if not chosen:
        return None
    run = _layout(cfg)
    differ = [key for key in chosen if key in run and chosen[key] != run[key]]
    if not differ:
        return None
    files = _chosen_files(chosen_dir)
    applied = next((name for name, layout in files.items() if layout == dict(chosen)), None)
    fitting = [name for name, layout in files.items() if layout and all(run.get(k) == v for k, v in layout.items())]
    wanted = ", ".join(f"{key}={_shown(chosen[key])}" for key in differ)
    got = ", ".join(f"{key}={_shown(run[key])}" for key in differ)
    way_out = (
        f"configs/cv_chosen/{fitting[0]}.yaml was chosen for this layout: add cv_chosen={fitting[0]} "
        "(or ~cv_chosen to train with train.yaml's own values)"
        if fitting
        else "add ~cv_chosen to train with train.yaml's own values (or set them on the command line)"
    )
    return (
        f"configs/cv_chosen/{applied or cfg.data.name}.yaml was chosen by cross-validation for {wanted}, but this "
        f"run trains {got}: its settings were not chosen for these experts; {way_out}"
    )


def _layout(cfg: DictConfig) -> dict[str, object]:
    """What a cv_chosen file's chosen_for is compared with: the run's data, partition (and its size cap) and
    expert_key."""
    return {
        "data": cfg.data.get("name"),
        "partition": cfg.get("partition"),
        "partition_max_imbalance": cfg.get("partition_max_imbalance"),
        "expert_key": cfg.data.get("expert_key"),
    }


def _chosen_files(chosen_dir: Path) -> dict[str, dict[str, object]]:
    """Each cv_chosen file's name and chosen_for (empty when it names none); none when the folder is absent."""
    if not chosen_dir.is_dir():
        return {}
    return {path.stem: dict(OmegaConf.load(path).get("chosen_for") or {}) for path in sorted(chosen_dir.glob("*.yaml"))}


def _shown(value: object) -> str:
    """A config value as it is written on the command line (None as null)."""
    return "null" if value is None else str(value)

"""scripts/train.py: build experts from cfg.data, train the gate with Lightning, calibrate, save."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from moe_router.logs import quiet_libraries
from moe_router.data.build import router_from_dataset
from moe_router.data.datasets import TextDataset, VectorDataset
from moe_router.embed.cache import CachedEmbedder, default_cache_dir
from moe_router.gate.model import Gate
from moe_router.index.clustering import nearest_centroid
from moe_router.index.expert import centroids
from moe_router.routing.calibrate import calibrate, validation_metrics
from moe_router.train.fit import fit_router


@dataclass
class TrainSummary:
    out: Path
    experts: int
    vectors: int
    metrics: dict[str, float]
    fit_seconds: float
    total_seconds: float
    epochs: int


def train(cfg: DictConfig) -> TrainSummary:
    """Build experts from cfg.data's train split, train the gate with Lightning, save the checkpoint."""
    quiet_libraries()
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dataset: TextDataset | VectorDataset = instantiate(cfg.data)
    embedder = None if isinstance(dataset, VectorDataset) else CachedEmbedder(
        instantiate(cfg.embedder), cfg.cache_dir or default_cache_dir())
    router = router_from_dataset(dataset, embedder, cfg.metric, cfg.partition, cfg.seed, cfg.partition_max_imbalance)
    if cfg.partition:  # learned sharding: a query's gold expert is the shard of its nearest centroid
        val_queries = dataset.queries("val")
        gold = nearest_centroid(router.prepare_queries(val_queries)[0], centroids(router.experts), router.metric) if len(val_queries) else []
        val_experts = [router.expert_names[g] for g in gold]
    else:
        rows = [r for r in dataset.split("val") if getattr(r, dataset.expert_key) in set(dataset.experts)]
        val_queries, val_experts = [r.text for r in rows], [getattr(r, dataset.expert_key) for r in rows]
    if not len(val_queries):
        raise ValueError(f"dataset {dataset.name!r} has no validation rows for its experts; add split 'val' rows "
                         "or set data.val_fraction > 0 to carve them from train")
    log_dir = Path(cfg.log_dir) if cfg.log_dir else run_dir()
    members = int(cfg.model.get("members", 1))
    fits, gates = [], []
    for i in range(members):  # an ensemble: members trained independently (own seed), then assembled
        sub = log_dir / f"member{i}" if members > 1 else log_dir
        model = instantiate(cfg.model, dim=router.dim, num_experts=router.num_experts, members=1,
                            max_prototypes=cfg.model.get("max_prototypes", 4096) // members)
        gate = router.install_gate(model, cfg.seed + i)
        trainer = instantiate(
            cfg.trainer,
            callbacks=[ModelCheckpoint(dirpath=sub / "lightning", monitor=cfg.monitor, mode="max", save_top_k=1)],
            logger=CSVLogger(str(sub), name="logs"),
        )
        fits.append(fit_router(
            router, val_queries=val_queries, val_experts=val_experts,
            targets=cfg.targets.kind, label_weight=cfg.targets.label_weight, neighbours=cfg.targets.neighbours,
            max_queries=cfg.targets.max_queries, module=instantiate(cfg.module)(gate=gate), trainer=trainer,
            batch_size=cfg.batch_size, monitor=cfg.monitor, seed=cfg.seed + i,
        ))
        gates.append(router.gate)
    fit = fits[0]
    metrics = {**fit.metrics, "fit_seconds": sum(f.seconds for f in fits)}
    if members > 1:
        router.gate = Gate.assemble(gates).eval()
        metrics.update(validation_metrics(router, val_queries, val_experts, cfg.targets.neighbours, cfg.module.top_k))
        metrics["members"] = members
    if cfg.calibrate:
        metrics.update(calibrate(router, val_queries, val_experts, dataset.oos_texts("val"), cfg.load_floor))
    if trainer.is_global_zero:
        router.save(cfg.out, config=OmegaConf.to_container(cfg, resolve=True), metrics=metrics)
    return TrainSummary(Path(cfg.out), router.num_experts, router.ntotal,
                        {k: v for k, v in metrics.items() if k.startswith("val/")}, metrics["fit_seconds"],
                        time.perf_counter() - start, fit.epochs)


def run_dir() -> Path:
    """Hydra's output directory when running under @hydra.main, else a fresh temporary one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(tempfile.mkdtemp(prefix="moe_router-"))


"""scripts/train.py: build experts from cfg.data, train the gate with Lightning, calibrate, save."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from moe_router.apps.common import run_dir
from moe_router.data.beir import BeirDataset
from moe_router.data.datasets import TextDataset, VectorDataset
from moe_router.embed.cache import CachedEmbedder, default_cache_dir
from moe_router.gate.init import with_prototypes
from moe_router.gate.model import Gate
from moe_router.index.clustering import nearest_centroid
from moe_router.index.expert import centroids
from moe_router.logs import quiet_libraries
from moe_router.routing.router import Router, check_prior_weight
from moe_router.train.build import router_from_dataset
from moe_router.train.calibrate import calibrate_router, router_validation
from moe_router.train.fit import fit_router
from moe_router.train.targets import Pairs, query_targets

# prior_weight=auto on BEIR data: merged hits ranked by similarity + 0.1 * log p(source). Measured on dev
# (docs/retrieval.md): 0.05 to 0.2 all beat 0 when 2+ sources are searched, on both benchmarks.
PRIOR_WEIGHT = 0.1


@dataclass
class TrainSummary:
    out: Path
    experts: int
    vectors: int
    metrics: dict[str, float]
    fit_seconds: float
    total_seconds: float
    epochs: int
    untrained_kept: bool = False  # no epoch beat the gate as it started (a prototype gate) on validation


def train(cfg: DictConfig) -> TrainSummary:
    """Build experts from cfg.data's train split, train the gate with Lightning, save the checkpoint."""
    quiet_libraries()
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dataset: TextDataset | VectorDataset = instantiate(cfg.data)
    embedder = (
        None
        if isinstance(dataset, VectorDataset)
        else CachedEmbedder(instantiate(cfg.embedder), cfg.cache_dir or default_cache_dir())
    )
    router = router_from_dataset(dataset, embedder, cfg.metric, cfg.partition, cfg.seed, cfg.partition_max_imbalance)
    stored_val = False  # whether the validation queries are stored vectors (no untrained candidate then)
    if cfg.partition:  # learned sharding: a query's gold expert is the shard of its nearest centroid
        val_queries = dataset.queries("val")
        gold = (
            nearest_centroid(router.prepare(val_queries)[0], centroids(router.experts), router.metric)
            if len(val_queries)
            else []
        )
        val_experts = [router.expert_names[g] for g in gold]
    elif isinstance(dataset, BeirDataset) and not dataset.queries("val"):
        # No validation judgments: validate on a seeded 10% of the documents (their source is their gold).
        rows = dataset.split("train")
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(rows), size=max(1, len(rows) // 10), replace=False))
        val_queries, val_experts = [rows[i].text for i in pick], [rows[i].domain for i in pick]
        stored_val = True
    else:
        rows = [r for r in dataset.split("val") if getattr(r, dataset.expert_key) in set(dataset.experts)]
        val_queries, val_experts = [r.text for r in rows], [getattr(r, dataset.expert_key) for r in rows]
    if not len(val_queries):
        raise ValueError(
            f"dataset {dataset.name!r} has no validation rows for its experts; add split 'val' rows "
            "or set data.val_fraction > 0 to carve them from train"
        )
    extra = training_queries(router, dataset, cfg.targets)
    stored_weight = 1.0 - float(cfg.targets.query_weight) if extra else 1.0
    views = pseudo_query_pairs(router, dataset, cfg.targets)
    stored_weight -= sum(v.weight for v in views)
    if stored_weight < 0:
        raise ValueError(
            f"targets.query_weight + targets.pseudo_weight must be <= 1, the stored vectors get the rest; "
            f"got {cfg.targets.query_weight} + {cfg.targets.pseudo_weight}"
        )
    retrieval = isinstance(dataset, BeirDataset) and bool(dataset.queries("val"))
    monitor = resolve_monitor(cfg.monitor, retrieval)
    log_dir = Path(cfg.log_dir) if cfg.log_dir else run_dir()
    members = int(cfg.model.get("members", 1))
    fits, gates = [], []
    for i in range(members):  # an ensemble: members trained independently (own seed), then assembled
        sub = log_dir / f"member{i}" if members > 1 else log_dir
        model = instantiate(
            cfg.model,
            dim=router.dim,
            num_experts=router.num_experts,
            members=1,
            max_prototypes=cfg.model.get("max_prototypes", 4096) // members,
        )
        gate = with_prototypes(model, router.experts, cfg.seed + i)
        if extra and cfg.targets.query_prototypes and gate.prototypes_per_expert:
            add_query_prototypes(gate, extra[0])
        trainer = instantiate(
            cfg.trainer,
            callbacks=[ModelCheckpoint(dirpath=sub / "lightning", monitor=monitor, mode="max", save_top_k=1)],
            logger=CSVLogger(str(sub), name="logs"),
        )
        fits.append(
            fit_router(
                router,
                val_queries=val_queries,
                val_experts=val_experts,
                targets=cfg.targets.kind,
                label_weight=cfg.targets.label_weight,
                neighbours=cfg.targets.neighbours,
                max_queries=cfg.targets.max_queries,
                module=instantiate(cfg.module)(gate=gate),
                trainer=trainer,
                batch_size=cfg.batch_size,
                monitor=monitor,
                seed=cfg.seed + i,
                extra=[*extra, *views],
                stored_weight=stored_weight,
                untrained_candidate=not stored_val,
            )
        )
        gates.append(router.gate)
    fit = fits[0]
    metrics = {**fit.metrics, "fit_seconds": sum(f.seconds for f in fits)}
    if members > 1:
        router.set_gate(Gate.assemble(gates))
        metrics.update(router_validation(router, val_queries, val_experts, cfg.targets.neighbours, cfg.module.top_k))
        metrics["members"] = members
    if cfg.calibrate:
        bias = retrieval if cfg.calibrate_bias == "auto" else bool(cfg.calibrate_bias)
        metrics.update(
            calibrate_router(router, val_queries, val_experts, dataset.oos_texts("val"), cfg.load_floor, bias)
        )
    router.prior_weight = (
        (PRIOR_WEIGHT if isinstance(dataset, BeirDataset) else 0.0)
        if cfg.prior_weight == "auto"
        else check_prior_weight(cfg.prior_weight)
    )
    if trainer.is_global_zero:
        router.set_training_info(OmegaConf.to_container(cfg, resolve=True), metrics)
        router.save(cfg.out)
    return TrainSummary(
        Path(cfg.out),
        router.num_experts,
        router.ntotal,
        {k: v for k, v in metrics.items() if k.startswith("val/")},
        metrics["fit_seconds"],
        time.perf_counter() - start,
        fit.epochs,
        bool(fit.metrics.get("untrained_kept")),
    )


def resolve_monitor(monitor: str, retrieval: bool) -> str:
    """cfg.monitor; 'auto' = val/acc@1 when validating on judged real questions (BEIR dev), else val/recall@10.

    On retrieval data the validation queries are real questions with a judged source, and routing
    them to it is the goal; recall@10 against exhaustive neighbours rewards sources that merely hold
    near documents (distractors). Intent data validates on held-out rows, where recall@10 is the target.
    """
    if monitor == "auto":
        return "val/acc@1" if retrieval else "val/recall@10"
    if monitor not in ("val/acc@1", "val/recall@10"):
        raise ValueError(f"monitor must be 'auto', 'val/acc@1' or 'val/recall@10', got {monitor!r}")
    return monitor


def training_queries(router, dataset, targets: DictConfig) -> list[Pairs]:
    """Real queries as training pairs: the judged queries of a BEIR dataset's train split, target = their sources.

    Only the dataset's train split is read (never test). Empty when there are none (cold start) or
    targets.query_weight is 0.
    """
    if not isinstance(dataset, BeirDataset) or not float(targets.query_weight):
        return []
    texts = dataset.queries(dataset.train_split)
    if not texts:
        return []
    xq, _ = router.prepare(texts)
    gold = router.expert_indices(dataset.gold_sources(dataset.train_split))
    target = query_targets(router, xq, gold, float(targets.query_exhaustive), int(targets.neighbours))
    return [Pairs(xq, target, float(targets.query_weight))]


def pseudo_query_pairs(router: Router, dataset, targets: DictConfig) -> list[Pairs]:
    """Cold start: query-like views of the documents (titles, first sentences) as pseudo-queries of their source."""
    view = targets.get("pseudo_view")
    if not view or not isinstance(dataset, BeirDataset) or not float(targets.pseudo_weight):
        return []
    texts, sources = dataset.pseudo_queries(view)
    if not texts:
        return []
    xq, _ = router.prepare(texts)
    gold = router.expert_indices(sources)
    return [Pairs(xq, query_targets(router, xq, gold), float(targets.pseudo_weight))]


def add_query_prototypes(gate: Gate, queries: Pairs) -> None:
    """Each training query becomes a prototype of the expert its target favours (a memory of past questions)."""
    owner = queries.target.argmax(axis=1)
    for e in np.unique(owner):
        gate.add_prototypes(torch.from_numpy(queries.x[owner == e]), int(e))

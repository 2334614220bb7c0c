"""train_router: a router trained from a dataset, from its experts to its calibrated, installed gate.

Hydra-free: the settings are plain dataclasses mirroring configs/train.yaml, and what Hydra
instantiates there (the gate, the Lightning trainer, the LightningModule) comes in as callables.
What depends on the kind of data (validation queries, judged training queries, pseudo-queries, the
'auto' choices) is asked of the dataset (moe_router.data.base.Dataset).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from moe_router.checks import check_decide_weight, check_prior_weight
from moe_router.data.base import Dataset, ValidationSet
from moe_router.embed.base import Embedder
from moe_router.gate.init import with_prototypes
from moe_router.gate.model import Gate
from moe_router.index.clustering import nearest_centroid
from moe_router.index.expert import centroids
from moe_router.metrics import VAL_ACC1, val_recall
from moe_router.routing.parts import CalibrationSet
from moe_router.routing.router import Router
from moe_router.train.build import router_from_dataset
from moe_router.train.calibrate import calibrate_router, fit_decide_weight, router_validation
from moe_router.train.fit import FitResult, fit_router
from moe_router.train.linear_head import add_linear_head, check_linear_weight, query_labels
from moe_router.train.module import GateModule
from moe_router.train.targets import Pairs, query_targets


@dataclass(frozen=True)
class TargetsConfig:
    """What the gate learns each training query should route to (configs/train.yaml `targets`)."""

    kind: str = "mix"  # label (one-hot expert) | neighbours (share of exact neighbours per expert) | mix
    label_weight: float = 0.5  # mix only: weight of the one-hot label; the rest goes to neighbour shares
    neighbours: int = 10  # k of the exact search behind neighbour shares and val/recall@k
    max_queries: int | None = None  # sample this many stored vectors as training queries (None = all of them)
    query_weight: float = 0.5  # share of the loss from the data's judged training queries; the rest from stored vectors
    query_prototypes: bool = False  # prototype gates: also make each training query a prototype of its gold expert
    pseudo_view: str | None = None  # cold start: that view of each stored row (BEIR: title | first_sentence) as a query
    pseudo_weight: float = 0.0  # share of the loss from those pseudo-queries (taken from the stored vectors' share)
    query_exhaustive: float = 0.0  # weight, in a real query's target, of the experts supplying its exhaustive top-k


@dataclass(frozen=True)
class TrainConfig:
    """How train_router trains (configs/train.yaml's top level); 'auto' takes the dataset's defaults()."""

    seed: int = 0  # seeds torch, numpy, Python and Lightning (member i of an ensemble: seed + i)
    partition: int | None = None  # None = one expert per expert key; n = n experts by k-means (labels unused)
    partition_max_imbalance: float | None = None  # with partition: no shard above this x the mean size (None = plain)
    metric: str = "ip"  # ip = cosine on L2-normalised vectors | l2 = squared Euclidean distance
    monitor: str = "auto"  # val/acc@1 | val/recall@{targets.neighbours} | auto: picks the best epoch
    batch_size: int = 256  # training pairs per optimiser step
    calibrate: bool = True  # fit the temperature (and abstain threshold) on the validation queries
    calibrate_bias: bool | str = "auto"  # with calibrate: one logit offset per expert fitted with the temperature
    prior_weight: float | str = "auto"  # merged hits of several experts ranked by score + w * log p(expert)
    decide_weight: float | str = 0.0  # > 0: multi-source searches keep one source, re-decided from hits; 'fit': on val
    load_floor: float | None = 0.4  # with calibrate: lift experts whose top-1 share is below load_floor / E
    linear_weight: float = 0.0  # a logistic regression beside the MLP: p_gate * p_linear^w (0 = none)
    targets: TargetsConfig = field(default_factory=TargetsConfig)


@dataclass
class TrainResult:
    """A trained router and what its training measured."""

    router: Router  # experts, calibrated gate, prior weight, training info (not saved yet)
    metrics: dict[str, float]  # recorded in the checkpoint: best validation metrics, calibration, fit_seconds, ...
    epochs: int
    untrained_kept: bool  # no epoch beat the gate as it started (a prototype gate) on validation
    global_zero: bool  # this process is the one that saves (rank 0 when the trainer runs distributed)

    @property
    def val_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if k.startswith("val/")}


def train_router(
    dataset: Dataset,
    embedder: Embedder | None,
    config: TrainConfig,
    *,
    gate: Callable[..., Gate],
    trainer: Callable[..., L.Trainer],
    module: Callable[..., GateModule],
    log_dir: str | Path | None = None,
    record: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Build experts from the dataset, train the gate (an ensemble: each member), calibrate it, set the prior weight.

    `gate(dim=, num_experts=, **overrides)` builds the untrained gate the model config describes;
    with members > 1 each member is built with members=1 and its share of max_prototypes, trained
    with seed + i and assembled. `trainer(callbacks=, logger=)` builds a Lightning trainer, and
    `module(gate=)` the LightningModule. Lightning's logs and best weights go under `log_dir`
    (default: a new temporary folder); `record` is the configuration kept in the checkpoint
    (default: `config`).
    """
    if config.decide_weight != "fit":  # refused before any training, not after it
        check_decide_weight(config.decide_weight)
    L.seed_everything(config.seed, workers=True, verbose=False)
    targets = config.targets
    router = router_from_dataset(
        dataset, embedder, config.metric, config.partition, config.seed, config.partition_max_imbalance
    )
    val = _validation(router, dataset, config)
    extra = _query_pairs(router, dataset, targets)
    stored_weight = 1.0 - float(targets.query_weight) if extra else 1.0
    views = _pseudo_pairs(router, dataset, targets)
    stored_weight -= sum(v.weight for v in views)
    if stored_weight < 0:
        raise ValueError(
            f"targets.query_weight + targets.pseudo_weight must be <= 1, the stored vectors get the rest; "
            f"got {targets.query_weight} + {targets.pseudo_weight}"
        )
    defaults = dataset.defaults()
    monitor = resolve_monitor(config.monitor, defaults.monitor, targets.neighbours)
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="moe_router-"))
    members, member_gate = _members(gate, router.dim, router.num_experts)
    fits: list[FitResult] = []
    gates: list[Gate] = []
    for i in range(members):  # an ensemble: members trained independently (own seed), then assembled
        sub = log_dir / f"member{i}" if members > 1 else log_dir
        L.seed_everything(config.seed + i, workers=True, verbose=False)  # a member's start depends on its seed alone
        initial = with_prototypes(member_gate(), router.experts, config.seed + i)
        if extra and targets.query_prototypes and initial.prototypes_per_expert:
            _add_query_prototypes(initial, extra[0])
        run = trainer(
            callbacks=[ModelCheckpoint(dirpath=sub / "lightning", monitor=monitor, mode="max", save_top_k=1)],
            logger=CSVLogger(str(sub), name="logs"),
        )
        wrapped = module(gate=initial)
        fits.append(
            fit_router(
                router,
                val_queries=val.queries,
                val_experts=val.experts,
                targets=targets.kind,
                label_weight=targets.label_weight,
                neighbours=targets.neighbours,
                max_queries=targets.max_queries,
                module=wrapped,
                trainer=run,
                batch_size=config.batch_size,
                monitor=monitor,
                seed=config.seed + i,
                extra=[*extra, *views],
                stored_weight=stored_weight,
                untrained_candidate=not val.stored,
            )
        )
        gates.append(router.gate)
    fit = fits[0]
    metrics = {**fit.metrics, "fit_seconds": sum(f.seconds for f in fits)}
    if members > 1:
        router.set_gate(Gate.assemble(gates))
        metrics.update(router_validation(router, val.queries, val.experts, targets.neighbours, wrapped.top_k))
        metrics["members"] = members
    linear = check_linear_weight(config.linear_weight)
    if linear:
        labelled = query_labels(router, *dataset.training_queries())
        val_x = router.prepare(val.queries)[0]
        metrics.update(
            add_linear_head(
                router, (val_x, router.expert_indices(val.experts)), labelled, linear, targets.query_weight, config.seed
            )
        )
    if config.calibrate:
        bias = defaults.calibrate_bias if config.calibrate_bias == "auto" else bool(config.calibrate_bias)
        metrics.update(
            calibrate_router(router, val.queries, val.experts, dataset.oos_texts("val"), config.load_floor, bias)
        )
        # Kept with the router: a later fine-tune replays these queries and recalibrates on them (train.finetune).
        router.set_calibration(
            CalibrationSet(router.prepare(val.queries)[0], tuple(val.experts), config.load_floor, bias)
        )
    router.prior_weight = (
        defaults.prior_weight if config.prior_weight == "auto" else check_prior_weight(config.prior_weight)
    )
    if config.decide_weight == "fit":  # the weight that best re-decides val's queries among the gate's top two
        gold = router.expert_indices(val.experts)
        fitted = fit_decide_weight(router, router.prepare(val.queries)[0], gold) if len(gold) else None
        router.decide_weight = metrics["decide_weight"] = fitted or 0.0
    else:
        router.decide_weight = config.decide_weight
    router.set_training_info(dict(record) if record is not None else asdict(config), metrics)
    return TrainResult(router, metrics, fit.epochs, bool(fit.metrics.get("untrained_kept")), run.is_global_zero)


def resolve_monitor(monitor: str, default: str, neighbours: int) -> str:
    """The metric that picks the best epoch: `monitor`, or for 'auto' the data's default ('acc@1' | 'recall')."""
    choices = {"acc@1": VAL_ACC1, "recall": val_recall(neighbours)}
    if monitor == "auto":
        return choices[default]
    if monitor not in choices.values():
        raise ValueError(f"monitor must be 'auto', {VAL_ACC1!r} or {val_recall(neighbours)!r}, got {monitor!r}")
    return monitor


def _validation(router: Router, dataset: Dataset, config: TrainConfig) -> ValidationSet:
    """The dataset's validation queries; with k-means experts (learned sharding) gold is the nearest centroid's."""
    val = dataset.validation(config.seed)
    if not len(val.queries):
        raise ValueError(
            f"dataset {dataset.name!r} has no validation rows for its experts; add split 'val' rows "
            "or set data.val_fraction > 0 to carve them from train"
        )
    if config.partition:
        gold = nearest_centroid(router.prepare(val.queries)[0], centroids(router.experts), router.metric)
        return dataclasses.replace(val, experts=[router.expert_names[g] for g in gold])
    return val


def _members(gate: Callable[..., Gate], dim: int, num_experts: int) -> tuple[int, Callable[[], Gate]]:
    """The configured gate's member count, and a factory of one member with its share of the prototype budget."""
    configured = gate(dim=dim, num_experts=num_experts)  # read for its settings; each member is built anew
    if configured.members > 1 and configured.linear_head:
        raise ValueError(
            "model.linear_head=true cannot be trained with model.members > 1 (members are assembled without one); "
            "set linear_weight > 0 to add a fitted linear head to the assembled gate"
        )
    share = configured.max_prototypes // configured.members
    return configured.members, lambda: gate(dim=dim, num_experts=num_experts, members=1, max_prototypes=share)


def _query_pairs(router: Router, dataset: Dataset, targets: TargetsConfig) -> list[Pairs]:
    """The data's judged training queries as training pairs (target: their experts); none when it has none."""
    if not float(targets.query_weight):
        return []
    texts, experts = dataset.training_queries()
    if not texts:
        return []
    xq, _ = router.prepare(texts)
    gold = router.expert_indices(experts)
    target = query_targets(router, xq, gold, float(targets.query_exhaustive), int(targets.neighbours))
    return [Pairs(xq, target, float(targets.query_weight))]


def _pseudo_pairs(router: Router, dataset: Dataset, targets: TargetsConfig) -> list[Pairs]:
    """Cold start: query-like views of the stored rows (titles, first sentences) as pseudo-queries of their expert."""
    if not targets.pseudo_view or not float(targets.pseudo_weight):
        return []
    texts, experts = dataset.pseudo_queries(targets.pseudo_view)
    if not texts:
        return []
    xq, _ = router.prepare(texts)
    return [Pairs(xq, query_targets(router, xq, router.expert_indices(experts)), float(targets.pseudo_weight))]


def _add_query_prototypes(gate: Gate, queries: Pairs) -> None:
    """Each training query becomes a prototype of the expert its target favours (a memory of past questions)."""
    owner = queries.target.argmax(axis=1)
    for e in np.unique(owner):
        gate.add_prototypes(torch.from_numpy(queries.x[owner == e]), int(e))

"""fit_router: train a router's gate on its stored vectors (and validation queries) with Lightning."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from moe_router.gate.init import initial_gate
from moe_router.index.exact import exact_counts
from moe_router.metrics import VAL_ACC1, val_recall
from moe_router.routing.router import Router
from moe_router.train.module import GateModule, RoutingDataModule, default_optimizer, fit_quietly
from moe_router.train.targets import Pairs, make_targets, routing_pairs, weighted_pairs

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    metrics: dict[str, float]  # best validation metrics
    seconds: float  # wall time of trainer.fit
    epochs: int


def fit_router(
    router: Router,
    val_queries: Any = None,
    val_experts: list[str] | None = None,
    targets: str = "mix",
    label_weight: float = 0.5,
    neighbours: int = 10,
    max_queries: int | None = None,
    module: GateModule | None = None,
    trainer: L.Trainer | None = None,
    batch_size: int = 256,
    monitor: str | None = None,
    seed: int = 0,
    extra: Sequence[Pairs] = (),
    stored_weight: float = 1.0,
    untrained_candidate: bool = True,
) -> FitResult:
    """Train the router's gate on its own stored vectors (and `extra` pairs) and install the best one (by `monitor`).

    `module` wraps the gate to train (default: a fresh prototype Gate, 64 per expert, AdamW lr 1e-3).
    Each stored vector is a pseudo-query whose target is its expert ('label'), the share of
    its exact neighbours in each expert ('neighbours'), or a mix. `extra` adds groups of
    (query, target) pairs, e.g. real queries with their judged sources (data.targets.query_targets);
    each group carries its weight, the stored vectors `stored_weight` (0 = train on `extra` only).
    Validation uses `val_queries` with their gold `val_experts`, or else a seeded 10% of the stored vectors;
    `monitor` is val/acc@1 or val/recall@{neighbours} (the default).
    With `untrained_candidate` and `val_queries`, the gate as it starts is one more candidate: kept
    when no epoch beats it on `monitor` (pass False when the validation queries are stored vectors,
    which a prototype gate holds as prototypes and so routes perfectly before any training).
    """
    monitor = val_recall(neighbours) if monitor is None else monitor
    if monitor not in (VAL_ACC1, val_recall(neighbours)):
        raise ValueError(f"monitor must be {VAL_ACC1!r} or {val_recall(neighbours)!r}, got {monitor!r}")
    L.seed_everything(seed, workers=True, verbose=False)
    if router.num_experts < 2:
        raise ValueError(f"training a gate needs at least 2 experts, the router has {router.num_experts}")
    train_x, train_gold, train_counts = routing_pairs(router, max_queries, neighbours, seed)
    if val_queries is None:
        pick = np.random.default_rng(seed).choice(len(train_x), size=max(1, len(train_x) // 10), replace=False)
        val_x, val_gold, val_counts = train_x[pick], train_gold[pick], train_counts[pick]
    else:
        val_x, _ = router.prepare(val_queries)
        if val_experts is None or len(val_experts) != len(val_x):
            raise ValueError("val_experts must name the gold expert of each validation query")
        val_gold = router.expert_indices(val_experts)
        val_counts = exact_counts(router.experts, val_x, neighbours)
    target = make_targets(targets, train_gold, train_counts, router.num_experts, label_weight)
    for group in extra:
        if group.x.shape != (len(group.target), router.dim) or group.target.shape[1:] != (router.num_experts,):
            raise ValueError(
                f"extra pairs must be x (n, {router.dim}) with targets (n, {router.num_experts}); "
                f"got {group.x.shape} and {group.target.shape}"
            )
    train_x, target = weighted_pairs([Pairs(train_x, target, stored_weight), *extra])
    if module is None:  # the default gate of configs/model/hybrid.yaml, prototypes from k-means
        gate = initial_gate(router.experts, seed, prototypes_per_expert=64)
        module = GateModule(gate, optimizer=default_optimizer)
    module.recall_k = neighbours
    if module.gate.num_experts != router.num_experts or module.gate.dim != router.dim:
        raise ValueError(
            f"the gate has dim {module.gate.dim} and {module.gate.num_experts} outputs; "
            f"the router needs dim {router.dim} and {router.num_experts}"
        )
    data = RoutingDataModule(train_x, target, val_x, val_gold, val_counts.astype(np.float32), batch_size=batch_size)
    if trainer is None:
        # Epochs: enough for ~20k training examples (20 to 200 passes). With held-out validation
        # queries the best epoch by `monitor` is kept: many passes over a small corpus overfit its
        # documents (demo corpus, 48 epochs: val acc@1 0.74 last vs 0.96 best). Without them the
        # last epoch is kept: validating on a sample of the stored vectors ties across epochs and
        # "best" would be the first, barely trained one. Files go to a temporary directory.
        root = tempfile.mkdtemp(prefix="moe_router-")
        best = (
            [ModelCheckpoint(dirpath=root, monitor=monitor, mode="max", save_top_k=1)]
            if val_queries is not None
            else []
        )
        trainer = L.Trainer(
            max_epochs=max(20, min(200, 20_000 // max(len(train_x), 1))),
            accelerator="auto",
            devices=1,
            deterministic=True,
            logger=False,
            enable_checkpointing=bool(best),
            callbacks=best,
            enable_model_summary=False,
            default_root_dir=root,
        )
    before = _untrained(module, data) if val_queries is not None and untrained_candidate else None
    seconds = fit_quietly(trainer, module, data)
    best = _restore_best(trainer, module, data)
    if before is not None and before[0][monitor] > best[monitor]:
        # Training made the gate worse on the validation queries than it started (a prototype gate
        # is a working router before any step: on classic, documents as pseudo-queries teach it the
        # documents, not the questions). The starting point is a candidate like any epoch.
        module.gate.load_state_dict(before[1])
        best = {**before[0], "untrained_kept": 1.0}
        log.info("kept the untrained gate: its %s %.4f beats every epoch's", monitor, before[0][monitor])
    router.set_gate(module.gate.cpu().eval())
    return FitResult(best, seconds, trainer.current_epoch)


def _untrained(module: GateModule, data: RoutingDataModule) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The gate's validation metrics before training and a copy of its weights (epoch 0 as a candidate)."""
    state = {k: v.detach().clone() for k, v in module.gate.state_dict().items()}
    return module.val_metrics(*data.val_set.tensors), state


def _restore_best(trainer: L.Trainer, module: GateModule, data: RoutingDataModule) -> dict[str, float]:
    """Load the best checkpoint's gate weights into `module`; return its validation metrics."""
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if path and Path(path).is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return module.val_metrics(*data.val_set.tensors)  # the restored weights' numbers, over the whole set

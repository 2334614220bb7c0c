"""Training the gate with PyTorch Lightning: LightningModule, DataModule, fit_router, train(cfg).

Dimension legend: b batch, d dim, E experts, t experts searched.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import faiss
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from moe_router.calibration import choose_threshold, fit_temperature, load_floor_bias
from moe_router.data import TextDataset, VectorDataset, exact_neighbours, make_targets, neighbour_counts
from moe_router.embedders import CachedEmbedder, Embedder, default_cache_dir
from moe_router.gate import Gate
from moe_router.lifecycle import balanced_kmeans
from moe_router.metrics import accuracy_at_k, recall_from_counts, top_experts
from moe_router.router import Router
from moe_router.vectors import prepare

log = logging.getLogger(__name__)


class GateModule(L.LightningModule):
    """Wraps a Gate: soft cross-entropy to the routing targets + the gate's auxiliary losses."""

    def __init__(
        self,
        gate: Gate,
        optimizer: Callable[..., torch.optim.Optimizer],
        top_k: int = 2,
        recall_k: int = 10,
        input_noise: float = 0.0,
    ) -> None:
        super().__init__()
        self.gate = gate
        self.optimizer_factory = optimizer
        self.top_k = min(top_k, gate.num_experts)
        self.recall_k = recall_k
        self.input_noise = input_noise  # std of Gaussian noise added to query vectors while training

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, target = batch  # (b, d), (b, E)
        if self.input_noise > 0:
            x = F.normalize(x + self.input_noise * torch.randn_like(x), dim=-1)
        out = self.gate(x, top_k=self.top_k)
        task = -(target * F.log_softmax(out.logits, dim=-1)).sum(dim=-1).mean()
        loss = task + out.aux_loss
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(
            {"train/task_loss": task, "train/balance_loss": out.balance_loss, "train/z_loss": out.z_loss}
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, gold, counts = batch  # (b, d), (b,), (b, E) neighbour counts in each expert
        probs = self.gate(x, top_k=1).probs
        top = probs.topk(self.top_k, dim=-1).indices  # (b, t)
        acc1 = (top[:, 0] == gold).float().mean()
        recall = (counts.gather(1, top).sum(dim=1) / self.recall_k).mean()
        self.log_dict(
            {"val/acc@1": acc1, "val/recall@10": recall},
            prog_bar=True, on_epoch=True, batch_size=x.shape[0], sync_dist=True,
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.gate.parameters())


class RoutingDataModule(L.LightningDataModule):
    """(query vector, target) pairs for training; (query, gold expert, neighbour counts) for validation."""

    def __init__(
        self,
        train_x: np.ndarray,
        train_targets: np.ndarray,
        val_x: np.ndarray,
        val_gold: np.ndarray,
        val_counts: np.ndarray,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_set = TensorDataset(torch.from_numpy(train_x), torch.from_numpy(train_targets))
        self.val_set = TensorDataset(torch.from_numpy(val_x), torch.from_numpy(val_gold), torch.from_numpy(val_counts))
        self.batch_size = batch_size
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=4096, num_workers=self.num_workers)


@dataclass
class FitResult:
    metrics: dict[str, float]  # best validation metrics
    seconds: float  # wall time of trainer.fit
    epochs: int


def routing_pairs(router: Router, max_queries: int | None, neighbours: int, seed: int) -> tuple[np.ndarray, ...]:
    """Stored vectors as pseudo-queries: (xq, expert of each, neighbour counts per expert excluding itself).

    With max_queries, a seeded uniform sample of the stored vectors is used (for large collections).
    """
    xb = np.concatenate([e.vectors() for e in router.experts])
    owner = np.concatenate([np.full(e.ntotal, i) for i, e in enumerate(router.experts)])
    rows = np.arange(len(xb))
    if max_queries is not None and max_queries < len(xb):
        rows = np.sort(np.random.default_rng(seed).choice(len(xb), size=max_queries, replace=False))
    nbrs = _neighbours_excluding_rows(xb[rows], xb, rows, neighbours, router.metric)
    return xb[rows], owner[rows], neighbour_counts(nbrs, owner, router.num_experts)


def _neighbours_excluding_rows(xq: np.ndarray, xb: np.ndarray, rows: np.ndarray, k: int, metric: str) -> np.ndarray:
    if len(rows) == len(xb):
        return exact_neighbours(xq, xb, k, metric, exclude_self=True)
    full = exact_neighbours(xq, xb, k + 1, metric)  # (n, k+1)
    is_self = full == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(full, dtype=bool)
    keep[np.arange(len(full)), drop] = False
    return full[keep].reshape(len(full), full.shape[1] - 1)[:, :k]


def query_counts(router: Router, xq: np.ndarray, neighbours: int = 10) -> np.ndarray:
    """(n, E) counts of each query's exhaustive top-`neighbours` in each expert of the router."""
    xb = np.concatenate([e.vectors() for e in router.experts])
    owner = np.concatenate([np.full(e.ntotal, i) for i, e in enumerate(router.experts)])
    return neighbour_counts(exact_neighbours(xq, xb, neighbours, router.metric), owner, router.num_experts)


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
    monitor: str = "val/recall@10",
    seed: int = 0,
) -> FitResult:
    """Train the router's gate on its own stored vectors and install the best one (by `monitor`).

    `module` wraps the gate to train (default: a fresh prototype Gate, 64 per expert, AdamW lr 1e-3).
    Each stored vector is a pseudo-query whose target is its expert ('label'), the share of
    its exact neighbours in each expert ('neighbours'), or a mix. Validation uses
    `val_queries` with their gold `val_experts`, or else a seeded 10% of the stored vectors.
    """
    L.seed_everything(seed, workers=True, verbose=False)
    if router.num_experts < 2:
        raise ValueError(f"training a gate needs at least 2 experts, the router has {router.num_experts}")
    train_x, train_gold, train_counts = routing_pairs(router, max_queries, neighbours, seed)
    if val_queries is None:
        pick = np.random.default_rng(seed).choice(len(train_x), size=max(1, len(train_x) // 10), replace=False)
        val_x, val_gold, val_counts = train_x[pick], train_gold[pick], train_counts[pick]
    else:
        val_x, _ = router.prepare_queries(val_queries)
        if val_experts is None or len(val_experts) != len(val_x):
            raise ValueError("val_experts must name the gold expert of each validation query")
        val_gold = np.array([router.expert_index(e) for e in val_experts], dtype=np.int64)
        val_counts = query_counts(router, val_x, neighbours)
    target = make_targets(targets, train_gold, train_counts, router.num_experts, label_weight)
    if module is None:  # the default gate of configs/model/hybrid.yaml, prototypes from k-means
        gate = router.install_gate(Gate(router.dim, router.num_experts, prototypes_per_expert=64), seed)
        module = GateModule(gate, optimizer=_default_optimizer)
    module.recall_k = neighbours
    if module.gate.num_experts != router.num_experts or module.gate.dim != router.dim:
        raise ValueError(
            f"the gate has dim {module.gate.dim} and {module.gate.num_experts} outputs; "
            f"the router needs dim {router.dim} and {router.num_experts}"
        )
    data = RoutingDataModule(train_x, target, val_x, val_gold, val_counts.astype(np.float32), batch_size=batch_size)
    if trainer is None:
        # Keeps the last epoch (no ModelCheckpoint): on tiny corpora the validation metrics tie across
        # epochs and "best" would be the first, barely trained one. Epochs: enough for ~20k training
        # examples (20 to 200 passes). Files go to a temporary directory.
        trainer = L.Trainer(max_epochs=max(20, min(200, 20_000 // max(len(train_x), 1))), accelerator="auto",
                            devices=1, deterministic=True, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, default_root_dir=tempfile.mkdtemp(prefix="moe_router-"))
    seconds = fit_quietly(trainer, module, data)
    best = _restore_best(trainer, module, monitor)
    router.gate = module.gate.cpu().eval()
    return FitResult(best, seconds, trainer.current_epoch)


def fit_quietly(trainer: L.Trainer, module: GateModule, data: RoutingDataModule) -> float:
    """trainer.fit in train mode, without the warnings that do not apply to in-memory tensors; wall seconds."""
    module.train()  # Lightning keeps the mode a module arrives in; a router's gate sits in eval mode
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _restore_best(trainer: L.Trainer, module: GateModule, monitor: str) -> dict[str, float]:
    """Load the best checkpoint's gate weights into `module`; return its validation metrics."""
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    if path and Path(path).is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    # Re-run validation on the restored weights so the reported numbers are the best model's.
    results = trainer.validate(module, datamodule=trainer.datamodule, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def router_from_dataset(dataset: TextDataset | VectorDataset, embedder: Embedder | None, metric: str = "ip",
                        kmeans_experts: int | None = None, seed: int = 0,
                        max_imbalance: float | None = None) -> Router:
    """One expert per distinct expert key in the train split, holding that split's texts.

    With `kmeans_experts=n`, labels are ignored and the train vectors are cut into n experts by
    FAISS k-means (learned sharding): experts shard_00 .. shard_{n-1}; with `max_imbalance`, by
    k-means with a size cap (no shard above max_imbalance x the mean size). A VectorDataset has no
    labels, so it needs `kmeans_experts`; its router has no embedder and is queried with vectors.
    """
    if isinstance(dataset, VectorDataset):
        if not kmeans_experts:
            raise ValueError(f"dataset {dataset.name!r} is vectors without labels: set partition=N "
                             "to cut it into N k-means experts")
        router = Router(dataset.dim, metric)
        vectors = router.prepare_queries(dataset.vectors["train"])[0]
        train, texts = None, None
    else:
        if embedder is None:
            raise ValueError(f"dataset {dataset.name!r} is texts: it needs an embedder")
        router = Router(embedder.dim, metric, embedder=embedder)
        train = dataset.split("train")
        texts = [r.text for r in train]
        vectors = embedder.encode(texts)
    if kmeans_experts:
        if max_imbalance is None:
            shards = kmeans_assign(vectors, kmeans_experts, metric, seed)
        else:
            shards = balanced_kmeans(vectors, kmeans_experts, metric, seed, max_imbalance=max_imbalance)
        keys = np.array([f"shard_{i:02d}" for i in shards])
        names = sorted(set(keys))
    else:
        keys = np.array([getattr(r, dataset.expert_key) for r in train])
        names = dataset.experts
    for name in names:
        rows = np.flatnonzero(keys == name)
        router.add_expert(
            name, vectors[rows], texts=None if texts is None else [texts[i] for i in rows],
            parent=None if kmeans_experts else dataset.parents.get(name),
            metadata=None if train is None else [{"label": train[i].label, "domain": train[i].domain} for i in rows],
        )
    return router


def kmeans_assign(xb: np.ndarray, n: int, metric: str = "ip", seed: int = 0) -> np.ndarray:
    """(nb,) cluster of each vector under FAISS k-means with n centroids."""
    if not 1 <= n <= len(xb):
        raise ValueError(f"cannot cut {len(xb)} vectors into {n} k-means experts")
    km = faiss.Kmeans(xb.shape[1], n, niter=25, seed=seed, spherical=metric == "ip", max_points_per_centroid=100_000)
    km.train(np.ascontiguousarray(xb, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(xb, dtype=np.float32), 1)
    return assign[:, 0]


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
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dataset: TextDataset | VectorDataset = instantiate(cfg.data)
    embedder = None if isinstance(dataset, VectorDataset) else CachedEmbedder(
        instantiate(cfg.embedder), cfg.cache_dir or default_cache_dir())
    router = router_from_dataset(dataset, embedder, cfg.metric, cfg.partition, cfg.seed, cfg.partition_max_imbalance)
    if cfg.partition:  # learned sharding: a query's gold expert is the shard of its nearest centroid
        val_queries = dataset.queries("val")
        gold = gold_by_centroid(router, router.prepare_queries(val_queries)[0]) if len(val_queries) else []
        val_experts = [router.expert_names[g] for g in gold]
    else:
        rows = [r for r in dataset.split("val") if getattr(r, dataset.expert_key) in set(dataset.experts)]
        val_queries, val_experts = [r.text for r in rows], [getattr(r, dataset.expert_key) for r in rows]
    if not len(val_queries):
        raise ValueError(f"dataset {dataset.name!r} has no validation rows for its experts; add split 'val' rows "
                         "or set data.val_fraction > 0 to carve them from train")
    log_dir = Path(cfg.log_dir) if cfg.log_dir else _run_dir()
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


def validation_metrics(router: Router, queries: Any, experts: list[str], neighbours: int, top_k: int) -> dict[str, float]:
    """val/acc@1 and val/recall@10 (at top_k experts) of the router's current gate, as the training loop logs them."""
    xv, _ = router.prepare_queries(queries)
    gold = np.array([router.expert_index(e) for e in experts])
    probs = router.gate_probs(xv)
    counts = query_counts(router, xv, neighbours)
    return {"val/acc@1": accuracy_at_k(probs, gold, 1),
            "val/recall@10": recall_from_counts(top_experts(probs, min(top_k, router.num_experts)), counts, neighbours)}


def gold_by_centroid(router: Router, xq: np.ndarray) -> np.ndarray:
    """(n,) expert whose centroid is closest to each query (the gold expert of a k-means partition)."""
    centroids = np.stack([e.centroid() for e in router.experts])
    if router.metric == "ip":
        return np.argmax(xq @ centroids.T, axis=1)
    return np.argmin(((xq[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)


def calibrate(router: Router, queries: Any, experts: list[str], oos_texts: list[str],
              load_floor: float | None = None) -> dict[str, float]:
    """Fit the gate to validation queries (texts or vectors) after training.

    With `load_floor`, experts whose top-1 share of the queries is below load_floor / E (and below
    their share of the gold experts) get their logit raised just enough to reach it (see
    calibration.load_floor_bias); then the temperature
    is fitted; with out-of-scope queries, the abstain threshold is set.
    """
    xv, _ = router.prepare_queries(queries)
    gold = np.array([router.expert_index(e) for e in experts])
    out: dict[str, float] = {}
    if load_floor:
        bias = load_floor_bias(router.gate_logits(xv), float(load_floor), gold)
        with torch.no_grad():
            router.gate.head.bias += torch.from_numpy(bias).to(router.gate.head.bias)
        out["load_floor_experts_raised"] = int((bias > 0).sum())
    temperature = fit_temperature(router.gate_logits(xv), gold)
    router.gate.temperature.fill_(temperature)
    out["temperature"] = temperature
    if oos_texts:
        xo, _ = router.prepare_queries(oos_texts)
        router.abstain_threshold = choose_threshold(router.in_scope_scores(xv), router.in_scope_scores(xo))
        out["abstain_threshold"] = router.abstain_threshold
    return out


def _run_dir() -> Path:
    """Hydra's output directory when running under @hydra.main, else a fresh temporary one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(tempfile.mkdtemp(prefix="moe_router-"))

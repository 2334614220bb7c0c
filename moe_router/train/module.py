"""The Lightning wrapping of a Gate: LightningModule, DataModule, a quiet fit.

Dimension legend: b batch, d dim, E experts, t experts searched.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from moe_router.gate.model import Gate
from moe_router.metrics import validation_metrics

VAL_BATCH = 4096  # validation queries per forward pass


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
        self._val_batches: list[tuple[torch.Tensor, ...]] = []  # (probs, gold, counts) of this epoch's batches

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, target = batch  # (b, d), (b, E)
        if self.input_noise > 0:
            x = F.normalize(x + self.input_noise * torch.randn_like(x), dim=-1)
        out = self.gate(x, top_k=self.top_k)
        task = -(target * F.log_softmax(out.logits, dim=-1)).sum(dim=-1).mean()
        loss = task + out.aux_loss
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/task_loss": task, "train/balance_loss": out.balance_loss, "train/z_loss": out.z_loss})
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_batches.clear()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        x, gold, counts = batch  # (b, d), (b,), (b, E)
        self._val_batches.append((self.gate(x, top_k=1).probs, gold, counts))

    def on_validation_epoch_end(self) -> None:
        """The metrics over the whole validation set (every rank's share of it), logged for the epoch choice."""
        probs, gold, counts = (torch.cat(parts) for parts in zip(*self._val_batches))
        self._val_batches.clear()
        if self.trainer.world_size > 1:  # (ranks, b, ...) -> (ranks * b, ...): each rank validated a shard
            probs, gold, counts = (self.all_gather(t).flatten(0, 1) for t in (probs, gold, counts))
        metrics = validation_metrics(
            probs.float().cpu().numpy(), gold.cpu().numpy(), counts.cpu().numpy(), self.top_k, self.recall_k
        )
        self.log_dict(metrics, prog_bar=True, sync_dist=True)  # identical on every rank after the gather

    @torch.no_grad()
    def val_metrics(self, x: torch.Tensor, gold: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        """The validation metrics of the gate as it is now, for queries x (n, d), gold (n,), neighbour counts (n, E)."""
        was_training = self.gate.training
        self.gate.eval()  # as Lightning validates
        device = self.gate.head.weight.device
        probs = torch.cat([self.gate(xb.to(device), top_k=1).probs for xb in x.split(VAL_BATCH)])  # (n, E)
        self.gate.train(was_training)
        return validation_metrics(probs.float().cpu().numpy(), gold.numpy(), counts.numpy(), self.top_k, self.recall_k)

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
        return DataLoader(self.val_set, batch_size=VAL_BATCH, num_workers=self.num_workers)


def fit_quietly(trainer: L.Trainer, module: GateModule, data: RoutingDataModule) -> float:
    """trainer.fit in train mode, without the warnings that do not apply to in-memory tensors; wall seconds."""
    module.train()  # Lightning keeps the mode a module arrives in; a router's gate sits in eval mode
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        # Lightning's all_gather (validation under DDP) still calls torch's deprecated functional all_gather
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

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
        self.log_dict({"train/task_loss": task, "train/balance_loss": out.balance_loss, "train/z_loss": out.z_loss})
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self.log_dict(
            self.val_metrics(*batch), prog_bar=True, on_epoch=True, batch_size=batch[0].shape[0], sync_dist=True
        )

    def val_metrics(self, x: torch.Tensor, gold: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """val/acc@1 and val/recall@10 (at top_k experts) of queries x (b, d), gold (b,), neighbour counts (b, E)."""
        probs = self.gate(x, top_k=1).probs
        top = probs.topk(self.top_k, dim=-1).indices  # (b, t)
        acc1 = (top[:, 0] == gold).float().mean()
        recall = (counts.gather(1, top).sum(dim=1) / self.recall_k).mean()
        return {"val/acc@1": acc1, "val/recall@10": recall}

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


def fit_quietly(trainer: L.Trainer, module: GateModule, data: RoutingDataModule) -> float:
    """trainer.fit in train mode, without the warnings that do not apply to in-memory tensors; wall seconds."""
    module.train()  # Lightning keeps the mode a module arrives in; a router's gate sits in eval mode
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

"""The gating network: an MLP that scores experts for a query embedding.

Dimension legend: b batch, d embedding dim, h hidden width, e experts, k experts kept.

Plain PyTorch: nothing here knows about Lightning, Hydra or FAISS.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GateOutput(NamedTuple):
    """What one gate pass returns; the auxiliary losses are zero outside training."""

    logits: Tensor  # (b, e) raw expert scores
    probs: Tensor  # (b, e) softmax(logits / temperature)
    top_weights: Tensor  # (b, k) probs of the kept experts, renormalised over the k
    top_indices: Tensor  # (b, k) kept experts, best first
    aux_loss: Tensor  # () balance_coef * balance_loss + z_coef * z_loss
    balance_loss: Tensor  # () unweighted Switch load-balancing loss, 1.0 when uniform
    z_loss: Tensor  # () unweighted router z-loss


def balance_loss(probs: Tensor, top1: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss E * sum_i f_i * P_i (Fedus et al. 2021).

    f_i is the share of the batch whose top-1 expert is i (not differentiable), P_i the mean
    gate probability of i. It equals 1 for uniform routing and E when every query and all
    probability mass go to one expert.
    """
    num_experts = probs.shape[-1]
    f = torch.bincount(top1, minlength=num_experts).to(probs.dtype) / top1.numel()  # (e,)
    p = probs.mean(dim=0)  # (e,)
    return num_experts * torch.sum(f * p)


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss mean(logsumexp(logits)^2) from ST-MoE: keeps logits small and stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class Gate(nn.Module):
    """Softmax top-k gate: MLP body -> one linear output per expert.

    The body maps a query to features (b, h); the head holds one row per expert, so an
    expert can be added (a row appended, initialised from its vectors) or removed (a row
    dropped) without touching the other experts' parameters.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        hidden_dims: Sequence[int] = (512,),
        dropout: float = 0.1,
        temperature: float = 1.0,
        noise_std: float = 0.0,
        balance_coef: float = 0.01,
        z_coef: float = 0.001,
    ) -> None:
        super().__init__()
        if dim <= 0 or num_experts <= 0:
            raise ValueError(f"Gate needs dim > 0 and num_experts > 0, got dim={dim}, num_experts={num_experts}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.dim = int(dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.dropout = float(dropout)
        self.noise_std = float(noise_std)
        self.balance_coef = float(balance_coef)
        self.z_coef = float(z_coef)
        layers: list[nn.Module] = []
        width = self.dim
        for h in self.hidden_dims:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(self.dropout)]
            width = h
        self.body = nn.Sequential(*layers)  # (b, d) -> (b, h); identity when hidden_dims is empty
        self.head = nn.Linear(width, num_experts)  # (b, h) -> (b, e)
        # A buffer, not a parameter: set by calibration, saved with the weights.
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @property
    def num_experts(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def config(self) -> dict:
        """Constructor arguments that rebuild this gate (the weights are saved separately)."""
        return {
            "dim": self.dim,
            "num_experts": self.num_experts,
            "hidden_dims": list(self.hidden_dims),
            "dropout": self.dropout,
            "temperature": float(self.temperature),
            "noise_std": self.noise_std,
            "balance_coef": self.balance_coef,
            "z_coef": self.z_coef,
        }

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (b, h)

    def forward(self, x: Tensor, top_k: int = 1) -> GateOutput:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Gate expects input of shape (batch, {self.dim}), got {tuple(x.shape)}")
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and {self.num_experts} (the number of experts), got {top_k}")
        logits = self.head(self.body(x))  # (b, e)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = F.softmax(logits / self.temperature, dim=-1)  # (b, e)
        top_probs, top_indices = probs.topk(top_k, dim=-1)  # (b, k)
        top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        if self.training:
            bal = balance_loss(probs, top_indices[:, 0])
            zl = z_loss(logits)
        else:
            bal = zl = logits.new_zeros(())
        aux = self.balance_coef * bal + self.z_coef * zl
        return GateOutput(logits, probs, top_weights, top_indices, aux, bal, zl)

    @torch.no_grad()
    def add_expert(self, xb: Tensor, margin: float = 1.0) -> int:
        """Append an output for a new expert, initialised from its vectors xb (n, d).

        The new row points at the mean feature of xb and its bias is set so that the new
        expert outscores the current best expert on about half of its own vectors (plus
        `margin`): routable at once, sharpened later by a short fine-tune.
        Returns the new expert's index.
        """
        if xb.ndim != 2 or xb.shape[1] != self.dim or xb.shape[0] == 0:
            raise ValueError(f"add_expert needs vectors of shape (n >= 1, {self.dim}), got {tuple(xb.shape)}")
        was_training = self.training
        self.eval()
        xb = xb.to(self.head.weight.device, self.head.weight.dtype)
        feats = self.features(xb)  # (n, h)
        old_logits = self.head(feats)  # (n, e)
        direction = F.normalize(feats.mean(dim=0), dim=0)  # (h,)
        row = direction * self.head.weight.norm(dim=1).mean()
        raw = feats @ row  # (n,)
        bias = (old_logits.max(dim=1).values - raw).median() + margin
        self._resize_head(
            torch.cat([self.head.weight, row[None]], dim=0),
            torch.cat([self.head.bias, bias[None]], dim=0),
        )
        self.train(was_training)
        return self.num_experts - 1

    @torch.no_grad()
    def remove_expert(self, index: int) -> None:
        """Drop expert `index`; the softmax renormalises over the rest."""
        if self.num_experts <= 1:
            raise ValueError("cannot remove the gate's last expert")
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert index {index} out of range 0..{self.num_experts - 1}")
        keep = [i for i in range(self.num_experts) if i != index]
        self._resize_head(self.head.weight[keep], self.head.bias[keep])

    @torch.no_grad()
    def init_head_from_centroids(self, centroids: Tensor) -> None:
        """Point each head row at its expert's mean feature (a centroid router before training)."""
        if centroids.shape != (self.num_experts, self.dim):
            raise ValueError(f"centroids must have shape ({self.num_experts}, {self.dim}), got {tuple(centroids.shape)}")
        was_training = self.training
        self.eval()
        feats = F.normalize(self.features(centroids.to(self.head.weight.device)), dim=1)  # (e, h)
        scale = self.head.weight.norm(dim=1).mean().clamp_min(1.0)
        self.head.weight.copy_(feats * scale * 4.0)
        self.head.bias.zero_()
        self.train(was_training)

    def _resize_head(self, weight: Tensor, bias: Tensor) -> None:
        head = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        head.weight.copy_(weight)
        head.bias.copy_(bias)
        self.head = head

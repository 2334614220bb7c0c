"""The gating network: an MLP (+ optional per-expert prototypes) with softmax top-k gating and its auxiliary losses."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_router.vectors import check_dim

# Cosine above which a prototype counts as the query itself (only used while training).
SELF_MATCH = 0.9999


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


class Parallel(nn.Module):
    """Modules applied to the same input, outputs concatenated on the last dimension."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([m(x) for m in self.members], dim=-1)


class WithInput(nn.Module):
    """A body whose features are followed by the input itself: the head then holds a linear term in x."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.inner(x), x], dim=-1)  # (b, h + d)


class Gate(nn.Module):
    """Softmax top-k gate: MLP body -> one linear output per expert, plus optional prototypes.

    The body maps a query to features (b, h); the head holds one row per expert, so an
    expert can be added (a row appended, initialised from its vectors) or removed (a row
    dropped) without touching the other experts' parameters.

    With `prototypes_per_expert = m > 0` each expert also owns up to m learned prototype
    vectors, and its logit gains the soft maximum of their similarities to the query,
    logsumexp_j(s * <x, p_j>) with a learned sharpness s. This is a differentiable
    multi-prototype router (k-means-initialised by the caller) that the MLP corrects; its cost
    is fixed (e * m dot products), not growing with the stored vectors.

    With `linear_head` the features end with the query itself, so each expert's logit also holds
    a linear term w_e . x: a logistic regression installed beside the MLP (with_linear), which
    adding, removing, merging and splitting experts treat as part of the head.
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
        prototypes_per_expert: int = 0,
        prototype_scale: float = 20.0,
        max_prototypes: int = 4096,
        members: int = 1,
        linear_head: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be an integer >= 1, got {members!r}")
        check_dim(dim, "Gate dim")
        if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
            raise ValueError(f"Gate num_experts must be an integer >= 1, got {num_experts!r}")
        if not _positive(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.dim = int(dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.dropout = float(dropout)
        self.noise_std = float(noise_std)
        self.balance_coef = float(balance_coef)
        self.z_coef = float(z_coef)
        self.members = members
        self.linear_head = bool(linear_head)

        def mlp() -> tuple[nn.Sequential, int]:
            layers: list[nn.Module] = []
            width = self.dim
            for h in self.hidden_dims:
                layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(self.dropout)]
                width = h
            return nn.Sequential(*layers), width  # (b, d) -> (b, h); identity when hidden_dims is empty

        if members == 1:
            self.body, width = mlp()
        else:  # an ensemble's bodies side by side (see Gate.assemble): features are their concatenation
            bodies = [mlp() for _ in range(members)]
            self.body, width = Parallel([b for b, _ in bodies]), sum(w for _, w in bodies)
        if self.linear_head:
            self.body, width = WithInput(self.body), width + self.dim
        self.head = nn.Linear(width, num_experts)  # (b, h) -> (b, e)
        # A buffer, not a parameter: set by calibration, saved with the weights.
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.max_prototypes = int(max_prototypes)
        # Fixed cost: at most max_prototypes in all (fewer per expert when there are many experts).
        self.prototypes_per_expert = (
            min(int(prototypes_per_expert), max(1, self.max_prototypes // num_experts))
            if prototypes_per_expert > 0
            else 0
        )
        if self.prototypes_per_expert > 0:
            m = self.prototypes_per_expert
            # Placeholder prototypes until init_prototypes: all experts tie, the MLP alone decides.
            self.prototypes = nn.Parameter(torch.zeros(num_experts * m, self.dim))  # (p, d)
            self.register_buffer("prototype_owner", torch.arange(num_experts).repeat_interleave(m))  # (p,)
            self.log_prototype_scale = nn.Parameter(torch.tensor(math.log(prototype_scale)))
            with torch.no_grad():  # the head starts as a zero correction on top of the prototypes
                self.head.weight.zero_()
                self.head.bias.zero_()

    @property
    def num_experts(self) -> int:
        return self.head.out_features

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def config(self) -> dict:
        """Constructor arguments that rebuild this gate (the weights are saved separately).

        Read off the constructor's signature, so the list of arguments lives in one place; the
        current temperature and prototype sharpness are what calibration and training left.
        """
        current = {
            "temperature": float(self.temperature),
            "hidden_dims": list(self.hidden_dims),
            "prototype_scale": float(self.log_prototype_scale.detach().exp()) if self.prototypes_per_expert else 20.0,
        }
        names = [n for n in inspect.signature(Gate.__init__).parameters if n != "self"]
        return {n: current[n] if n in current else getattr(self, n) for n in names}

    @classmethod
    @torch.no_grad()
    def assemble(cls, gates: Sequence[Gate]) -> Gate:
        """One gate from M independently trained gates over the same experts (an ensemble in one module).

        Its MLP logits are the mean of theirs (bodies side by side, heads concatenated and divided
        by M); each expert's prototypes are the union of theirs, at the mean sharpness, so the
        prototype term is a soft maximum over all of them. Lifecycle operations treat it as any gate.
        """
        first = gates[0]
        if any(g.members != 1 or g.linear_head for g in gates):
            raise ValueError("assemble takes single gates (members=1) without a linear head (add it afterwards)")
        shape = (first.dim, first.num_experts, first.hidden_dims, bool(first.prototypes_per_expert))
        if any((g.dim, g.num_experts, g.hidden_dims, bool(g.prototypes_per_expert)) != shape for g in gates):
            raise ValueError("assemble needs gates of the same dim, experts, hidden layers and prototype use")
        config = {
            **first.config(),
            "members": len(gates),
            "temperature": 1.0,
            "prototypes_per_expert": sum(g.prototypes_per_expert for g in gates),
        }
        if first.prototypes_per_expert:
            config["prototype_scale"] = sum(float(g.log_prototype_scale.exp()) for g in gates) / len(gates)
            config["max_prototypes"] = sum(g.max_prototypes for g in gates)  # members split one budget
        out = cls(**config)
        for member, g in zip(out.body.members, gates):
            member.load_state_dict(g.body.state_dict())
        out.head.weight.copy_(torch.cat([g.head.weight for g in gates], dim=1) / len(gates))
        out.head.bias.copy_(torch.stack([g.head.bias for g in gates]).mean(0))
        if first.prototypes_per_expert:
            out.prototypes = nn.Parameter(torch.cat([g.prototypes.detach() for g in gates]).clone())
            out.prototype_owner = torch.cat([g.prototype_owner for g in gates]).clone()
        return out.to(first.head.weight.device)

    @torch.no_grad()
    def with_linear(self, weight: Tensor, bias: Tensor, scale: float = 1.0) -> Gate:
        """A copy whose logits gain scale * (x @ weight.T + bias): a logistic regression (E, d), (E,) beside the MLP.

        A gate that already has a linear head adds it to the one it has. The temperature is kept;
        recalibrate afterwards (train.calibrate).
        """
        if weight.shape != (self.num_experts, self.dim) or bias.shape != (self.num_experts,):
            raise ValueError(
                f"a linear head needs weight ({self.num_experts}, {self.dim}) and bias ({self.num_experts},), "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        if not (_positive(scale) and bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
            raise ValueError(f"a linear head needs finite weights and a finite scale > 0, got scale={scale!r}")
        g = copy.deepcopy(self)
        head_w, head_b = g.head.weight.detach(), g.head.bias.detach()
        if not g.linear_head:
            g.body, g.linear_head = WithInput(g.body), True
            head_w = torch.cat([head_w, head_w.new_zeros(self.num_experts, self.dim)], dim=1)
        else:
            head_w = head_w.clone()
        head_w[:, -self.dim :] += float(scale) * weight.to(head_w)
        g._resize_head(head_w, head_b + float(scale) * bias.to(head_b))
        return g

    def without_linear(self) -> Gate:
        """A copy whose linear head's input weights are zero: the MLP and prototypes alone, ready for with_linear.

        The biases stay (the regression's is merged into them and calibration moves them anyway);
        recalibrate after installing a new regression (train.linear_head.refit_linear_head).
        """
        if not self.linear_head:
            raise ValueError("this gate has no linear head (see Gate.with_linear)")
        g = copy.deepcopy(self)
        with torch.no_grad():
            g.head.weight[:, -self.dim :] = 0.0
        return g

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (b, h), or (b, h + d) with a linear head

    def prototype_logits(self, x: Tensor) -> Tensor:
        """(b, e) soft maximum over each expert's prototypes of scale * similarity; zeros without prototypes.

        While training, a prototype identical to the query (similarity > SELF_MATCH, e.g. a stored
        vector that is its own prototype in a small expert) is left out: the gate must learn from
        how a query routes when it is not already stored, as it will be at inference.
        """
        if not self.prototypes_per_expert:
            return x.new_zeros(x.shape[0], self.num_experts)
        dot = x @ self.prototypes.T  # (b, p); cosine for the normalised vectors of metric 'ip'
        if self.training:
            with torch.no_grad():
                norms = x.norm(dim=1, keepdim=True) * self.prototypes.norm(dim=1)[None, :]  # (b, p)
                same = dot > SELF_MATCH * norms.clamp_min(1e-12)
            dot = dot.masked_fill(same, -1.0)
        sim = dot * self.log_prototype_scale.exp()  # (b, p)
        top = sim.max(dim=1, keepdim=True).values.detach()  # (b, 1) for a stable exp
        mass = x.new_zeros(x.shape[0], self.num_experts).index_add_(1, self.prototype_owner, (sim - top).exp())
        return mass.clamp_min(1e-30).log() + top  # (b, e)

    def in_scope_score(self, x: Tensor) -> Tensor:
        """(b,) how in-distribution each query looks: the soft maximum similarity to any prototype
        (a prototype gate), else the top-1 probability. Higher = more confidently in scope."""
        if self.prototypes_per_expert:
            return self.prototype_logits(x).max(dim=1).values / self.log_prototype_scale.exp()
        return self(x, top_k=1).probs.max(dim=1).values

    @torch.no_grad()
    def init_prototypes(self, prototypes: list[Tensor]) -> None:
        """Set each expert's prototypes (a list of e tensors (m_i, d), 1 <= m_i); e.g. k-means centroids."""
        if not self.prototypes_per_expert:
            raise ValueError("this gate was built with prototypes_per_expert=0")
        if len(prototypes) != self.num_experts or any(
            p.ndim != 2 or p.shape[1] != self.dim or len(p) == 0 for p in prototypes
        ):
            raise ValueError(f"init_prototypes needs {self.num_experts} tensors of shape (m >= 1, {self.dim})")
        device = self.head.weight.device
        self.prototypes = nn.Parameter(torch.cat(prototypes).to(device, torch.float32))
        self.prototype_owner = torch.cat(
            [torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(prototypes)]
        ).to(device)

    def forward(self, x: Tensor, top_k: int = 1) -> GateOutput:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Gate expects input of shape (batch, {self.dim}), got {tuple(x.shape)}")
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and {self.num_experts} (the number of experts), got {top_k}")
        logits = self.head(self.body(x)) + self.prototype_logits(x)  # (b, e)
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
    def add_expert(self, xb: Tensor, margin: float = 1.0, prototypes: Tensor | None = None) -> int:
        """Append an output for a new expert, initialised from its vectors xb (n, d).

        The new row points at the mean feature of xb and its bias is set so that the new
        expert outscores the current best expert on about half of its own vectors (plus
        `margin`): routable at once, sharpened later by a short fine-tune. A prototype gate
        also takes the expert's prototypes (default: up to m evenly spaced rows of xb).
        Returns the new expert's index.
        """
        if xb.ndim != 2 or xb.shape[1] != self.dim or xb.shape[0] == 0:
            raise ValueError(f"add_expert needs vectors of shape (n >= 1, {self.dim}), got {tuple(xb.shape)}")
        was_training = self.training
        self.eval()
        xb = xb.to(self.head.weight.device, self.head.weight.dtype)
        feats = self.features(xb)  # (n, h)
        old_logits = self.head(feats) + self.prototype_logits(xb)  # (n, e)
        new_index = self.num_experts
        if self.prototypes_per_expert:
            if prototypes is None:
                rows = torch.linspace(0, len(xb) - 1, min(self.prototypes_per_expert, len(xb))).round().long()
                prototypes = xb[rows]
            self.prototypes = nn.Parameter(torch.cat([self.prototypes, prototypes.to(self.prototypes)]))
            self.prototype_owner = torch.cat(
                [self.prototype_owner, torch.full((len(prototypes),), new_index, device=self.prototype_owner.device)]
            )
        direction = F.normalize(feats.mean(dim=0), dim=0)  # (h,)
        row = direction * self.head.weight.norm(dim=1).mean()
        raw = feats @ row + self._own_prototype_logit(xb, new_index)  # (n,)
        bias = (old_logits.max(dim=1).values - raw).median() + margin
        self._resize_head(
            torch.cat([self.head.weight, row[None]], dim=0),
            torch.cat([self.head.bias, bias[None]], dim=0),
        )
        self.train(was_training)
        return new_index

    def _own_prototype_logit(self, x: Tensor, index: int) -> Tensor:
        """(b,) prototype logit of expert `index` alone (zeros without prototypes)."""
        if not self.prototypes_per_expert:
            return x.new_zeros(x.shape[0])
        mine = self.prototype_owner == index
        sim = (x @ self.prototypes[mine].T) * self.log_prototype_scale.exp()  # (b, m)
        return torch.logsumexp(sim, dim=1)

    @torch.no_grad()
    def remove_expert(self, index: int) -> None:
        """Drop expert `index` (its head row and prototypes); the softmax renormalises over the rest."""
        if self.num_experts <= 1:
            raise ValueError("cannot remove the gate's last expert")
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert index {index} out of range 0..{self.num_experts - 1}")
        keep = [i for i in range(self.num_experts) if i != index]
        self.set_head(
            self.head.weight[keep], self.head.bias[keep], self.remap_owners({i: n for n, i in enumerate(keep)})
        )

    def remap_owners(self, mapping: dict[int, int]) -> Tensor | None:
        """Per-prototype new owners (p,) when old expert i becomes new expert mapping[i] (absent: dropped).

        None for a gate without prototypes. Pass the result to set_head.
        """
        if not self.prototypes_per_expert:
            return None
        table = torch.full((self.num_experts,), -1, dtype=torch.long)
        for old, new in mapping.items():
            table[old] = new
        return table.to(self.prototype_owner.device)[self.prototype_owner]

    def resize_prototypes(self, count: int) -> None:
        """Make room for `count` prototypes (before loading a state dict saved after experts changed)."""
        if self.prototypes_per_expert:
            self.prototypes = nn.Parameter(self.prototypes.new_zeros(count, self.dim))
            self.prototype_owner = self.prototype_owner.new_zeros(count)

    @torch.no_grad()
    def init_head_from_centroids(self, centroids: Tensor) -> None:
        """Point each head row at its expert's mean feature (a centroid router before training)."""
        if centroids.shape != (self.num_experts, self.dim):
            raise ValueError(
                f"centroids must have shape ({self.num_experts}, {self.dim}), got {tuple(centroids.shape)}"
            )
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

    @torch.no_grad()
    def set_head(self, weight: Tensor, bias: Tensor, prototype_owner: Tensor | None = None) -> None:
        """Replace the head with rows `weight` (e, h) and `bias` (e,): the gate then has e outputs.

        A prototype gate whose experts change needs `prototype_owner` (p,): the new expert of each
        current prototype (-1 drops it); see remap_owners. Every new expert needs a prototype.
        """
        if weight.ndim != 2 or weight.shape[1] != self.feature_dim or weight.shape[0] == 0:
            raise ValueError(f"head weight must have shape (e >= 1, {self.feature_dim}), got {tuple(weight.shape)}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"head bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if self.prototypes_per_expert:
            if prototype_owner is None:
                if weight.shape[0] != self.num_experts:
                    raise ValueError("this gate has prototypes: changing its number of experts needs prototype_owner")
            else:
                owner = prototype_owner.to(self.prototype_owner.device).long()
                if owner.shape != self.prototype_owner.shape or int(owner.max()) >= weight.shape[0]:
                    raise ValueError(
                        f"prototype_owner must give each of the {len(self.prototype_owner)} prototypes "
                        f"a new expert in 0..{weight.shape[0] - 1} (or -1 to drop it)"
                    )
                if not bool(torch.isin(torch.arange(weight.shape[0], device=owner.device), owner).all()):
                    raise ValueError("every new expert needs at least one prototype")
                keep = owner >= 0
                self.prototypes = nn.Parameter(self.prototypes.detach()[keep].clone())
                self.prototype_owner = owner[keep].clone()
        self._resize_head(weight.to(self.head.weight), bias.to(self.head.bias))

    @torch.no_grad()
    def shift_bias(self, delta: np.ndarray | Tensor) -> None:
        """Add `delta` (E,) to the head's biases: moves each expert's logit (load floor, rebalancing)."""
        delta = torch.as_tensor(np.asarray(delta), dtype=self.head.bias.dtype, device=self.head.bias.device)
        if delta.shape != self.head.bias.shape:
            raise ValueError(f"bias shift must have shape ({self.num_experts},), got {tuple(delta.shape)}")
        self.head.bias += delta

    @torch.no_grad()
    def set_temperature(self, temperature: float) -> None:
        """The softmax temperature (calibration); > 0."""
        if not _positive(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature.fill_(float(temperature))

    def freeze_body(self, frozen: bool = True) -> None:
        """Stop (or restart) gradient updates of the MLP body; the head (linear term too) and prototypes train."""
        for p in self.body.parameters():
            p.requires_grad_(not frozen)

    def train_only(self, experts: Sequence[int]) -> Callable[[], None]:
        """Let gradients reach only the outputs of `experts` (their head rows and biases, their prototypes).

        The body and the shared prototype scale are frozen and every other expert's gradient is zeroed,
        so with an optimiser that leaves zero-gradient weights alone (Adam without weight decay) the
        other experts' logits stay exactly as they were. Returns the call that undoes it.
        """
        keep = torch.zeros(self.num_experts, dtype=torch.bool, device=self.head.weight.device)
        index = torch.as_tensor(list(experts), dtype=torch.long)
        if index.numel() == 0 or bool(((index < 0) | (index >= self.num_experts)).any()):
            raise ValueError(f"train_only needs expert indices in 0..{self.num_experts - 1}, got {list(experts)}")
        keep[index.to(keep.device)] = True
        row = keep.to(self.head.weight.dtype)  # (E,)
        handles = [
            self.head.weight.register_hook(lambda g: g * row[:, None]),
            self.head.bias.register_hook(lambda g: g * row),
        ]
        frozen = [p for p in self.body.parameters() if p.requires_grad]
        if self.prototypes_per_expert:
            mine = keep[self.prototype_owner].to(self.prototypes.dtype)[:, None]  # (p, 1)
            handles.append(self.prototypes.register_hook(lambda g: g * mine))
            frozen += [self.log_prototype_scale] if self.log_prototype_scale.requires_grad else []
        for p in frozen:
            p.requires_grad_(False)

        def undo() -> None:
            for h in handles:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)

        return undo

    def nonfinite(self) -> list[str]:
        """Names of the parameters and buffers holding NaN or inf."""
        return [
            name for name, t in self.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]

    def defects(self) -> list[str]:
        """What makes this gate unusable, in words (empty for a usable gate): the one rule that
        set_gate, a save and a load apply. A gate with NaN weights or a temperature of 0 routes NaN."""
        out = [f"{name} holds NaN or inf" for name in self.nonfinite()]
        if "temperature" not in self.nonfinite() and not float(self.temperature) > 0:
            out.append(f"temperature is {float(self.temperature)} (it must be > 0)")
        return out

    @torch.no_grad()
    def add_prototypes(self, prototypes: Tensor, expert: int) -> None:
        """Append prototypes (m, d) owned by expert `expert` (a prototype gate only; e.g. when an expert is split)."""
        if not self.prototypes_per_expert:
            raise ValueError("this gate was built with prototypes_per_expert=0")
        if prototypes.ndim != 2 or prototypes.shape[1] != self.dim or not 0 <= expert < self.num_experts:
            raise ValueError(
                f"add_prototypes needs (m, {self.dim}) prototypes and an expert in 0..{self.num_experts - 1}"
            )
        self.prototypes = nn.Parameter(torch.cat([self.prototypes.detach(), prototypes.to(self.prototypes)]))
        self.prototype_owner = torch.cat(
            [self.prototype_owner, torch.full((len(prototypes),), expert, device=self.prototype_owner.device)]
        )


def _positive(value: object) -> bool:
    """A finite real number > 0 (not a bool)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
        and value > 0
    )


@torch.inference_mode()
def in_scope(gate: Gate, xq: np.ndarray) -> np.ndarray:
    """(nq,) the gate's in-scope score (Gate.in_scope_score) of prepared queries xq (nq, d), in eval mode."""
    gate.eval()
    return (
        gate.in_scope_score(torch.from_numpy(np.ascontiguousarray(xq)).to(gate.head.weight.device))
        .float()
        .cpu()
        .numpy()
    )


@torch.inference_mode()
def infer(gate: Gate, xq: np.ndarray, field: str = "probs", batch_size: int = 8192) -> np.ndarray:
    """The gate's `field` ('probs' or 'logits'), (nq, E) float32, of prepared query vectors xq (nq, d), in eval mode."""
    gate.eval()
    device = gate.head.weight.device
    out = []
    for start in range(0, xq.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(xq[start : start + batch_size])).to(device)
        result = gate(x, top_k=1)
        finite = torch.isfinite(result.logits).all(dim=1)  # (b,)
        if not bool(finite.all()):  # routing on NaN would pick arbitrary experts with NaN confidence
            row = start + int(torch.nonzero(~finite)[0, 0])
            broken = gate.nonfinite()
            why = (
                f"its weights hold NaN or inf ({', '.join(broken[:3])})"
                if broken
                else "the query is too large for it (float32 overflow)"
            )
            raise ValueError(f"the gate gave non-finite logits for query {row}: {why}; nothing was routed")
        out.append(getattr(result, field).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, gate.num_experts), np.float32)

"""Gate surgery: head rows fitted by ridge regression when experts are added, merged or split.

Dimension legend: n vectors, d dim, E experts, h gate feature width.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from moe_router.gate.model import Gate
from moe_router.index.expert import Expert, sample_vectors


@torch.no_grad()
def features_and_logits(gate: Gate, xb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate features (n, h), full logits (n, E) and their prototype part (n, E), float64; gate left in eval mode.

    logits = head(features) + prototype logits (zeros for a gate without prototypes), so a head
    row is fitted to (wanted logit - its expert's prototype logit).
    """
    gate.eval()
    x = torch.from_numpy(np.ascontiguousarray(xb)).to(gate.head.weight)
    feats = gate.features(x)  # (n, h)
    proto = gate.prototype_logits(x)  # (n, E)
    return feats.double(), (gate.head(feats) + proto).double(), proto.double()


def fit_rows(
    feats: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor, ridge: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head rows (m, h) and biases (m,) whose logits on `feats` (n, h) fit `targets` (n, m).

    Ridge regression pulled towards `prior` rows (m, h): with few vectors the rows stay near the
    prior instead of overfitting them. The penalty is scaled to the features' variance.
    """
    mu_f, mu_t = feats.mean(0), targets.mean(0)  # (h,), (m,)
    fc, tc = feats - mu_f, targets - mu_t
    gram = fc.T @ fc  # (h, h)
    lam = ridge * float(torch.trace(gram)) / gram.shape[0] + 1e-8
    delta = torch.linalg.solve(
        gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), fc.T @ (tc - fc @ prior.T)
    )  # (h, m)
    weight = prior + delta.T  # (m, h)
    return weight, mu_t - weight @ mu_f


def merged_head(gate: Gate, ia: int, ib: int, xb: np.ndarray, context: np.ndarray, na: int, nb: int) -> Gate:
    """A gate copy whose experts ia, ib become one (at min(ia, ib)) carrying their summed probability.

    Their prototypes (if any) all go to the merged expert; its head row is fitted on the two
    experts' vectors and a sample of the others' (`context`), so that p_merged = p_a + p_b there
    too, instead of extrapolating from its own vectors only.
    """
    g = copy.deepcopy(gate)
    x = np.concatenate([xb, context])
    _, logits, _ = features_and_logits(g, x)
    T = float(g.temperature)
    target = T * torch.logsumexp(logits[:, [ia, ib]] / T, dim=1, keepdim=True)  # (n, 1): p_merged = p_a + p_b
    lo, hi = min(ia, ib), max(ia, ib)
    W, b = g.head.weight.detach().double().clone(), g.head.bias.detach().double().clone()
    W[lo] = (na * W[ia] + nb * W[ib]) / (na + nb)
    keep = [i for i in range(g.num_experts) if i != hi]
    mapping = {old: new for new, old in enumerate(keep)} | {hi: lo}
    g.set_head(W[keep], b[keep], g.remap_owners(mapping))  # the merged expert's row is a placeholder until fitted
    feats, _, proto = features_and_logits(g, x)
    row, bias = fit_rows(feats, target - proto[:, [lo]], W[lo][None])
    W, b = g.head.weight.detach().double().clone(), g.head.bias.detach().double().clone()
    W[lo], b[lo] = row[0], bias[0]
    g.set_head(W, b)
    return g


def split_head(
    gate: Gate, i: int, xb: np.ndarray, labels: np.ndarray, parts: int, context: np.ndarray, smoothing: float = 0.2
) -> Gate:
    """A gate copy whose expert i becomes `parts` experts that share its probability.

    On expert i's vectors each part takes 1 - smoothing of it for its own cluster; on the other
    experts' vectors (`context`) the parts share it evenly, so other routing is left alone.
    Expert i's prototypes (if any) go to the part with the nearest centroid, each part getting at
    least one (its centroid, when i has fewer prototypes than parts).
    """
    g = copy.deepcopy(gate)
    x = np.concatenate([xb, context])
    _, logits, _ = features_and_logits(g, x)
    T = float(g.temperature)
    share = np.full((len(x), parts), 1.0 / parts)
    share[: len(xb)] = smoothing / (parts - 1)
    share[np.arange(len(xb)), labels] = 1.0 - smoothing  # (n, parts): which part each vector goes to
    target = logits[:, [i]] + T * torch.from_numpy(np.log(share))  # (n, parts): part masses sum to expert i's
    E = g.num_experts
    mapping = {k: (k if k < i else k + parts - 1) for k in range(E) if k != i}
    owner = None
    if g.prototypes_per_expert:
        centroids = np.stack([xb[labels == j].mean(0) for j in range(parts)]).astype(np.float32)  # (parts, d)
        mine = torch.nonzero(g.prototype_owner == i).flatten()
        if len(mine) < parts:  # too few prototypes to give every part one: the missing parts get their centroid
            g.add_prototypes(torch.from_numpy(centroids[len(mine) :]), i)
            mine = torch.nonzero(g.prototype_owner == i).flatten()
        sim = g.prototypes.detach()[mine].double() @ torch.from_numpy(centroids).double().T  # (m, parts)
        part = sim.argmax(1)
        free = torch.ones(len(mine), dtype=torch.bool)
        for j in range(parts):  # every part first takes its most similar prototype not yet taken
            r = int(torch.where(free, sim[:, j], torch.tensor(-torch.inf, dtype=sim.dtype)).argmax())
            part[r], free[r] = j, False
        owner = g.remap_owners(mapping)
        owner[mine] = i + part.to(owner)
    W, b = g.head.weight.detach().double(), g.head.bias.detach().double()
    Wn = torch.cat([W[:i], W[i][None].expand(parts, -1), W[i + 1 :]])
    bn = torch.cat([b[:i], b[i].expand(parts), b[i + 1 :]])
    g.set_head(Wn, bn, owner)  # the parts' rows are placeholders until fitted
    feats, _, proto = features_and_logits(g, x)
    rows, biases = fit_rows(feats, target - proto[:, i : i + parts], W[i][None].expand(parts, -1))
    Wn, bn = Wn.clone(), bn.clone()
    Wn[i : i + parts], bn[i : i + parts] = rows, biases
    g.set_head(Wn, bn)
    return g


def fitted_new_rows(
    gate: Gate,
    idx: Sequence[int],
    own: Sequence[np.ndarray],
    context: np.ndarray,
    prototypes: Sequence[np.ndarray] | None = None,
    own_share: float = 0.9,
    other_share: float = 0.01,
) -> Gate:
    """A gate copy whose rows `idx` are refitted from their experts' vectors `own` and the others' `context`.

    Gate.add_expert points a new row at the mean feature of its vectors; features share a large
    common component, so such a row also scores other experts' vectors high. Each row is fitted
    (ridge regression) so that, against the other rows' current logits, its expert gets
    `own_share` of the probability on its own vectors and `other_share` on `context`. A prototype
    gate's experts `idx` get `prototypes` (one (m, d) array each) in place of the ones they had.
    """
    if not 0.0 < other_share < own_share < 1.0:
        raise ValueError(f"need 0 < other_share < own_share < 1, got other_share={other_share}, own_share={own_share}")
    rest = [i for i in range(gate.num_experts) if i not in idx]
    x = np.concatenate(list(own) + [context])  # (n, d)
    g = copy.deepcopy(gate)
    if g.prototypes_per_expert and prototypes is not None:
        for i, p in zip(idx, prototypes):
            g.add_prototypes(torch.from_numpy(p), i)
        owner = g.remap_owners({k: k for k in range(g.num_experts)})
        n_old = len(owner) - sum(len(p) for p in prototypes)
        owner[:n_old][torch.isin(owner[:n_old], torch.tensor(list(idx), device=owner.device))] = -1
        g.set_head(g.head.weight.detach(), g.head.bias.detach(), owner)
    feats, logits, proto = features_and_logits(g, x)
    T = float(g.temperature)
    base = T * torch.logsumexp(logits[:, rest] / T, dim=1, keepdim=True)  # (n, 1) the other experts' total
    share = np.full((len(x), len(idx)), other_share)
    start = 0
    for j, v in enumerate(own):
        share[start : start + len(v), j] = own_share
        start += len(v)
    target = base + T * torch.from_numpy(np.log(share / (1 - share)))  # (n, m): p_j = share against the rest
    W, b = g.head.weight.detach().double().clone(), g.head.bias.detach().double().clone()
    rows, biases = fit_rows(feats, target - proto[:, list(idx)], W[list(idx)])
    W[list(idx)], b[list(idx)] = rows, biases
    g.set_head(W, b)
    return g


def refit_rows(
    gate: Gate,
    experts: Sequence[Expert],
    idx: Sequence[int],
    own_share: float = 0.9,
    other_share: float = 0.01,
    seed: int = 0,
) -> Gate:
    """A gate copy whose rows `idx` (e.g. experts just added) are fitted from their vectors and a sample of the others'.

    Each row is fitted so that its expert gets `own_share` of the probability on its own vectors
    and `other_share` on a sample of the other experts' vectors (fitted_new_rows): routable at once
    without taking over everyone else's queries. A prototype gate's rows get k-means prototypes.
    """
    if len(set(idx)) != len(idx):
        raise ValueError(f"experts to refit must be distinct, got positions {list(idx)}")
    if len(idx) == len(experts):
        raise ValueError("fitting rows needs at least one other expert to compare with")
    own = [experts[i].vectors() for i in idx]
    protos = None
    if gate.prototypes_per_expert:  # k-means prototypes, as a trained gate's experts have
        protos = [experts[i].prototypes(gate.prototypes_per_expert, seed + i) for i in idx]
    context = sample_vectors(experts, idx, seed=seed)
    return fitted_new_rows(gate, idx, own, context, protos, own_share, other_share).eval()

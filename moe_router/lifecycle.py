"""Expert lifecycle: merge, split, auto-create, hierarchy, feedback rules, load analysis, optimize_routing.

Dimension legend: n vectors, nq queries, d dim, E experts, h gate feature width, P parent groups,
t experts searched per query, k hits.

Plain numpy + FAISS + torch: no Lightning, no Hydra. Fine-tuning after a change lives in
moe_router.adaptation and is passed in as a callable where an operation wants one.

Every structural operation is built aside and swapped in: it validates all of its inputs, builds
the new expert list, gate head and store changes without touching the router, then applies the
store changes in one SQLite transaction and swaps the experts and the gate in. An error at any
point before the swap leaves the router (and its store) as it was.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np
import torch

from moe_router.experts import Expert, MetadataStore
from moe_router.gate import Gate
from moe_router.metrics import load_stats, top_experts
from moe_router.router import Hit, Router

FineTune = Callable[[Router, Sequence[str]], Any]  # (router, names of new experts) -> anything; updates router.gate


# ---------------------------------------------------------------- building changes aside


@dataclass
class _State:
    """The parts of a router that a structural change replaces."""

    experts: list[Expert]
    gate: Gate | None
    counts: np.ndarray  # (E,) queries routed to each expert so far
    conf_sums: np.ndarray  # (E,) sum of gate probabilities when chosen


@dataclass
class _Plan:
    """A new state plus the store changes that go with it (applied together by _apply)."""

    state: _State
    item_moves: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (ids, new expert)
    feedback_moves: list[tuple[list[int], str]] = field(default_factory=list)  # (feedback seqs, new expert)
    created: list[str] = field(default_factory=list)


def _state(router: Router) -> _State:
    gate = router.gate
    if gate is not None and gate.num_experts != router.num_experts:
        raise RuntimeError(f"the gate has {gate.num_experts} outputs but the router has {router.num_experts} experts")
    return _State(list(router.experts), gate, router._query_counts.copy(), router._confidence_sums.copy())


def _apply(router: Router, plan: _Plan) -> None:
    """Store changes in one transaction, then swap experts, gate and stats in (nothing changes if the store fails)."""
    with router._lock:
        router.store.apply_changes(plan.item_moves, plan.feedback_moves)
        router.experts = list(plan.state.experts)
        router.gate = plan.state.gate
        router._query_counts = plan.state.counts.copy()
        router._confidence_sums = plan.state.conf_sums.copy()


def view(router: Router, state: _State | None = None) -> Router:
    """A router sharing `router`'s experts, store and embedder but with its own copy of the gate.

    Candidates are fine-tuned and measured on views; the original is untouched until a swap.
    """
    state = state or _state(router)
    out = Router(router.dim, router.metric, embedder=router.embedder, store=router.store)
    out.experts = list(state.experts)
    out.gate = copy.deepcopy(state.gate) if state.gate is not None else None
    out._query_counts = state.counts.copy()
    out._confidence_sums = state.conf_sums.copy()
    return out


def _index(experts: Sequence[Expert], name: str) -> int:
    for i, e in enumerate(experts):
        if e.name == name:
            return i
    raise KeyError(f"unknown expert {name!r}; known experts: {[e.name for e in experts]}")


def _check_new_name(name: Any, taken: set[str], what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what}: expert name must be a non-empty string, got {name!r}")
    if name in taken:
        raise ValueError(f"{what}: an expert named {name!r} already exists; expert names must be unique")
    return name


def _new_expert(like: Expert, name: str, xb: np.ndarray, ids: np.ndarray, specialization: str, parent: str | None) -> Expert:
    e = Expert(name, like.dim, like.metric, specialization or name, parent)
    e.add(xb, ids)
    return e


# ---------------------------------------------------------------- gate head rows


@torch.no_grad()
def _features_and_logits(gate: Gate, xb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate features (n, h), full logits (n, E) and their prototype part (n, E), float64; gate left in eval mode.

    logits = head(features) + prototype logits (zeros for a gate without prototypes), so a head
    row is fitted to (wanted logit - its expert's prototype logit).
    """
    gate.eval()
    x = torch.from_numpy(np.ascontiguousarray(xb)).to(gate.head.weight)
    feats = gate.features(x)  # (n, h)
    proto = gate.prototype_logits(x)  # (n, E)
    return feats.double(), (gate.head(feats) + proto).double(), proto.double()


def _fit_rows(feats: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Head rows (m, h) and biases (m,) whose logits on `feats` (n, h) fit `targets` (n, m).

    Ridge regression pulled towards `prior` rows (m, h): with few vectors the rows stay near the
    prior instead of overfitting them. The penalty is scaled to the features' variance.
    """
    mu_f, mu_t = feats.mean(0), targets.mean(0)  # (h,), (m,)
    fc, tc = feats - mu_f, targets - mu_t
    gram = fc.T @ fc  # (h, h)
    lam = ridge * float(torch.trace(gram)) / gram.shape[0] + 1e-8
    delta = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), fc.T @ (tc - fc @ prior.T))  # (h, m)
    weight = prior + delta.T  # (m, h)
    return weight, mu_t - weight @ mu_f


def _context(experts: Sequence[Expert], skip: Sequence[int], limit: int = 4096, seed: int = 0) -> np.ndarray:
    """A seeded sample of up to `limit` vectors of the experts not in `skip` (where new rows must behave as before)."""
    others = [e for i, e in enumerate(experts) if i not in skip and e.ntotal]
    if not others:
        return np.empty((0, experts[0].dim), np.float32)
    x = np.concatenate([e.vectors() for e in others])
    if len(x) > limit:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), size=limit, replace=False))]
    return x


def _merged_head(gate: Gate, ia: int, ib: int, xb: np.ndarray, context: np.ndarray, na: int, nb: int) -> Gate:
    """A gate copy whose experts ia, ib become one (at min(ia, ib)) carrying their summed probability.

    Their prototypes (if any) all go to the merged expert; its head row is fitted on the two
    experts' vectors and a sample of the others' (`context`), so that p_merged = p_a + p_b there
    too, instead of extrapolating from its own vectors only.
    """
    g = copy.deepcopy(gate)
    x = np.concatenate([xb, context])
    _, logits, _ = _features_and_logits(g, x)
    T = float(g.temperature)
    target = T * torch.logsumexp(logits[:, [ia, ib]] / T, dim=1, keepdim=True)  # (n, 1): p_merged = p_a + p_b
    lo, hi = min(ia, ib), max(ia, ib)
    W, b = g.head.weight.detach().double().clone(), g.head.bias.detach().double().clone()
    W[lo] = (na * W[ia] + nb * W[ib]) / (na + nb)
    keep = [i for i in range(g.num_experts) if i != hi]
    mapping = {old: new for new, old in enumerate(keep)} | {hi: lo}
    g.set_head(W[keep], b[keep], g.remap_owners(mapping))  # the merged expert's row is a placeholder until fitted
    feats, _, proto = _features_and_logits(g, x)
    row, bias = _fit_rows(feats, target - proto[:, [lo]], W[lo][None])
    W, b = g.head.weight.detach().double().clone(), g.head.bias.detach().double().clone()
    W[lo], b[lo] = row[0], bias[0]
    g.set_head(W, b)
    return g


def _split_head(gate: Gate, i: int, xb: np.ndarray, labels: np.ndarray, parts: int, context: np.ndarray,
                smoothing: float = 0.2) -> Gate:
    """A gate copy whose expert i becomes `parts` experts that share its probability.

    On expert i's vectors each part takes 1 - smoothing of it for its own cluster; on the other
    experts' vectors (`context`) the parts share it evenly, so other routing is left alone.
    Expert i's prototypes (if any) go to the part with the nearest centroid, each part getting at
    least one (its centroid, when i has fewer prototypes than parts).
    """
    g = copy.deepcopy(gate)
    x = np.concatenate([xb, context])
    _, logits, _ = _features_and_logits(g, x)
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
            g.add_prototypes(torch.from_numpy(centroids[len(mine):]), i)
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
    feats, _, proto = _features_and_logits(g, x)
    rows, biases = _fit_rows(feats, target - proto[:, i : i + parts], W[i][None].expand(parts, -1))
    Wn, bn = Wn.clone(), bn.clone()
    Wn[i : i + parts], bn[i : i + parts] = rows, biases
    g.set_head(Wn, bn)
    return g


# ---------------------------------------------------------------- add


def fit_expert_rows(
    router: Router, names: Sequence[str], own_share: float = 0.9, other_share: float = 0.01, seed: int = 0,
) -> None:
    """Refit the gate rows of experts `names` (e.g. just added) from their vectors and a sample of the others'.

    Gate.add_expert points a new row at the mean feature of its vectors; features share a large
    common component, so such a row also scores other experts' vectors high. A prototype gate's
    experts get k-means prototypes of their vectors (as install_gate gives trained ones). Each row is
    fitted (ridge regression) so that, against the other rows' current logits, its expert gets
    `own_share` of the probability on its own vectors and `other_share` on a sample of the other
    experts' vectors: routable at once without taking over everyone else's queries.
    """
    if not 0.0 < other_share < own_share < 1.0:
        raise ValueError(f"need 0 < other_share < own_share < 1, got other_share={other_share}, own_share={own_share}")
    with router._lock:
        state = _state(router)
        if state.gate is None:
            raise RuntimeError("the router has no gate; there are no rows to fit")
        idx = [_index(state.experts, n) for n in names]
        if len(set(idx)) != len(idx):
            raise ValueError(f"expert names must be distinct, got {list(names)}")
        rest = [i for i in range(len(state.experts)) if i not in idx]
        if not rest:
            raise ValueError("fitting rows needs at least one other expert to compare with")
        own = [state.experts[i].vectors() for i in idx]
        context = _context(state.experts, idx, seed=seed)
        x = np.concatenate(own + [context])  # (n, d)
        g = copy.deepcopy(state.gate)
        if g.prototypes_per_expert:  # k-means prototypes, as a trained gate's experts have, replace any others
            for i in idx:
                g.add_prototypes(torch.from_numpy(state.experts[i].prototypes(g.prototypes_per_expert, seed + i)), i)
            owner = g.remap_owners({k: k for k in range(g.num_experts)})
            n_old = len(owner) - sum(min(g.prototypes_per_expert, state.experts[i].ntotal) for i in idx)
            owner[:n_old][torch.isin(owner[:n_old], torch.tensor(idx, device=owner.device))] = -1
            g.set_head(g.head.weight.detach(), g.head.bias.detach(), owner)
        feats, logits, proto = _features_and_logits(g, x)
        T = float(g.temperature)
        base = T * torch.logsumexp(logits[:, rest] / T, dim=1, keepdim=True)  # (n, 1) the other experts' total
        share = np.full((len(x), len(idx)), other_share)
        start = 0
        for j, v in enumerate(own):
            share[start : start + len(v), j] = own_share
            start += len(v)
        target = base + T * torch.from_numpy(np.log(share / (1 - share)))  # (n, m): p_j = share against the rest
        W, b = g.head.weight.detach().double().clone(), g.head.bias.detach().double().clone()
        rows, biases = _fit_rows(feats, target - proto[:, idx], W[idx])
        W[idx], b[idx] = rows, biases
        g.set_head(W, b)
        router.gate = g.eval()


def add_expert(
    router: Router, name: str, vectors: Any = None, texts: Sequence[str] | None = None, specialization: str = "",
    parent: str | None = None, metadata: Sequence[dict] | None = None, fit_row: bool = True,
) -> Expert:
    """Router.add_expert: with a gate and `fit_row`, its row is fitted (fit_expert_rows), routable at once.

    The inputs are checked by Router.add_expert before anything changes; if the fit fails the
    expert is removed again, so the router ends as it was.
    """
    return router.add_expert(name, vectors, texts, specialization, parent, metadata, fit_row=fit_row)


# ---------------------------------------------------------------- merge and split


def _plan_merge(
    state: _State, store: MetadataStore, a: str, b: str, name: str | None, specialization: str | None,
    parent: str | None | type[Ellipsis],
) -> _Plan:
    ia, ib = _index(state.experts, a), _index(state.experts, b)
    if ia == ib:
        raise ValueError(f"cannot merge expert {a!r} with itself; name two different experts")
    name = name if name is not None else f"{a}+{b}"
    _check_new_name(name, {e.name for e in state.experts} - {a, b}, f"merging {a!r} and {b!r}")
    ea, eb = state.experts[ia], state.experts[ib]
    if parent is ...:
        parent = ea.parent if ea.parent == eb.parent else None
    xb = np.concatenate([ea.vectors(), eb.vectors()])  # (na + nb, d)
    ids = np.concatenate([ea.ids, eb.ids])
    spec = specialization if specialization is not None else (ea.specialization if ea.specialization == eb.specialization
                                                                 else f"{ea.specialization}+{eb.specialization}")
    merged = _new_expert(ea, name, xb, ids, spec, parent)
    gate = None
    if state.gate is not None:
        gate = _merged_head(state.gate, ia, ib, xb, _context(state.experts, (ia, ib)), ea.ntotal, eb.ntotal)
    lo, hi = min(ia, ib), max(ia, ib)
    experts = list(state.experts)
    experts[lo] = merged
    del experts[hi]
    counts, sums = state.counts.copy(), state.conf_sums.copy()
    counts[lo], sums[lo] = counts[ia] + counts[ib], sums[ia] + sums[ib]
    seqs = [r[0] for r in store.feedback(a)] + [r[0] for r in store.feedback(b)]
    return _Plan(_State(experts, gate, np.delete(counts, hi), np.delete(sums, hi)),
                 [(ids, name)], [(seqs, name)] if seqs else [], [name])


def merge_experts(
    router: Router, a: str, b: str, name: str | None = None, specialization: str | None = None,
    parent: Any = ...,
) -> Expert:
    """Merge experts `a` and `b` into one (default name 'a+b') in a's place.

    Vectors, ids and metadata are combined, feedback moves to the merged expert, and the gate's
    two rows become one fitted so that, on their vectors, it carries the summed probability of
    the two (so routing is as before, with the two treated as one). `parent` defaults to the
    shared parent of the two (None when they differ). Follow with a short fine-tune
    (moe_router.adaptation.fine_tune).
    """
    with router._lock:
        plan = _plan_merge(_state(router), router.store, a, b, name, specialization, parent)
        _apply(router, plan)
        return router.expert(plan.created[0])


def _plan_split(
    state: _State, store: MetadataStore, name: str, parts: int, names: Sequence[str] | None,
    seed: int, max_imbalance: float | None,
) -> _Plan:
    i = _index(state.experts, name)
    ex = state.experts[i]
    if isinstance(parts, bool) or not isinstance(parts, (int, np.integer)) or parts < 2:
        raise ValueError(f"splitting expert {name!r}: parts must be an integer >= 2, got {parts!r}")
    if parts > ex.ntotal:
        raise ValueError(f"cannot split expert {name!r} into {parts} parts: it holds only {ex.ntotal} vectors")
    names = list(names) if names is not None else [f"{name}/{j}" for j in range(parts)]
    if len(names) != parts:
        raise ValueError(f"splitting expert {name!r} into {parts} parts needs {parts} names, got {len(names)}")
    taken = {e.name for e in state.experts} - {name}
    for n in names:
        _check_new_name(n, taken, f"splitting expert {name!r}")
        taken.add(n)
    xb = ex.vectors()
    labels = balanced_kmeans(xb, parts, metric=ex.metric, seed=seed, max_imbalance=max_imbalance)
    children = [
        _new_expert(ex, n, xb[labels == j], ex.ids[labels == j], f"{ex.specialization} ({j + 1}/{parts})", ex.parent)
        for j, n in enumerate(names)
    ]
    gate = _split_head(state.gate, i, xb, labels, parts, _context(state.experts, (i,), seed=seed)) if state.gate is not None else None
    experts = state.experts[:i] + children + state.experts[i + 1 :]
    zeros = np.zeros(parts)  # routing history of the whole expert cannot be attributed to its parts
    counts = np.concatenate([state.counts[:i], zeros, state.counts[i + 1 :]])
    sums = np.concatenate([state.conf_sums[:i], zeros, state.conf_sums[i + 1 :]])
    # Feedback on the old expert goes to the part nearest its query.
    rows = store.feedback(name)
    feedback_moves: list[tuple[list[int], str]] = []
    if rows:
        xq = np.stack([r[2] for r in rows])
        centroids = np.stack([c.centroid() for c in children])
        near = np.argmax(xq @ centroids.T, 1) if ex.metric == "ip" else np.argmin(
            ((xq[:, None, :] - centroids[None]) ** 2).sum(-1), 1)
        feedback_moves = [([rows[r][0] for r in np.flatnonzero(near == j)], n) for j, n in enumerate(names) if (near == j).any()]
    item_moves = [(ex.ids[labels == j], n) for j, n in enumerate(names)]
    return _Plan(_State(experts, gate, counts, sums), item_moves, feedback_moves, names)


def split_expert(
    router: Router, name: str, parts: int = 2, names: Sequence[str] | None = None, seed: int = 0,
    max_imbalance: float | None = None,
) -> list[Expert]:
    """Split an expert into `parts` by k-means over its vectors (default names 'name/0', 'name/1', ...).

    Every id goes to exactly one part; the gate's row becomes one row per part, fitted so the
    parts share the old expert's probability by cluster. `max_imbalance` bounds the largest
    part at that multiple of the mean part size. Follow with a short fine-tune.
    """
    with router._lock:
        plan = _plan_split(_state(router), router.store, name, parts, names, seed, max_imbalance)
        _apply(router, plan)
        return [router.expert(n) for n in plan.created]


# ---------------------------------------------------------------- clustering with a size bound


def balanced_kmeans(
    x: np.ndarray, n: int, metric: str = "ip", seed: int = 0, max_imbalance: float | None = 1.5,
    niter: int = 20, rounds: int = 3,
) -> np.ndarray:
    """(N,) cluster of each row of x (N, d): FAISS k-means, then an assignment with a size cap.

    No cluster is empty, and with `max_imbalance` no cluster holds more than
    max(ceil(N / n), floor(max_imbalance * N / n)) rows: the largest is at most `max_imbalance`
    times the mean size (or one more row than an even split, when that bound is tighter).
    Rows go to their best-scoring cluster with room, most decided rows first; centroids are
    then re-estimated from the capped assignment `rounds` times.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    N = x.shape[0]
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of clusters must be an integer >= 1, got {n!r}")
    if n > N:
        raise ValueError(f"cannot make {n} clusters from {N} vectors; expected at most {N}")
    if max_imbalance is not None and max_imbalance < 1.0:
        raise ValueError(f"max_imbalance is the largest cluster over the mean size, so it must be >= 1, got {max_imbalance}")
    if n == 1:
        return np.zeros(N, dtype=np.int64)
    cap = N if max_imbalance is None else max(math.ceil(N / n), math.floor(max_imbalance * N / n))
    km = faiss.Kmeans(x.shape[1], n, niter=niter, seed=seed, spherical=metric == "ip", verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, N))
    km.train(x)
    centroids = km.centroids
    labels = np.zeros(N, dtype=np.int64)
    for _ in range(max(1, rounds)):
        labels = _capped_assignment(_scores(x, centroids, metric), cap)
        centroids = np.stack([x[labels == j].mean(0) for j in range(n)]).astype(np.float32)
        if metric == "ip":
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return labels


def _scores(x: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
    """(N, n) similarity of each row to each centroid (higher is closer)."""
    if metric == "ip":
        return x @ centroids.T
    return -(((x[:, None, :] - centroids[None]) ** 2).sum(-1))


def _capped_assignment(scores: np.ndarray, cap: int) -> np.ndarray:
    """Each row to its best cluster with room (rows with the largest best-vs-second margin first); none empty."""
    N, n = scores.shape
    prefs = np.argsort(-scores, axis=1, kind="stable")  # (N, n)
    top2 = np.take_along_axis(scores, prefs[:, :2], axis=1)
    order = np.argsort(-(top2[:, 0] - top2[:, 1]), kind="stable")
    labels = np.empty(N, dtype=np.int64)
    sizes = np.zeros(n, dtype=np.int64)
    for r in order:
        for j in prefs[r]:
            if sizes[j] < cap:
                labels[r] = j
                sizes[j] += 1
                break
    for j in np.flatnonzero(sizes == 0):  # an empty cluster takes its closest row from a cluster of > 1
        movable = sizes[labels] > 1
        r = int(np.flatnonzero(movable)[np.argmax(scores[movable, j])])
        sizes[labels[r]] -= 1
        labels[r], sizes[j] = j, 1
    return labels


# ---------------------------------------------------------------- auto-create


@dataclass(frozen=True)
class AutoCreateReport:
    created: list[tuple[str, int]]  # (expert, vectors)
    skipped: list[tuple[str, int]]  # (category, documents) below the minimum


def _add_all(router: Router, groups: list[tuple[str, np.ndarray, str]], xb: np.ndarray, texts: Sequence[str] | None,
             metadata: Sequence[dict] | None, parent: str | None, fit_rows: bool) -> list[tuple[str, int]]:
    """Add one expert per (name, rows, specialization), then fit their gate rows; on any failure remove them again."""
    added: list[str] = []
    try:
        for name, rows, spec in groups:
            router.add_expert(
                name, xb[rows], texts=[texts[r] for r in rows] if texts is not None else None, specialization=spec,
                parent=parent, metadata=[metadata[r] for r in rows] if metadata is not None else None,
                fit_row=False,  # all new rows are fitted together below
            )
            added.append(name)
        if fit_rows and added and router.gate is not None and router.num_experts > len(added):
            fit_expert_rows(router, added)
    except BaseException:
        for name in reversed(added):
            router.remove_expert(name)
        raise
    return [(name, len(rows)) for name, rows, _ in groups]


def slug(text: str) -> str:
    return "_".join(text.lower().split())


def auto_create_by_category(
    router: Router, categories: Sequence[str], texts: Sequence[str] | None = None, vectors: Any = None,
    min_docs: int = 5, name_format: str = "{category}", parent: str | None = None,
    metadata: Sequence[dict] | None = None, fit_rows: bool = True,
) -> AutoCreateReport:
    """One expert per category with at least `min_docs` documents (the others are skipped and reported).

    The expert is named name_format.format(category=...) and specialised as the category's slug.
    With a gate, the new rows are fitted (fit_expert_rows; `fit_rows`). All names are checked
    before anything is added; a failure part-way removes what was added.
    """
    xb = router.vectors_from(texts, vectors, "auto-create by category")
    if len(categories) != xb.shape[0]:
        raise ValueError(f"auto-create by category: {xb.shape[0]} documents but {len(categories)} categories")
    if metadata is not None and len(metadata) != xb.shape[0]:
        raise ValueError(f"auto-create by category: {len(metadata)} metadata entries for {xb.shape[0]} documents")
    cats = np.array([str(c) for c in categories])
    groups, skipped = [], []
    taken = set(router.expert_names)
    for cat in dict.fromkeys(cats.tolist()):  # first-seen order
        rows = np.flatnonzero(cats == cat)
        if len(rows) < min_docs:
            skipped.append((cat, len(rows)))
            continue
        name = _check_new_name(name_format.format(category=cat), taken, f"auto-create for category {cat!r}")
        taken.add(name)
        groups.append((name, rows, slug(cat)))
    return AutoCreateReport(_add_all(router, groups, xb, texts, metadata, parent, fit_rows), skipped)


def auto_create_by_clustering(
    router: Router, n: int, texts: Sequence[str] | None = None, vectors: Any = None, max_imbalance: float = 1.5,
    seed: int = 0, prefix: str = "cluster", parent: str | None = None, metadata: Sequence[dict] | None = None,
    fit_rows: bool = True,
) -> AutoCreateReport:
    """`n` experts from unlabelled documents by FAISS k-means, no expert above max_imbalance x the mean size."""
    xb = router.vectors_from(texts, vectors, "auto-create by clustering")
    if metadata is not None and len(metadata) != xb.shape[0]:
        raise ValueError(f"auto-create by clustering: {len(metadata)} metadata entries for {xb.shape[0]} documents")
    labels = balanced_kmeans(xb, n, metric=router.metric, seed=seed, max_imbalance=max_imbalance)
    taken = set(router.expert_names)
    groups = []
    for j in range(n):
        name = _check_new_name(f"{prefix}{j}", taken, "auto-create by clustering")
        groups.append((name, np.flatnonzero(labels == j), name))
    return AutoCreateReport(_add_all(router, groups, xb, texts, metadata, parent, fit_rows), [])


# ---------------------------------------------------------------- hierarchy


def group_key(expert: Expert) -> str:
    """An expert's parent, or its own name when it has none (a group of one)."""
    return expert.parent if expert.parent is not None else expert.name


def hierarchy(router: Router) -> dict[str, list[str]]:
    """parent (or a parentless expert's own name) -> its children's names, in expert order."""
    out: dict[str, list[str]] = {}
    for e in router.experts:
        out.setdefault(group_key(e), []).append(e.name)
    return out


def set_parent(router: Router, expert: str, parent: str | None) -> None:
    """Put `expert` under `parent` (None: no parent); saved with the checkpoint."""
    ex = router.expert(expert)
    if parent is not None and (not isinstance(parent, str) or not parent.strip()):
        raise ValueError(f"parent of expert {expert!r} must be a non-empty string or None, got {parent!r}")
    if parent == expert:
        raise ValueError(f"expert {expert!r} cannot be its own parent")
    ex.parent = parent


def group_by_parent(hits: Sequence[Hit]) -> dict[str, list[Hit]]:
    """Hits grouped by their expert's parent (a parentless expert is its own group), best group first."""
    out: dict[str, list[Hit]] = {}
    for h in hits:
        out.setdefault(h.parent if h.parent is not None else h.expert, []).append(h)
    return out


@dataclass(frozen=True)
class TwoLevelRouting:
    """Array form of two-level routing."""

    parents: list[str]  # (P,) parent group names
    probs: np.ndarray  # (nq, E) gate probabilities of the experts
    parent_probs: np.ndarray  # (nq, P) summed gate probability of each group's children
    top_parents: np.ndarray  # (nq, tp) group indices, best first
    top: np.ndarray  # (nq, t) expert indices, best first: children of the chosen groups first


def two_level_top(probs: np.ndarray, groups: np.ndarray, top_parents: int, top_children: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parent probs (nq, P), top parents (nq, tp), top experts (nq, t)) from leaf probs (nq, E).

    A group's probability is the sum of its children's. Experts are the most probable children
    of the chosen groups; when those have fewer than `top_children` children, the best other
    experts fill the row (so every row has t experts).
    """
    P = int(groups.max()) + 1
    member = np.zeros((probs.shape[1], P), dtype=probs.dtype)
    member[np.arange(probs.shape[1]), groups] = 1.0  # (E, P)
    pprobs = probs @ member  # (nq, P)
    tp = top_experts(pprobs, top_parents)  # (nq, tp)
    allowed = (groups[None, None, :] == tp[:, :, None]).any(axis=1)  # (nq, E)
    score = probs + 2.0 * allowed  # chosen groups' children first, each part ordered by probability
    return pprobs, tp, top_experts(score, top_children)


def route_two_level(router: Router, queries: Any, top_parents: int = 1, top_children: int = 2, record: bool = True) -> TwoLevelRouting:
    """Route to parent groups first (summed child probability), then to the best children inside them."""
    names = list(hierarchy(router))
    if not 1 <= top_parents <= len(names):
        raise ValueError(f"top_parents must be between 1 and {len(names)} (the number of parent groups), got {top_parents}")
    top_children = router._check_top(top_children, "top_children")
    xq, _ = router.prepare_queries(queries)
    probs = router.gate_probs(xq)
    groups = np.array([names.index(group_key(e)) for e in router.experts])
    pprobs, tp, top = two_level_top(probs, groups, top_parents, top_children)
    if record:
        with router._lock:
            np.add.at(router._query_counts, top.ravel(), 1)
            np.add.at(router._confidence_sums, top.ravel(), np.take_along_axis(probs, top, 1).ravel())
    return TwoLevelRouting(names, probs, pprobs, tp, top)


def search_two_level(
    router: Router, queries: Any, k: int = 10, top_parents: int = 1, top_children: int = 2, with_text: bool = True,
) -> list[Hit] | list[list[Hit]]:
    """Search the best `top_children` experts inside the best `top_parents` parent groups."""
    k = router._check_k(k)
    xq, single = router.prepare_queries(queries)
    routing = route_two_level(router, xq, top_parents, top_children)
    out = router.hits(router.search_experts(xq, k, routing.top), routing.probs, with_text)
    return out[0] if single else out


# ---------------------------------------------------------------- feedback


@dataclass(frozen=True)
class FeedbackStats:
    expert: str
    total: int
    positive: int
    success_rate: float | None  # positive / total; None without feedback


@dataclass(frozen=True)
class RecommendationRules:
    """The tutorial's rules: success below 50% over more than 10 queries -> retrain or merge;
    above 90% over more than 20 -> consider splitting."""

    low_success: float = 0.5  # success rate below this ...
    low_min_queries: int = 10  # ... over more than this many feedback records -> retrain or merge
    high_success: float = 0.9  # success rate above this ...
    high_min_queries: int = 20  # ... over more than this many -> consider splitting


@dataclass(frozen=True)
class Recommendation:
    expert: str
    action: str  # 'retrain_or_merge' | 'split'
    reason: str
    merge_with: str | None = None  # the most similar other expert (centroids), for 'retrain_or_merge'


def feedback_stats(router: Router) -> list[FeedbackStats]:
    """Per current expert: feedback records, positive ones and the success rate (from the SQLite store)."""
    counts = router.store.feedback_counts()
    out = []
    for name in router.expert_names:
        total, pos = counts.get(name, (0, 0))
        out.append(FeedbackStats(name, total, pos, pos / total if total else None))
    return out


def nearest_expert(router: Router, name: str) -> str | None:
    """The other expert whose centroid is closest to `name`'s."""
    i = router.expert_index(name)
    if router.num_experts < 2:
        return None
    c = np.stack([e.centroid() for e in router.experts])  # (E, d)
    sim = c @ c[i] if router.metric == "ip" else -((c - c[i]) ** 2).sum(1)
    sim[i] = -np.inf
    return router.experts[int(np.argmax(sim))].name


def recommendations(router: Router, rules: RecommendationRules = RecommendationRules()) -> list[Recommendation]:
    """Apply the feedback rules to every expert; experts that meet no rule get no recommendation."""
    out = []
    for s in feedback_stats(router):
        if s.success_rate is None:
            continue
        if s.success_rate < rules.low_success and s.total > rules.low_min_queries:
            out.append(Recommendation(
                s.expert, "retrain_or_merge",
                f"success {100 * s.success_rate:.1f}% < {100 * rules.low_success:.0f}% over {s.total} > "
                f"{rules.low_min_queries} queries", nearest_expert(router, s.expert)))
        elif s.success_rate > rules.high_success and s.total > rules.high_min_queries:
            out.append(Recommendation(
                s.expert, "split",
                f"success {100 * s.success_rate:.1f}% > {100 * rules.high_success:.0f}% over {s.total} > "
                f"{rules.high_min_queries} queries"))
    return out


# ---------------------------------------------------------------- load analysis


@dataclass(frozen=True)
class LoadRow:
    expert: str
    vectors: int
    queries: int  # queries routed to it (among each query's chosen experts)
    load_share: float  # share of all (query, expert) assignments
    ratio: float  # load over the average load (1.0 = exactly average)
    mean_confidence: float  # mean gate probability when chosen
    success_rate: float | None  # from feedback; None without feedback
    flag: str  # 'over' (> over x average), 'under' (< under x average) or ''


@dataclass(frozen=True)
class LoadReport:
    rows: list[LoadRow]
    total: int  # (query, expert) assignments counted
    over: float
    under: float

    @property
    def imbalanced(self) -> list[LoadRow]:
        return [r for r in self.rows if r.flag]


def load_report(
    router: Router, queries: Any = None, top_k: int = 2, over: float = 1.5, under: float = 0.5,
) -> LoadReport:
    """Per expert load, confidence and feedback success; flags experts above `over` / below `under` x average.

    With `queries`, they are routed (top_k experts each, not counted in the router's stats) and
    the report covers them; otherwise it uses the router's live stats.
    """
    if queries is not None:
        xq, _ = router.prepare_queries(queries)
        probs, top = router.decide(xq, top_k, record=False)
        counts = np.bincount(top.ravel(), minlength=router.num_experts)
        sums = np.bincount(top.ravel(), weights=np.take_along_axis(probs, top, 1).ravel(), minlength=router.num_experts)
    else:
        st = router.stats()
        counts = np.array([s.queries for s in st])
        sums = np.array([s.mean_confidence * s.queries for s in st])
    total = int(counts.sum())
    avg = total / max(router.num_experts, 1)
    success = {s.expert: s.success_rate for s in feedback_stats(router)}
    rows = []
    for e, c, s in zip(router.experts, counts, sums):
        ratio = c / avg if avg > 0 else 0.0
        flag = "" if total == 0 else "over" if ratio > over else "under" if ratio < under else ""
        rows.append(LoadRow(e.name, e.ntotal, int(c), c / total if total else 0.0, float(ratio),
                            float(s / c) if c else 0.0, success[e.name], flag))
    return LoadReport(rows, total, over, under)


def load_chart(report: LoadReport, width: int = 40) -> str:
    """The load report as a text bar chart (one bar per expert, longest = `width` blocks)."""
    if not report.rows:
        return "(no experts)"
    name_w = max(len(r.expert) for r in report.rows)
    top = max((r.load_share for r in report.rows), default=0.0) or 1.0
    lines = []
    for r in report.rows:
        bar = "█" * int(round(width * r.load_share / top))
        success = "-" if r.success_rate is None else f"{100 * r.success_rate:.0f}%"
        flag = {"over": f"  ⚠ {r.ratio:.2f}x average (> {report.over}x)",
                "under": f"  ⚠ {r.ratio:.2f}x average (< {report.under}x)"}.get(r.flag, "")
        lines.append(f"{r.expert:<{name_w}} {bar:<{width}} {100 * r.load_share:5.1f}%  queries {r.queries}, "
                     f"confidence {r.mean_confidence:.3f}, success {success}{flag}")
    lines.append(f"{report.total} (query, expert) assignments; {len(report.imbalanced)} expert(s) imbalanced")
    return "\n".join(lines)


def plot_load(report: LoadReport, path: str | Path) -> Path:
    """Write the load report as a PNG bar chart (average and the over/under limits drawn as lines)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [r.expert for r in report.rows]
    shares = [100 * r.load_share for r in report.rows]
    colours = ["#d62728" if r.flag == "over" else "#ff7f0e" if r.flag == "under" else "#1f77b4" for r in report.rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    try:
        ax.bar(range(len(names)), shares, color=colours)
        avg = 100 / max(len(names), 1)
        for level, style in ((1.0, "-"), (report.over, "--"), (report.under, ":")):
            ax.axhline(avg * level, color="grey", linestyle=style, linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("load share (%)")
        ax.set_title(f"Expert load ({report.total} assignments; lines: average, {report.over}x, {report.under}x)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------- optimize_routing


@dataclass(frozen=True)
class RoutingQuality:
    """Measured on validation queries."""

    recall: float  # recall@k when searching the gate's top experts, vs exhaustive search
    scanned: float  # share of stored vectors compared per query
    max_over_mean: float  # load of the busiest expert over the average
    cv: float  # coefficient of variation of the load


@dataclass(frozen=True)
class OptimizeAction:
    kind: str  # 'rebalance' | 'merge' | 'split'
    experts: tuple[str, ...]
    kept: bool
    before: RoutingQuality
    after: RoutingQuality
    note: str = ""


@dataclass(frozen=True)
class OptimizeReport:
    actions: list[OptimizeAction]
    before: RoutingQuality
    after: RoutingQuality

    @property
    def improvement(self) -> float:
        """Measured recall@k gain on the validation queries (0.0 when nothing was kept)."""
        return self.after.recall - self.before.recall

    def count(self, kind: str) -> int:
        return sum(a.kept for a in self.actions if a.kind == kind)


def _quality(state: _State, xq: np.ndarray, exact_ids: np.ndarray, t: int, probs: np.ndarray | None = None) -> RoutingQuality:
    """recall@k of searching each query's top-t experts, from which expert holds each exact neighbour."""
    if probs is None:
        probs = _probs(state.gate, xq)
    owner_of = {int(i): j for j, e in enumerate(state.experts) for i in e.ids}
    owner = np.vectorize(lambda i: owner_of.get(int(i), -1), otypes=[np.int64])(exact_ids)  # (nq, k)
    top = top_experts(probs, t)  # (nq, t)
    found = (owner[:, :, None] == top[:, None, :]).any(axis=2) & (exact_ids >= 0)  # (nq, k)
    sizes = np.array([e.ntotal for e in state.experts])
    load = load_stats(top, len(state.experts))
    return RoutingQuality(float(found.sum(1).mean() / exact_ids.shape[1]), float(sizes[top].sum(1).mean() / sizes.sum()),
                          float(load["max_over_mean"]), float(load["cv"]))


@torch.no_grad()
def _logits(gate: Gate, xq: np.ndarray) -> np.ndarray:
    gate.eval()
    return gate(torch.from_numpy(xq).to(gate.head.weight), top_k=1).logits.double().cpu().numpy()


def _probs(gate: Gate, xq: np.ndarray, bias_shift: np.ndarray | None = None) -> np.ndarray:
    z = _logits(gate, xq) + (0.0 if bias_shift is None else bias_shift[None])
    z = z / float(gate.temperature)
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def _better(new: RoutingQuality, cur: RoutingQuality, tolerance: float, max_scan_increase: float) -> bool:
    """Kept only if recall is no worse (within tolerance), cost stays in budget, and something improves."""
    if new.recall < cur.recall - tolerance or new.scanned > cur.scanned * (1 + max_scan_increase) + 1e-12:
        return False
    return new.recall > cur.recall + 1e-12 or new.scanned < cur.scanned - 1e-12 or new.max_over_mean < cur.max_over_mean - 1e-9


def _rebalanced_gate(state: _State, xq: np.ndarray, exact_ids: np.ndarray, t: int, cur: RoutingQuality,
                     tolerance: float, max_scan_increase: float, over: float, under: float) -> tuple[Gate, tuple[str, ...]] | None:
    """Shift head biases against the load (log of each expert's load over the average); best accepted strength."""
    gate = state.gate
    probs = _probs(gate, xq)
    E = len(state.experts)
    shares = np.bincount(top_experts(probs, t).ravel(), minlength=E) / (len(xq) * t)
    ratio = shares * E
    flagged = (ratio > over) | (ratio < under)
    if not flagged.any():
        return None
    shift = -float(gate.temperature) * np.log(np.clip(ratio, 0.25, 4.0))  # (E,) pushes load towards the average
    best = None
    for strength in (0.25, 0.5, 1.0):
        q = _quality(state, xq, exact_ids, t, _probs(gate, xq, strength * shift))
        if _better(q, cur, tolerance, max_scan_increase) and (best is None or q.max_over_mean < best[1].max_over_mean):
            best = (strength, q)
    if best is None:
        return None
    g = copy.deepcopy(gate)
    with torch.no_grad():
        g.head.bias += torch.from_numpy(best[0] * shift).to(g.head.bias)
    return g, tuple(e.name for e, f in zip(state.experts, flagged) if f)


def _co_routing(probs: np.ndarray, E: int) -> list[tuple[float, int, int]]:
    """(share, a, b) for expert pairs: queries whose top-2 is {a, b} over queries whose top-1 is a or b, highest first."""
    top = top_experts(probs, 2)
    pair = np.zeros((E, E))
    np.add.at(pair, (top[:, 0], top[:, 1]), 1)
    first = np.bincount(top[:, 0], minlength=E)
    out = []
    for a in range(E):
        for b in range(a + 1, E):
            denom = first[a] + first[b]
            if denom:
                out.append(((pair[a, b] + pair[b, a]) / denom, a, b))
    return sorted(out, reverse=True)


def optimize_routing(
    router: Router,
    val_queries: Any,
    top_experts_searched: int = 2,
    k: int = 10,
    fine_tune: FineTune | None = None,
    rebalance: bool = True,
    merge: bool = True,
    split: bool = True,
    merge_overlap: float = 0.5,
    overload: float = 1.5,
    underload: float = 0.5,
    max_candidates: int = 3,
    tolerance: float = 0.0,
    max_scan_increase: float = 0.1,
    seed: int = 0,
) -> OptimizeReport:
    """Try to improve routing on validation queries; keep only changes that measurably help.

    Candidates, each measured on `val_queries` (recall@k of searching the top experts against an
    exhaustive search, the scanned share and the load): shifting gate biases against the load
    when experts are over `overload` or under `underload` x the average; merging pairs of experts
    that the gate confuses (for more than `merge_overlap` of the queries routed to either, the
    other is second); splitting experts loaded over `overload` x the average into 2. Merges and
    splits are fine-tuned with `fine_tune` before they are measured, when given. A candidate is
    kept only if recall drops by at most `tolerance` (default: not at all), the scanned share
    grows by at most `max_scan_increase`, and recall, cost or balance improves. The router is
    changed once, at the end, and only if something was kept.
    """
    if router.gate is None:
        raise RuntimeError("optimize_routing needs a trained gate; the router has none")
    t = router._check_top(top_experts_searched, "top_experts_searched")
    k = router._check_k(k)
    xq, _ = router.prepare_queries(val_queries)
    flat = faiss.IndexFlatIP(router.dim) if router.metric == "ip" else faiss.IndexFlatL2(router.dim)
    for e in router.experts:
        flat.add(e.vectors())
    all_ids = np.concatenate([e.ids for e in router.experts])
    _, rows = flat.search(xq, k)
    exact_ids = np.where(rows >= 0, all_ids[np.maximum(rows, 0)], -1)  # (nq, k)

    with router._lock:
        plan = _Plan(_state(router))
        start = cur = _quality(plan.state, xq, exact_ids, t)
        actions: list[OptimizeAction] = []
        touched: set[str] = set()

        def consider(kind: str, names: tuple[str, ...], candidate: _Plan, note: str) -> None:
            nonlocal plan, cur
            if fine_tune is not None and candidate.created:
                v = view(router, candidate.state)
                fine_tune(v, candidate.created)
                candidate.state.gate = v.gate
            q = _quality(candidate.state, xq, exact_ids, t)
            kept = _better(q, cur, tolerance, max_scan_increase)
            actions.append(OptimizeAction(kind, names, kept, cur, q, note))
            if kept:
                plan = _Plan(candidate.state, plan.item_moves + candidate.item_moves,
                             plan.feedback_moves + candidate.feedback_moves, plan.created + candidate.created)
                cur = q
                if kind != "rebalance":  # a bias shift does not stop experts from being merged or split
                    touched.update(names, candidate.created)

        def current_names() -> list[str]:
            return [e.name for e in plan.state.experts]

        if rebalance:
            found = _rebalanced_gate(plan.state, xq, exact_ids, t, cur, tolerance, max_scan_increase, overload, underload)
            if found is not None:
                gate, flagged = found
                consider("rebalance", flagged, _Plan(replace(plan.state, gate=gate)), "head biases shifted against the load")
        if merge and len(plan.state.experts) > 2:
            names = current_names()
            pairs = [(s, names[a], names[b]) for s, a, b in _co_routing(_probs(plan.state.gate, xq), len(names))]
            for share, a, b in [p for p in pairs if p[0] > merge_overlap][:max_candidates]:
                if {a, b} & touched or not {a, b} <= set(current_names()):
                    continue
                consider("merge", (a, b), _plan_merge(plan.state, router.store, a, b, None, None, ...),
                         f"co-routed on {100 * share:.0f}% of their queries")
        if split:
            names = current_names()
            ratio = np.bincount(top_experts(_probs(plan.state.gate, xq), t).ravel(), minlength=len(names)) / (len(xq) * t)
            ratio *= len(names)
            for j in np.argsort(-ratio, kind="stable")[:max_candidates]:
                name = names[j]
                if ratio[j] <= overload or name in touched or name not in current_names():
                    continue
                if plan.state.experts[_index(plan.state.experts, name)].ntotal < 2:
                    continue
                consider("split", (name,), _plan_split(plan.state, router.store, name, 2, None, seed, overload),
                         f"load {ratio[j]:.2f}x average")
        if any(a.kept for a in actions):
            _apply(router, plan)
    return OptimizeReport(actions, start, cur)

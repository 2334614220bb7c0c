"""How the Ray backend lays experts out on a cluster: experts an actor, CPUs an actor reserves, which node.

Plain arithmetic over the cluster's nodes (no Ray here), so the rules are tested without a cluster.
Options left to None are chosen from the nodes; options given keep their meaning and fail loudly
when the cluster cannot hold them.

Dimension legend: E experts, G actor groups (experts_per_actor experts each, the last may hold
fewer), R replicas of each group, B nodes used (one placement-group bundle each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

# An actor searches with one FAISS thread, so actors beyond the cores add processes, not
# parallelism; but about half of an actor call is the round trip and (de)serialisation (docs/scaling.md:
# c ~ 1.4 ms vs s ~ 1.7 ms a search), so two actors a core keep it busy while the other waits on its call.
ACTORS_PER_CPU = 2
# Part of each node's CPUs an automatic plan reserves: a lifecycle change starts its new actors before the
# old ones retire (copy-on-write snapshots), so a whole new generation must fit next to the old one.
SHARE = 0.5
PLACEMENTS = ("spread", "pack")  # or None: Ray places actors by resources alone
_GRAIN = 1e-4  # Ray's resource granularity: reservations are rounded down to it


@dataclass(frozen=True)
class NodeCpus:
    """A live node of the cluster and its CPUs."""

    node_id: str
    total: float
    free: float  # not reserved now

    @property
    def capacity(self) -> float:
        """CPUs an automatic plan may reserve here."""
        return min(SHARE * self.total, self.free)


@dataclass(frozen=True)
class Layout:
    """What a RayBackend starts for a set of experts, and why (`reason`, one line)."""

    experts_per_actor: int
    num_cpus: float  # CPUs each actor reserves
    replicas: int
    placement: str | None
    groups: int  # G actor groups, each held by `replicas` actors
    slots: tuple[tuple[int, ...], ...]  # (G, R): the bundle (one per node) of each replica; () without placement
    reason: str

    @property
    def bundles(self) -> int:
        """B: nodes the actors are placed on (0 without placement)."""
        return 1 + max(max(row) for row in self.slots) if self.slots else 0

    def actors_per_bundle(self) -> list[int]:
        count = [0] * self.bundles
        for row in self.slots:
            for b in row:
                count[b] += 1
        return count


def plan_layout(
    experts: int,
    nodes: Sequence[NodeCpus],
    replicas: int,
    placement: str | None,
    num_cpus: float | None = None,
    experts_per_actor: int | None = None,
) -> Layout:
    """The layout of `experts` experts on `nodes`; None options chosen from the nodes' CPUs.

    With a placement, each group's replicas are on distinct nodes: "spread" deals the actors (group by
    group, replica by replica) round-robin over the nodes with CPUs, so nodes differ by one actor at
    most; "pack" puts every group's replica r on node r (each replica set on one node).
    """
    if experts < 1:
        raise ValueError(f"a layout needs at least one expert, got {experts}")
    if placement is not None and placement not in PLACEMENTS:
        raise ValueError(f"placement must be 'spread', 'pack' or None, got {placement!r}")
    cpu_nodes = sorted((n for n in nodes if n.total > 0), key=lambda n: n.capacity, reverse=True)
    cpus = sum(n.total for n in cpu_nodes)
    if placement is not None:
        if num_cpus == 0:
            raise ValueError(
                f"placement={placement!r} reserves each actor's CPUs on its node: num_cpus must be > 0 "
                "(or placement=None)"
            )
        if len(cpu_nodes) < replicas:
            raise ValueError(
                f"placement={placement!r} puts the {replicas} replicas of each expert on distinct nodes, but the "
                f"cluster has {len(cpu_nodes)} node(s) with CPUs; lower replicas, add nodes, or use placement=None "
                "(replicas may share a node)"
            )
    why_group = "given"
    if experts_per_actor is None:
        most = max(1, math.floor(ACTORS_PER_CPU * cpus / replicas))
        why_group = f"auto: at most {ACTORS_PER_CPU} actors a CPU on {cpus:g} CPUs"
        if num_cpus:
            most = min(most, max(1, math.floor(cpus / (replicas * num_cpus) + 1e-9)))
            why_group += f" and num_cpus={num_cpus:g}"
        experts_per_actor = math.ceil(experts / most)
    groups = math.ceil(experts / experts_per_actor)
    if placement == "spread":
        used = min(len(cpu_nodes), groups * replicas)  # at least `replicas` (checked above)
        slots = tuple(tuple((g * replicas + r) % used for r in range(replicas)) for g in range(groups))
    elif placement == "pack":
        slots = tuple(tuple(range(replicas)) for _ in range(groups))
    else:
        slots = ()
    layout = Layout(experts_per_actor, 0.0, replicas, placement, groups, slots, reason="")  # CPUs to come
    actors = groups * replicas
    if num_cpus is None:
        num_cpus, why_cpus = _auto_cpus(layout, cpu_nodes)
    else:
        why_cpus = "given"
        _check_fits(layout, float(num_cpus), cpu_nodes, cpus)
    where = (
        f"placement {placement} over {layout.bundles} node(s), replicas on distinct nodes"
        if placement
        else "placed by Ray"
    )
    reason = (
        f"{experts} experts in {groups} actor group(s) of up to {experts_per_actor} ({why_group}) x {replicas} "
        f"replica(s) = {actors} actors, {num_cpus:g} CPU each ({why_cpus}); {where}"
    )
    return replace(layout, num_cpus=float(num_cpus), reason=reason)


def _auto_cpus(layout: Layout, cpu_nodes: list[NodeCpus]) -> tuple[float, str]:
    """The CPUs an actor reserves so that every node's actors fit in its capacity (at most one: one FAISS thread)."""
    if not cpu_nodes:
        raise ValueError("the Ray cluster has no CPUs for expert actors (every node was started with num_cpus=0)")
    if layout.slots:
        # Ray puts each bundle on a node of its choice; the most loaded bundle must fit the roomiest node, etc.
        counts = sorted(layout.actors_per_bundle(), reverse=True)
        room = [n.capacity for n in cpu_nodes[: len(counts)]]
        share = min(r / c for r, c in zip(room, counts))
        why = f"auto: half of each node's CPUs at most, free ones only: {room[0]:g} for a node's {counts[0]} actors"
    else:
        room_all = min(SHARE * sum(n.total for n in cpu_nodes), sum(n.free for n in cpu_nodes))
        share = room_all / (layout.groups * layout.replicas)
        why = f"auto: half of the cluster's CPUs at most, free ones only: {room_all:g} for all actors"
    share = math.floor(min(1.0, share) / _GRAIN) * _GRAIN
    if share <= 0:
        raise ValueError(
            "the Ray cluster has no free CPUs for expert actors (all reserved); free some, add nodes, or give num_cpus"
        )
    return round(share, 4), why


def _check_fits(layout: Layout, num_cpus: float, cpu_nodes: list[NodeCpus], cpus: float) -> None:
    """Refuse now a setting the cluster cannot hold, rather than wait for resources that never come."""
    need = num_cpus * layout.groups * layout.replicas
    if need > cpus + 1e-9:
        raise ValueError(
            f"the Ray backend needs {need:g} CPUs ({layout.groups} actors x {layout.replicas} replicas x "
            f"num_cpus={num_cpus:g}) but the cluster has {cpus:g}; lower num_cpus, raise "
            f"experts_per_actor or add nodes"
        )
    if layout.slots:
        demand = sorted((c * num_cpus for c in layout.actors_per_bundle()), reverse=True)
        sizes = sorted((n.total for n in cpu_nodes), reverse=True)
        for d, s in zip(demand, sizes):
            if d > s + 1e-9:
                raise ValueError(
                    f"placement={layout.placement!r} puts {d / num_cpus:g} actors x num_cpus={num_cpus:g} = {d:g} "
                    f"CPUs on one node, but the nodes have {', '.join(f'{x:g}' for x in sizes)} CPUs; lower "
                    "num_cpus, raise experts_per_actor, or add nodes"
                )

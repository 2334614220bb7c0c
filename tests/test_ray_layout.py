"""The Ray backend's layout rules (routing.backends.layout): plain arithmetic, no cluster and no Ray needed."""

from __future__ import annotations

import itertools
import math

import pytest

from moe_router.routing.backends.layout import ACTORS_PER_CPU, SHARE, Layout, NodeCpus, plan_layout


def _nodes(*cpus: float, free: list[float] | None = None) -> list[NodeCpus]:
    free = list(cpus) if free is None else free
    return [NodeCpus(f"node-{i}", c, f) for i, (c, f) in enumerate(zip(cpus, free))]


def _check(layout: Layout, experts: int, nodes: list[NodeCpus]) -> None:
    """What every layout must hold: all experts placed, replicas apart, reservations within the nodes."""
    assert layout.groups * layout.experts_per_actor >= experts > (layout.groups - 1) * layout.experts_per_actor
    assert 0 < layout.num_cpus <= 1
    if layout.slots:
        assert len(layout.slots) == layout.groups
        assert all(len(set(row)) == layout.replicas for row in layout.slots)  # replicas on distinct nodes
        assert layout.bundles <= sum(n.total > 0 for n in nodes)
        # Each bundle fits a distinct node: the fullest bundle on the roomiest node, and so on.
        need = sorted((c * layout.num_cpus for c in layout.actors_per_bundle()), reverse=True)
        room = sorted((n.capacity for n in nodes), reverse=True)
        assert all(d <= r + 1e-9 for d, r in zip(need, room))


CASES = list(
    itertools.product(
        [1, 2, 3, 6, 10, 16, 100, 10_000],  # experts
        [(2,), (1, 1), (0, 1, 1), (8, 8, 8, 8), (0.5,), (4, 1)],  # CPUs of each node (0: a head with none)
        [1, 2],  # replicas
        ["spread", "pack", None],
    )
)


@pytest.mark.parametrize(("experts", "cpus", "replicas", "placement"), CASES)
def test_auto_layout__fits_half_the_cluster_with_at_most_two_actors_a_cpu(
    experts: int, cpus: tuple[float, ...], replicas: int, placement: str | None
) -> None:
    nodes = _nodes(*cpus)
    if placement is not None and sum(c > 0 for c in cpus) < replicas:
        with pytest.raises(ValueError, match="on distinct nodes.*placement=None"):
            plan_layout(experts, nodes, replicas, placement)
        return
    layout = plan_layout(experts, nodes, replicas, placement)
    _check(layout, experts, nodes)
    actors = layout.groups * replicas
    assert actors * layout.num_cpus <= SHARE * sum(cpus) + 1e-9
    assert layout.groups <= max(1, math.floor(ACTORS_PER_CPU * sum(cpus) / replicas))
    assert layout.groups <= experts  # never an empty actor
    assert "auto" in layout.reason and f"{experts} experts" in layout.reason


def test_spread__deals_actors_evenly_and_pack_keeps_each_replica_set_on_one_node() -> None:
    spread = plan_layout(10, _nodes(0, 1, 1, 1), 2, "spread", experts_per_actor=2)  # 5 groups x 2 on 3 nodes
    counts = spread.actors_per_bundle()
    assert spread.bundles == 3 and sum(counts) == 10 and max(counts) - min(counts) <= 1
    pack = plan_layout(10, _nodes(0, 1, 1, 1), 2, "pack", experts_per_actor=2)
    assert pack.slots == ((0, 1),) * 5 and pack.actors_per_bundle() == [5, 5]
    one = plan_layout(4, _nodes(0, 1, 1), 1, "spread", experts_per_actor=1)
    assert one.slots == ((0,), (1,), (0,), (1,))


def test_two_cpus__any_number_of_experts_fits() -> None:
    """The obvious call on a 2-core machine: one node of 2 CPUs, default options."""
    for experts in (1, 3, 10, 1000, 100_000):
        layout = plan_layout(experts, _nodes(2), 1, "spread")
        assert layout.groups <= 4 and layout.groups * layout.num_cpus <= 1.0
    assert plan_layout(10, _nodes(2), 1, "spread").experts_per_actor == 3  # 4 actors, 0.25 CPU each
    assert plan_layout(10, _nodes(2), 1, "spread").num_cpus == 0.25


def test_auto_layout__reserves_only_free_cpus() -> None:
    layout = plan_layout(4, _nodes(1, 1, free=[0.2, 1.0]), 1, "spread", experts_per_actor=1)
    assert layout.num_cpus == 0.1  # two actors on the node with 0.2 free
    with pytest.raises(ValueError, match="no free CPUs"):
        plan_layout(4, _nodes(2, free=[0.0]), 1, "spread")
    with pytest.raises(ValueError, match="no CPUs for expert actors"):
        plan_layout(4, _nodes(0, 0), 1, None)


def test_given_options__keep_their_meaning_or_fail_clearly() -> None:
    layout = plan_layout(6, _nodes(2), 1, "spread", num_cpus=0.1, experts_per_actor=1)
    assert (layout.num_cpus, layout.experts_per_actor, layout.groups) == (0.1, 1, 6)
    assert plan_layout(6, _nodes(2), 1, "spread", num_cpus=1).experts_per_actor == 3  # 2 actors of 1 CPU
    assert plan_layout(6, _nodes(2), 1, "spread", experts_per_actor=6).groups == 1
    with pytest.raises(
        ValueError, match=r"needs 10 CPUs \(10 actors x 1 replicas x num_cpus=1\) but the cluster has 2"
    ):
        plan_layout(10, _nodes(2), 1, "spread", num_cpus=1, experts_per_actor=1)
    with pytest.raises(ValueError, match=r"puts 2 actors x num_cpus=0.6 = 1.2 CPUs on one node"):
        plan_layout(3, _nodes(1, 1), 1, "spread", num_cpus=0.6, experts_per_actor=1)  # 1.8 of 2 CPUs, 2 on a node
    with pytest.raises(ValueError, match="num_cpus must be > 0"):
        plan_layout(4, _nodes(2), 1, "spread", num_cpus=0)
    assert plan_layout(4, _nodes(2), 1, None, num_cpus=0, experts_per_actor=1).num_cpus == 0  # Ray places it
    with pytest.raises(ValueError, match="placement must be"):
        plan_layout(4, _nodes(2), 1, "scatter")

"""The Ray backend on several nodes: Ray's own multi-node test cluster on this machine (ray.cluster_utils.Cluster).

A head without CPUs (it runs the GCS; no actor lands there) and two worker nodes of one CPU each,
all on loopback (tests.ray_helpers). One cluster and one checkpoint per module; the node-loss test
removes a worker and adds a fresh one, so the cluster keeps its shape for whatever runs after it.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moe_router import Router
from moe_router.data.synthetic import cluster_layout, held_out_queries
from moe_router.gate import initial_gate
from moe_router.routing.backends import make_backend
from moe_router.train.build import clustered_router
from moe_router.types import SearchParams
from tests.ray_helpers import LOOPBACK, add_worker, merged_without, off_loopback, same_hits, sockets, start_cluster

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install -e '.[ray]')"
    ),
]

D, E, N = 16, 4, 800  # dim, experts, stored vectors (200 an expert)
TIMEOUT_S = 1.5  # what a search waits for an expert; the tests' searches take milliseconds
SLACK_S = 3.0  # on top of TIMEOUT_S for a search on a loaded 2-core machine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    router = clustered_router(N, D, E, seed=0)
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))  # linear gate at the centroids
    return router.save(tmp_path_factory.mktemp("ray_cluster") / "ckpt")


@pytest.fixture(scope="module")
def xq() -> np.ndarray:
    return held_out_queries(cluster_layout(D, E, seed=0), 40, seed=1)  # (40, D)


@pytest.fixture(scope="module")
def local(ckpt: Path) -> Router:
    return Router.load(ckpt)


@pytest.fixture(scope="module")
def cluster():
    import ray

    cluster = start_cluster(head_cpus=0, worker_cpus=[1, 1])
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def spread1(ckpt: Path, cluster) -> Router:
    """One expert an actor, one replica each, dealt over the two workers (0.1 CPU each: room for the other tests)."""
    return Router.load(ckpt, backend=make_backend("ray", num_cpus=0.1, experts_per_actor=1, timeout_s=TIMEOUT_S))


@pytest.fixture(scope="module")
def spread2(ckpt: Path, cluster) -> Router:
    """Two experts an actor, two replicas on distinct workers."""
    backend = make_backend("ray", num_cpus=0.1, experts_per_actor=2, replicas=2, timeout_s=TIMEOUT_S)
    return Router.load(ckpt, backend=backend)


def _free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


@pytest.fixture(autouse=True)
def _gives_back_what_it_reserves(cluster):
    """A test's own routers, once dropped, leave the cluster's CPUs as they found them (placement groups removed)."""
    free = _free_cpus()
    yield
    gc.collect()
    deadline = time.monotonic() + 30
    while _free_cpus() < free - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free_cpus() >= free - 1e-6


def _workers(cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


def test_cluster__every_node_and_socket_on_loopback(cluster) -> None:
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {LOOPBACK}
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    names = Counter(name for name, kind, _, remote in sockets(os.getpid()) if remote[1] == 0)  # listeners
    assert names["raylet"] >= 3 and names["gcs_server"] >= 1  # the check sees all three nodes' processes
    assert off_loopback(os.getpid()) == []


def test_spread__groups_dealt_over_the_workers_and_replicas_on_distinct_nodes(
    ckpt: Path, spread1: Router, spread2: Router, local: Router, cluster, xq: np.ndarray
) -> None:
    workers = _workers(cluster)
    on = Counter(e.nodes[0] for e in spread1.experts)
    assert set(on) == workers and sorted(on.values()) == [2, 2]  # four actors, two a worker, none on the head
    for e in spread2.experts:
        assert len(set(e.nodes)) == 2 and set(e.nodes) == workers
    assert len({id(e.group) for e in spread2.experts}) == 2
    for router in (spread1, spread2):
        same_hits(local.search(xq, k=5, top_experts=2), router.search(xq, k=5, top_experts=2))
    with pytest.raises(ValueError, match="puts the 3 replicas of each expert on distinct nodes.*2 node"):
        Router.load(ckpt, backend=make_backend("ray", replicas=3))  # refused before anything starts


def test_pack__each_replica_set_on_one_node_with_default_sizes(
    ckpt: Path, local: Router, cluster, xq: np.ndarray
) -> None:
    one = Router.load(ckpt, backend=make_backend("ray", placement="pack", timeout_s=TIMEOUT_S))
    assert "auto" in one.backend.plan.reason and len({e.nodes[0] for e in one.experts}) == 1
    same_hits(local.search(xq, k=5, top_experts=2), one.search(xq, k=5, top_experts=2))
    del one
    two = Router.load(ckpt, backend=make_backend("ray", placement="pack", replicas=2, timeout_s=TIMEOUT_S))
    sets = {tuple(e.nodes) for e in two.experts}
    assert len(sets) == 1 and len(set(next(iter(sets)))) == 2  # replica r of every group on node r
    same_hits(local.search(xq, k=5, top_experts=2), two.search(xq, k=5, top_experts=2))


def test_routed_search__contacts_only_the_nodes_holding_its_chosen_experts(
    spread1: Router, local: Router, xq: np.ndarray
) -> None:
    backend = spread1.backend
    node_of = {e.name: e.nodes[0] for e in spread1.experts}
    seen = Counter()
    for top in (1, 2, E):
        for q in xq[:12]:
            chosen = local.select(q[None], SearchParams(top_experts=top), record=False).top[0]
            before = Counter(backend.calls_by_node)
            same_hits([local.search(q, k=5, top_experts=top)], [spread1.search(q, k=5, top_experts=top)])
            contacted = Counter(backend.calls_by_node) - before
            assert contacted == Counter(node_of[local.experts[e].name] for e in chosen)  # one call an expert
            seen[(top, len(contacted))] += 1
    assert seen[(1, 1)] == 12 and seen[(E, 2)] == 12  # top-1 reaches one node, broadcast both
    before = Counter(backend.calls_by_node)  # a batch: one call per chosen actor, on its node
    top = local.select(xq, SearchParams(top_experts=2), record=False).top
    spread1.search(xq, k=5, top_experts=2)
    assert Counter(backend.calls_by_node) - before == Counter(node_of[local.experts[e].name] for e in np.unique(top))


def test_node_removed_mid_stream__replicas_keep_answers_whole_others_partial_and_named_then_back(
    spread1: Router, spread2: Router, local: Router, cluster, xq: np.ndarray
) -> None:
    """remove_node during a stream of searches, then add_node: Ray restarts the lost actors on the new node."""
    dead = spread1.experts[0].nodes[0]
    victim = next(node for node in cluster.worker_nodes if node.node_id == dead)
    lost = {i for i, e in enumerate(spread1.experts) if e.nodes[0] == dead}  # spread1's experts on it
    top = local.select(xq, SearchParams(top_experts=2), record=False).top  # (nq, 2)
    complete = local.search(xq, k=5, top_experts=2)
    names = np.array(spread1.expert_names)
    stream: list[tuple[str, float, float, list]] = []  # (router, start, end, hits)
    errors: list[BaseException] = []
    stop = threading.Event()

    def search_forever() -> None:
        try:
            while not stop.is_set():
                for label, router in (("spread1", spread1), ("spread2", spread2)):
                    start = time.monotonic()
                    hits = router.search(xq, k=5, top_experts=2)
                    stream.append((label, start, time.monotonic(), hits))
                time.sleep(0.02)
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    reader = threading.Thread(target=search_forever)
    reader.start()
    try:
        while len(stream) < 4:
            time.sleep(0.05)
        cluster.remove_node(victim)
        removed = time.monotonic()
        while len([s for s in stream if s[1] > removed]) < 10:  # searches with the node gone
            time.sleep(0.05)
        adding, before = time.monotonic(), _workers(cluster)
        add_worker(cluster, 1)
        added, new = time.monotonic(), _workers(cluster) - before
        deadline = added + 60
        while time.monotonic() < deadline and not errors:
            last = [s for s in stream if s[0] == "spread1" and s[1] > added]
            if (
                last
                and all(h.missing_experts == () for h in last[-1][3])
                and not any(e.group.suspects for r in (spread1, spread2) for e in r.experts)
            ):
                break
            time.sleep(0.05)
        recovered = time.monotonic()
    finally:
        stop.set()
        reader.join(60)
    assert not errors, errors
    assert max(end - start for _, start, end, _ in stream) < TIMEOUT_S + SLACK_S  # never a hang
    # The live replica was asked after half the wait (a hedge) and answered: before the deadline.
    assert max(end - start for label, start, end, _ in stream if label == "spread2") < TIMEOUT_S
    for label, start, _, hits in stream:
        if label == "spread2":  # a replica survived every group: whole answers throughout
            same_hits(complete, hits)
            continue
        missing = np.array([[names[e] in h.missing_experts for e in row] for row, h in zip(top, hits)])  # (nq, 2)
        assert all(set(h.missing_experts) <= {names[e] for e in lost} for h in hits)  # only the dead node's
        assert [[(x.id, x.expert) for x in h] for h in hits] == merged_without(local, xq, 5, top, missing)
        if removed < start and start < adding:  # the node down: every query that chose its experts names them
            assert (missing == np.isin(top, list(lost))).all()
    down = [s for s in stream if s[0] == "spread1" and removed < s[1] < adding]
    assert down and np.isin(top, list(lost)).any()
    assert recovered < deadline, "the lost actors did not come back on the new node"
    assert {spread1.experts[i].nodes[0] for i in lost} == new  # restarted on the added node
    for e in spread2.experts:
        assert len(set(e.nodes)) == 2 and set(e.nodes) <= _workers(cluster)
    same_hits(complete, spread1.search(xq, k=5, top_experts=2))
    same_hits(complete, spread2.search(xq, k=5, top_experts=2))

"""The Ray backend: experts in Ray actors on a local 2-CPU cluster, checked against the local backend.

One cluster and one checkpoint per module (starting actors costs seconds on a shared machine). The
cluster binds loopback only (tests.ray_helpers); tests/test_ray_cluster.py covers several nodes.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moe_router import CheckpointError, Router
from moe_router.cli import main as cli_main
from moe_router.data.synthetic import cluster_layout, held_out_queries
from moe_router.gate import initial_gate
from moe_router.lifecycle.merge_split import merge_experts, split_expert
from moe_router.routing.backends import make_backend
from moe_router.serving import BatchConfig
from moe_router.serving.app import create_app
from moe_router.serving.state import RouterState
from moe_router.train.build import clustered_router
from moe_router.types import SearchParams
from tests.helpers import version_path
from tests.ray_helpers import LOOPBACK, merged_without, off_loopback, same_hits, sockets, start_local

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed (pip install -e '.[ray]')")

D, E, N = 32, 6, 6_000  # dim, experts, stored vectors (1,000 an expert)


def _make_checkpoint(path: Path) -> Path:
    layout = cluster_layout(D, E, seed=0)
    router = clustered_router(N, D, E, seed=0, layout=layout)
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))  # linear gate at the centroids
    return router.save(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("ray") / "ckpt")


@pytest.fixture(scope="module")
def xq() -> np.ndarray:
    return held_out_queries(cluster_layout(D, E, seed=0), 400, seed=1)  # (400, D)


@pytest.fixture(scope="module")
def cluster():
    ray = start_local(num_cpus=2)  # only the Ray tests import Ray: the module must import without it
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def backend(cluster):
    # One expert an actor, 0.1 CPU each: six experts (and the lifecycle's new ones) share the two cores.
    return make_backend("ray", num_cpus=0.1, experts_per_actor=1, max_restarts=3, timeout_s=20.0)


@pytest.fixture(scope="module")
def ray_router(ckpt: Path, backend) -> Router:
    return Router.load(ckpt, backend=backend)


@pytest.fixture(scope="module")
def served(ckpt: Path, cluster, tmp_path_factory: pytest.TempPathFactory) -> RouterState:
    """A served copy of the checkpoint, three experts an actor (changed by the lifecycle test, read by the HTTP one)."""
    grouped = make_backend("ray", num_cpus=0.1, experts_per_actor=3, timeout_s=20.0)
    state = RouterState(shutil.copytree(ckpt, tmp_path_factory.mktemp("served") / "ckpt"), backend=grouped)
    yield state
    state.close()


STEPS = [
    lambda r: merge_experts(r, "shard-00", "shard-01"),
    lambda r: split_expert(r, "shard-02", 2),
    lambda r: r.remove_expert("shard-03"),
]  # the lifecycle test's changes, in order


@pytest.mark.ray
@needs_ray
@pytest.mark.parametrize("top", [1, 2, 3])
def test_ray_route_and_search__equal_local_backend(ckpt: Path, ray_router: Router, xq: np.ndarray, top: int) -> None:
    local = Router.load(ckpt)
    assert local.route(xq, top_experts=top) == ray_router.route(xq, top_experts=top)
    ray_hits = ray_router.search(xq, k=10, top_experts=top)
    same_hits(local.search(xq, k=10, top_experts=top), ray_hits)
    assert all(h.missing_experts == () for h in ray_hits)
    same_hits(
        local.search(xq[:50], k=5, top_experts=top, per_expert=True),
        ray_router.search(xq[:50], k=5, top_experts=top, per_expert=True),
    )
    for q in xq[:5]:  # batch 1, as a server without micro-batching sends it
        same_hits([local.search(q, k=10, top_experts=top)], [ray_router.search(q, k=10, top_experts=top)])


@pytest.mark.ray
@needs_ray
def test_ray_router__holds_no_vectors_in_this_process(ray_router: Router, cluster) -> None:
    from moe_router.routing.backends.ray import RemoteExpert  # imports Ray

    assert all(isinstance(e, RemoteExpert) for e in ray_router.experts)
    pids = cluster.get([e.replicas[0].pid.remote() for e in ray_router.experts])
    assert os.getpid() not in pids and len(set(pids)) == E  # one actor process per expert
    assert ray_router.ntotal == N
    moved = ray_router.experts[0].with_spec(ray_router.experts[0].spec.with_parent("group"))
    assert moved.replicas is ray_router.experts[0].replicas and moved.parent == "group"  # no new actor


def _oracle_generations(ckpt: Path, steps) -> list[Router]:
    """Local routers after each of `steps` (the same changes the served Ray router gets)."""
    router = Router.load(ckpt)
    out = [router]
    for step in steps:
        router = router.fork(private_store=True)
        step(router)
        out.append(router)
    return out


@pytest.mark.ray
@needs_ray
def test_lifecycle_on_cluster__each_search_sees_the_old_or_the_new_experts(
    ckpt: Path, served: RouterState, xq: np.ndarray
) -> None:
    state = served
    oracles = _oracle_generations(ckpt, STEPS)
    expected = [o.search(xq[:40], k=10, top_experts=2) for o in oracles]
    with state.lease() as snap:  # six experts in two actors: a search over all of them is two calls
        before = snap.router.backend.calls
        same_hits(oracles[0].search(xq, k=10, top_experts=E), snap.router.search(xq, k=10, top_experts=E))
        assert snap.router.backend.calls - before == 2
    seen: list[tuple[int, list]] = []
    stop = threading.Event()

    def search_forever() -> None:
        while not stop.is_set():
            with state.lease() as snap:
                seen.append((snap.generation, snap.router.search(xq[:40], k=10, top_experts=2)))

    reader = threading.Thread(target=search_forever)
    reader.start()
    try:
        state.merge_experts("shard-00", "shard-01")
        state.split_expert("shard-02", 2)
        state.remove_expert("shard-03")
        time.sleep(0.2)
    finally:
        stop.set()
        reader.join(60)
    assert state.generation == 3
    assert {g for g, _ in seen} >= {0, 3}  # searches ran before and after the changes
    for generation, hits in seen:  # each search answered exactly as one whole expert set does
        same_hits(expected[generation], hits)
    with state.lease() as snap:
        assert snap.router.expert_names == oracles[-1].expert_names
        assert all(h.missing_experts == () for h in snap.router.search(xq, k=10, top_experts=2))
    reloaded = Router.load(state.ckpt)  # the cluster's changes were saved: a local load answers the same
    same_hits(expected[-1], reloaded.search(xq[:40], k=10, top_experts=2))


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.ray
@needs_ray
def test_hung_then_killed_expert_actor__search_returns_the_others_names_it_and_recovers(
    ckpt: Path, ray_router: Router, xq: np.ndarray, cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An actor that stops answering is left out at once after one timeout; killed, it comes back as a new process.

    The actor's process is stopped (SIGSTOP, checked in /proc before the searches start) rather than
    ray.kill-ed: a kill takes effect later and a restart may beat the timeout, so the outage would not
    be seen for sure. The stopped process is then killed and Ray restarts it (max_restarts).
    """
    timeout = 3.0  # well above one search's own time on a busy 2-core machine (up to ~1 s seen), so a wait shows
    monkeypatch.setattr(ray_router.backend, "timeout_s", timeout)
    local = Router.load(ckpt)
    victim = ray_router.expert("shard-04")
    old_pid = cluster.get(victim.replicas[0].pid.remote())
    top = local.select(xq, SearchParams(top_experts=2), record=False).top  # (nq, 2) the experts each query is sent to
    chose = (top == 4).any(axis=1)
    complete = local.search(xq, k=10, top_experts=2)
    partial = merged_without(local, xq, 10, top, drop=top == 4)

    def search() -> str:
        start = time.monotonic()
        hits = ray_router.search(xq, k=10, top_experts=2)
        assert time.monotonic() - start < timeout + 5  # bounded: never waits on the dead actor
        if {h.missing_experts for h in hits} == {()}:
            same_hits(complete, hits)
            return "complete"
        # Down: every query that chose shard-04 names it and gets the other expert's hits; the rest are whole.
        for q, h in enumerate(hits):
            assert h.missing_experts == (("shard-04",) if chose[q] else ())
            assert [(x.id, x.expert) for x in h] == partial[q]
        return "partial"

    os.kill(old_pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while not _stopped(old_pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _stopped(old_pid)
    start = time.monotonic()
    assert search() == "partial"  # waited timeout_s for it
    assert time.monotonic() - start >= timeout
    for _ in range(3):  # left out at once until it answers a ping: no search waits timeout_s for it again
        start = time.monotonic()
        assert search() == "partial"
        assert time.monotonic() - start < timeout
    os.kill(old_pid, signal.SIGKILL)  # Ray restarts it; the ping on the dead process fails and is sent again
    outcomes = []
    deadline = time.monotonic() + 90
    while "complete" not in outcomes and time.monotonic() < deadline:
        outcomes.append(search())
        time.sleep(0.02)
    assert outcomes[-1] == "complete", outcomes  # back
    assert cluster.get(victim.replicas[0].pid.remote()) != old_pid  # a new process read the expert's files again


@pytest.mark.ray
@needs_ray
def test_http_search__names_missing_experts(ckpt: Path, served: RouterState, xq: np.ndarray, cluster) -> None:
    local = _oracle_generations(ckpt, STEPS)[-1]  # the served router after the lifecycle test
    if served.generation == 0:  # run on its own: make the lifecycle test's changes first
        served.merge_experts("shard-00", "shard-01")
        served.split_expert("shard-02", 2)
        served.remove_expert("shard-03")
    body = {"vectors": xq[:40].tolist(), "k": 5, "top_experts": 2}
    with TestClient(create_app(served, batching=BatchConfig(enabled=True))) as client:
        reply = client.post("/search", json=body).json()
        assert [r["missing_experts"] for r in reply["results"]] == [[]] * 40
        assert [[h["id"] for h in r["hits"]] for r in reply["results"]] == [
            [h.id for h in hits] for hits in local.search(xq[:40], k=5, top_experts=2)
        ]
        with served.lease() as snap:  # shard-03 (removed), shard-04 and shard-05 share an actor (experts_per_actor=3)
            group = snap.router.expert("shard-05").replicas[0]
        # Restarted after the saves renumbered the checkpoint's files: it finds its experts by content
        # and comes back without the removed one.
        old_pid = cluster.get(group.pid.remote())
        cluster.kill(group, no_restart=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            reply = client.post("/search", json=body).json()
            if all(not r["missing_experts"] for r in reply["results"]):
                break
        assert [[h["id"] for h in r["hits"]] for r in reply["results"]] == [
            [h.id for h in hits] for hits in local.search(xq[:40], k=5, top_experts=2)
        ]
        assert cluster.get(group.pid.remote()) != old_pid
        _, held = cluster.get(group.describe.remote())
        assert [key for key, *_ in held] == ["shard-04", "shard-05"]
        cluster.kill(group, no_restart=True)  # gone for good: shard-04 and shard-05 both go
        top = local.select(xq[:40], SearchParams(top_experts=2), record=False).top
        names = np.array(local.expert_names)
        reply = client.post("/search", json=body).json()
        want = [[n for n in names[row] if n in ("shard-04", "shard-05")] for row in top]
        assert any(want) and [r["missing_experts"] for r in reply["results"]] == want
        assert all(h["expert"] not in ("shard-04", "shard-05") for r in reply["results"] for h in r["hits"])


def test_backend_ray__without_ray_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    router = clustered_router(600, D, 3, seed=0)
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    path = router.save(tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "moe_router.routing.backends.ray", raising=False)
    with pytest.raises(ImportError, match=r"backend='ray' needs Ray.*pip install -e '\.\[ray\]'"):
        Router.load(path, backend="ray")
    assert cli_main(["stats", "--ckpt", str(path), "--backend", "ray"]) == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="backend must be 'local' or 'ray', got 'dask'"):
        Router.load(path, backend="dask")
    with pytest.raises(ValueError, match="ray_address is only for backend='ray'"):
        Router.load(path, ray_address="auto")
    assert Router.load(path).search(np.ones(D, np.float32), k=3) == router.search(np.ones(D, np.float32), k=3)


def test_core_import_path__never_imports_ray(tmp_path: Path) -> None:
    """Loading, searching and changing experts with the default backend never imports Ray."""
    router = clustered_router(600, D, 3, seed=0)
    router.set_gate(initial_gate(router.experts, hidden_dims=[], dropout=0.0))
    path = router.save(tmp_path / "ckpt")
    code = (
        "import sys, numpy as np; import moe_router, moe_router.lifecycle, moe_router.serving; "
        "from moe_router import Router; r = Router.load(sys.argv[1]); r.search(np.ones(32, np.float32)); "
        "from moe_router.lifecycle.merge_split import merge_experts; merge_experts(r, 'shard-00', 'shard-01'); "
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.ray
@needs_ray
def test_backend_ray_config__is_the_constructor_signature_and_instantiates(cluster) -> None:
    """configs/backend/ray.yaml names exactly RayBackend's arguments, and serve.py's backend=ray builds one."""
    from moe_router.routing.backends.ray import RayBackend  # imports Ray

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose("serve", ["ckpt=/nonexistent", "backend=ray", "backend.num_cpus=0.1"])
    params = [p for p in inspect.signature(RayBackend.__init__).parameters if p != "self"]
    assert sorted(k for k in cfg.backend if k not in ("_target_", "name")) == sorted(params)
    backend = instantiate(cfg.backend)  # joins the module's cluster (already initialised)
    assert isinstance(backend, RayBackend) and backend.num_cpus == 0.1
    assert (backend.timeout_s, backend.max_restarts) == (cfg.backend.timeout_s, cfg.backend.max_restarts)


@pytest.mark.ray
@needs_ray
def test_expert_actor_import_path__never_imports_torch() -> None:
    """What an expert actor imports (the module of its class and of its arguments) leaves torch out."""
    code = (
        "import sys; import moe_router.routing.backends.ray, moe_router.index.expert; "
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _wait_released(ray, free: float, within_s: float = 30.0) -> None:
    """Wait until the cluster's free CPUs are back to `free` (dropped routers' reservations removed)."""
    gc.collect()
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0.0) < free - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0.0) >= free - 1e-6


@pytest.mark.ray
@needs_ray
def test_default_ray_load__fits_two_cpus_says_what_it_chose_and_equals_local(
    ckpt: Path, xq: np.ndarray, cluster, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """Router.load(path, backend="ray") with no option: six experts on two CPUs (one CPU an actor would need six)."""
    free = cluster.available_resources().get("CPU", 0.0)
    with caplog.at_level(logging.INFO, logger="moe_router.routing.backends.ray"):
        router = Router.load(ckpt, backend="ray")
    plan = router.backend.plan
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ray backend: ")]
    assert chosen == [f"Ray backend: {plan.reason}"] and "auto" in plan.reason  # one line: what and why
    assert plan.groups * plan.experts_per_actor >= E and plan.groups <= 2 * 2  # at most two actors a CPU
    assert plan.groups * plan.replicas * plan.num_cpus <= 0.5 * 2  # half the cluster's CPUs, at most
    assert len({id(e.group) for e in router.experts}) == plan.groups
    assert f"num_cpus=auto:{plan.num_cpus:g}" in repr(router.backend)
    same_hits(Router.load(ckpt).search(xq, k=10, top_experts=2), router.search(xq, k=10, top_experts=2))
    del router
    _wait_released(cluster, free)  # its placement group went with it
    # The CLI's --backend ray has no option to give: it must work as it is.
    assert cli_main(["stats", "--ckpt", str(ckpt), "--backend", "ray"]) == 0
    assert "shard-05" in capsys.readouterr().out


@pytest.mark.ray
@needs_ray
def test_explicit_ray_options__keep_their_meaning_and_fail_clearly_when_they_do_not_fit(
    ckpt: Path, ray_router: Router, cluster
) -> None:
    plan = ray_router.backend.plan  # num_cpus=0.1, experts_per_actor=1 given
    assert (plan.num_cpus, plan.experts_per_actor, plan.groups) == (0.1, 1, E) and "given" in plan.reason
    with pytest.raises(ValueError, match=r"needs 6 CPUs \(6 actors x 1 replicas x num_cpus=1\) but the cluster has 2"):
        Router.load(ckpt, backend=make_backend("ray", num_cpus=1, experts_per_actor=1))
    with pytest.raises(ValueError, match=r"placement='spread' puts the 2 replicas of each expert on distinct nodes"):
        Router.load(ckpt, backend=make_backend("ray", replicas=2))  # one node
    with pytest.raises(ValueError, match=r"needs 3 CPUs \(1 actors x 1 replicas x num_cpus=3\)"):
        Router.load(ckpt, backend=make_backend("ray", num_cpus=3))  # even one actor of all experts does not fit


@pytest.mark.ray
@needs_ray
def test_local_cluster__binds_loopback_only(ray_router: Router, cluster) -> None:
    """Every node, listener and connection of the test cluster is on 127.0.0.1 (the machine has another address)."""
    assert {n["NodeManagerAddress"] for n in cluster.nodes()} == {LOOPBACK}
    names = {name for name, *_ in sockets(os.getpid())}
    assert {"gcs_server", "raylet"} <= names  # the check sees the cluster's own processes
    assert off_loopback(os.getpid()) == []


@pytest.mark.ray
@needs_ray
def test_replicas__a_dead_replica_fails_over_and_a_removed_expert_retires_its_actors(cluster, tmp_path: Path) -> None:
    small = clustered_router(900, D, 3, seed=0)
    small.set_gate(initial_gate(small.experts, hidden_dims=[], dropout=0.0))
    path = small.save(tmp_path / "small")
    router = Router.load(
        path, backend=make_backend("ray", num_cpus=0.1, replicas=2, experts_per_actor=1, placement=None, timeout_s=20.0)
    )
    ours = {a._actor_id.hex() for e in router.experts for a in e.replicas}  # 3 experts x 2 replicas

    def alive() -> int:  # of this router's actors (GCS actor table)
        return sum(a["State"] == "ALIVE" for i, a in cluster._private.state.actors().items() if i in ours)

    assert len(ours) == 6 and alive() == 6
    queries = held_out_queries(cluster_layout(D, 3, seed=0), 60, seed=2)
    want = Router.load(path).search(queries, k=5, top_experts=3)
    cluster.kill(router.expert("shard-01").replicas[0], no_restart=True)
    for _ in range(4):  # round-robin reaches the dead replica: the call goes to the other one
        hits = router.search(queries, k=5, top_experts=3)
        same_hits(want, hits)
        assert all(h.missing_experts == () for h in hits)
    fork = router.fork()
    fork.remove_expert("shard-02")
    del router, hits
    gc.collect()  # the fork holds the other experts' handles; nothing holds shard-02's any more
    deadline = time.monotonic() + 30
    while alive() != 3 and time.monotonic() < deadline:  # shard-00's two, shard-01's live one
        time.sleep(0.2)
    assert alive() == 3
    assert fork.expert_names == ["shard-00", "shard-01"]


@pytest.mark.ray
@needs_ray
def test_corrupted_expert_file__ray_load_fails_like_a_local_load(cluster, tmp_path: Path) -> None:
    small = clustered_router(900, D, 3, seed=0)
    small.set_gate(initial_gate(small.experts, hidden_dims=[], dropout=0.0))
    path = small.save(tmp_path / "bad")
    with open(version_path(path) / "experts" / "0001.npy", "r+b") as f:  # flip bytes inside the vectors
        f.seek(300)
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(CheckpointError) as local:
        Router.load(path)
    with pytest.raises(CheckpointError) as remote:
        Router.load(path, backend=make_backend("ray", num_cpus=0.1))
    assert str(remote.value) == str(local.value) and "experts/0001.npy is corrupted" in str(local.value)

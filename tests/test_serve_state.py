"""The served state: routing counts survive expert changes and graceful shutdowns; failed saves are 503s.

Every failure here is real: a file size limit on the server process (writes fail with EFBIG, as on a
full disk), a CURRENT pointer the writer refuses, SIGTERM and SIGKILL sent to a scripts/serve.py process.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from moe_router import Router
from moe_router.checkpoint.format import POINTER, current_version
from moe_router.serving import BatchConfig, RouterState, create_app
from moe_router.types import ExpertSpec
from tests.test_serve import CHURN_WORDS, TOPICS, build_checkpoint, live_server, topic_texts
from tests.test_serve_faults import REPO, free_port
from tests.test_serve_faults import build_checkpoint as small_checkpoint

QUIET_HYDRA = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def routed(router: Router) -> dict[str, int]:
    return {s.name: s.queries for s in router.stats()}


def serve_process(ckpt: Path, run_dir: Path, file_limit: int | None = None) -> tuple[subprocess.Popen, str]:
    """scripts/serve.py on a free port, optionally with RLIMIT_FSIZE (SIGXFSZ ignored: writes fail with EFBIG)."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "serve.py"),
            f"ckpt={ckpt}",
            f"port={port}",
            "log_level=warning",
            f"hydra.run.dir={run_dir}",
            *QUIET_HYDRA,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=limit_files if file_limit is not None else None,
        env={k: v for k, v in os.environ.items() if k != "MOE_ROUTER_API_KEY"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


def route_calls(url: str, count: int) -> dict[str, int]:
    """`count` POST /route of one query each (top_experts=1); how often each expert was chosen."""
    chosen: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(count):
            r = http.post("/route", json={"text": f"alpha{i % 8} beta{i % 5} query {i}", "top_experts": 1})
            assert r.status_code == 200, r.text
            name = r.json()["results"][0]["experts"][0]["expert"]
            chosen[name] = chosen.get(name, 0) + 1
    return chosen


# ---------------------------------------------------------------- counts across copy-on-write swaps


def test_queries_routed_during_expert_changes__are_all_counted_after_the_swaps(tmp_path):
    """Clients route while an expert is added and removed six times: every choice they were told of is counted.

    An expert change forks the router and saves the fork for a while; before the fix the counts
    recorded meanwhile on the old snapshot were dropped at the swap (1,743 of 2,000 under churn).
    The churned expert's own counts go with it when it is removed, so only the others are compared.
    """
    ckpt = build_checkpoint(tmp_path / "ckpt")
    churn = topic_texts(CHURN_WORDS, 20, seed=7)
    probes = [*topic_texts(" ".join(TOPICS.values()), 30, seed=3), *churn[:3]]
    state = RouterState(ckpt)
    chosen: dict[str, int] = {}
    lock, stop, errors = threading.Lock(), threading.Event(), []

    def client(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            i = seed
            while not stop.is_set():
                batch = [probes[(i + j) % len(probes)] for j in range(3)]
                i += 3
                r = http.post("/route", json={"texts": batch, "top_experts": 2})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                with lock:
                    for row in r.json()["results"]:
                        for s in row["experts"]:
                            chosen[s["expert"]] = chosen.get(s["expert"], 0) + 1

    with live_server(create_app(state, batching=BatchConfig(max_wait_ms=0.5))) as url:
        threads = [threading.Thread(target=client, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(6):
                assert http.post("/experts", json={"name": "rust", "texts": churn}).status_code == 201
                assert http.delete("/experts/rust").status_code == 200
        stop.set()
        for t in threads:
            t.join(30)
        served = {s["name"]: s["queries"] for s in httpx.get(f"{url}/stats").json()["experts"]}
    state.close()
    assert not errors, errors[:3]
    assert sum(chosen.values()) > 200, "too few queries routed to overlap the changes"
    assert served == {name: chosen.get(name, 0) for name in TOPICS}  # exact, expert by expert
    # the counts reach the disk with the next save: here the graceful shutdown's flush
    assert routed(Router.load(ckpt)) == served


def test_carried_counts__reach_the_disk_with_the_next_save(ckpt_small):
    """A change saves the fork's counts (those of its fork time); what the old snapshot counted after is
    carried into the new one in memory when its last lease ends, and saved by the next save (a feedback row's)."""
    state = RouterState(ckpt_small)
    with state.lease() as snap:
        name = snap.router.route("alpha1 alpha2", top_experts=1)[0].expert  # counted before the fork
    with state.lease() as old:  # a reader holding the old snapshot across the whole change
        state.add_expert(ExpertSpec("delta"), texts=["delta one", "delta two"])
        old.router.route(["alpha1 alpha2", "alpha1 alpha2"], top_experts=1)  # on the old snapshot, after the fork
        with state.lease() as new:
            assert routed(new.router)[name] == 1  # not carried yet: the old snapshot is still leased
    on_disk = routed(Router.load(ckpt_small))
    assert on_disk[name] == 1 and on_disk["delta"] == 0  # the change saved its fork's counts
    with state.lease() as snap:
        assert routed(snap.router)[name] == 3 and snap.generation == 1
    state.record_feedback("alpha1", "alpha", True)
    assert routed(Router.load(ckpt_small))[name] == 3
    state.close()


@pytest.fixture
def ckpt_small(tmp_path: Path) -> Path:
    return small_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------- graceful shutdown and kill -9


def test_sigterm__saves_the_routing_counts_of_the_searches_served(ckpt_small, tmp_path):
    before = current_version(ckpt_small)
    proc, url = serve_process(ckpt_small, tmp_path / "run")
    try:
        chosen = route_calls(url, 37)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert current_version(ckpt_small) == before + 1  # one stats-only save, at the lifespan's end
    counts = routed(Router.load(ckpt_small))
    assert sum(counts.values()) == 37 and all(counts[n] == c for n, c in chosen.items())


def test_sigterm_without_searches__saves_nothing(ckpt_small, tmp_path):
    before = current_version(ckpt_small)
    proc, url = serve_process(ckpt_small, tmp_path / "run")
    assert httpx.get(f"{url}/experts").status_code == 200
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert current_version(ckpt_small) == before


def test_kill_9__loses_only_the_counts_after_the_last_save(ckpt_small, tmp_path):
    proc, url = serve_process(ckpt_small, tmp_path / "run")
    try:
        chosen = route_calls(url, 23)
        r = httpx.post(f"{url}/feedback", json={"text": "alpha1", "expert": "alpha", "positive": True})
        assert r.status_code == 200  # its save holds the 23 queries' counts
        route_calls(url, 11)  # counted in memory only
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    router = Router.load(ckpt_small)
    assert routed(router) == {n: chosen.get(n, 0) for n in ("alpha", "beta", "gamma")}
    assert [f.expert for f in router.feedback()] == ["alpha"]


# ---------------------------------------------------------------- failed saves


WRITES = [
    ("POST", "/feedback", {"text": "alpha0 alpha1", "expert": "alpha", "positive": True}),
    ("POST", "/experts", {"name": "delta", "texts": ["delta one", "delta two"]}),
    ("DELETE", "/experts/gamma", None),
    ("POST", "/merge", {"a": "alpha", "b": "beta"}),
    ("POST", "/split", {"name": "gamma"}),
]


@pytest.mark.parametrize("file_limit", [1024, 8192], ids=["gate-too-large", "store-too-large"])
def test_full_disk__every_write_is_503_and_nothing_changes(ckpt_small, tmp_path, file_limit):
    """The server runs under a file size limit: its saves fail with EFBIG (1 KiB: at the gate file;
    8 KiB: at the store) as on a full disk. Each write answers 503 with an error body on the same
    keep-alive connection, searches go on, and the checkpoint on disk loads as it was."""
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt_small, pristine)
    before = current_version(ckpt_small)
    proc, url = serve_process(ckpt_small, tmp_path / "run", file_limit=file_limit)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            for method, path, body in WRITES:
                r = http.request(method, path, json=body)
                assert r.status_code == 503, (path, r.status_code, r.text)
                assert "File too large" in r.json()["error"] or "written" in r.json()["error"], r.text
                assert r.json()["detail"] is None and r.headers.get("connection") != "close"
                assert http.post("/search", json={"text": "alpha1", "k": 3}).status_code == 200
            listed = http.get("/experts").json()
            assert listed["generation"] == 0 and [e["name"] for e in listed["experts"]] == ["alpha", "beta", "gamma"]
            assert http.get("/ready").status_code == 200  # nothing was committed: writes stay on
    finally:
        proc.send_signal(signal.SIGTERM)  # its flush fails too, and is only logged
        proc.wait(60)
    assert current_version(ckpt_small) == before
    assert not [p.name for p in (ckpt_small / "versions").iterdir() if p.name.startswith(".tmp-")]
    loaded, expected = Router.load(ckpt_small), Router.load(pristine)
    assert loaded.expert_names == expected.expert_names and loaded.feedback() == []
    assert routed(loaded) == routed(expected)
    q = ["alpha1 alpha2", "gamma3"]
    assert [[h.id for h in row] for row in loaded.search(q, k=5)] == [
        [h.id for h in row] for row in expected.search(q, k=5)
    ]


def test_save_refused_by_the_writer__is_503_not_422(ckpt_small):
    """The writer's own CheckpointError is a ValueError: it used to answer 422, as if the request were wrong."""
    state = RouterState(ckpt_small)
    pointer = ckpt_small / POINTER
    saved = pointer.read_bytes()
    with TestClient(create_app(state)) as c:
        pointer.unlink()
        pointer.mkdir()  # the writer refuses a directory without a valid CURRENT file
        for method, path, body in WRITES:
            r = c.request(method, path, json=body)
            assert r.status_code == 503 and "refusing to save" in r.json()["error"], (path, r.text)
        pointer.rmdir()
        pointer.write_bytes(saved)
        assert c.post("/feedback", json=WRITES[0][2]).status_code == 200  # writes were not turned off
    state.close()
    assert [f.expert for f in Router.load(ckpt_small).feedback()] == ["alpha"]


def test_a_key_error_inside_a_change__is_a_500_not_a_404(ckpt_small, monkeypatch):
    """Only an unknown expert named by the request is a 404; a KeyError from a bug used to read as one too."""

    def broken(router, name, parts, names):  # a bug deep in a change: some lookup fails
        raise KeyError("internal table")

    monkeypatch.setattr("moe_router.serving.state.split_expert", broken)
    state = RouterState(ckpt_small)
    with TestClient(create_app(state), raise_server_exceptions=False) as c:
        r = c.post("/split", json={"name": "gamma"})
        assert r.status_code == 500 and r.json()["error"] == "internal server error"
        r = c.post("/split", json={"name": "nope"})
        assert r.status_code == 404 and "unknown expert 'nope'" in r.json()["error"]
        assert c.get("/experts").json()["generation"] == 0
    state.close()

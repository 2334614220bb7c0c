"""Faults: SIGKILL mid-stream loses no acknowledged write; corrupted checkpoints end in clear errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from moe_router import CheckpointError, HashingEmbedder, Router
from moe_router.gate import initial_gate
from tests.helpers import read_manifest, version_path, write_manifest

REPO = Path(__file__).resolve().parents[1]
DIM = 32


def build_checkpoint(path: Path) -> Path:
    router = Router(DIM, "ip", embedder=HashingEmbedder(DIM, seed=0))
    rng = np.random.default_rng(0)
    for name in ("alpha", "beta", "gamma"):
        words = [f"{name}{i}" for i in range(8)]
        router.add_expert(name, texts=[" ".join(rng.choice(words, 3)) + f" {i}" for i in range(20)])
    router.set_gate(initial_gate(router.experts, hidden_dims=[16], dropout=0.0))
    return router.save(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, run_dir: Path) -> tuple[subprocess.Popen, str]:
    """scripts/serve.py as a real subprocess on a free loopback port; returns once /ready answers."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "serve.py"),
            f"ckpt={ckpt}",
            f"port={port}",
            "log_level=warning",
            f"hydra.run.dir={run_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
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


@pytest.mark.slow
def test_sigkill_mid_stream__every_acknowledged_write_survives(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt")
    acked_feedback: dict[int, tuple[str, str, bool]] = {}
    expert_state: dict[str, bool] = {}  # name -> present, after its last acknowledged change
    in_doubt: set[str] = set()  # a change was sent but not acknowledged before the kill
    for round_ in range(2):
        proc, url = start_server(ckpt, tmp_path / f"run{round_}")
        stop = threading.Event()
        expert_ops = [0]
        errors: list[str] = []

        def feedback_stream(worker: int, url: str = url, round_: int = round_, stop: threading.Event = stop) -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                i = 0
                while not stop.is_set():
                    text, expert, positive = (
                        f"round {round_} worker {worker} query {i}",
                        ("alpha", "beta")[i % 2],
                        i % 3 == 0,
                    )
                    try:
                        r = http.post("/feedback", json={"text": text, "expert": expert, "positive": positive})
                    except httpx.TransportError:
                        return
                    if r.status_code == 200:
                        acked_feedback[r.json()["id"]] = (text, expert, positive)
                    i += 1

        def expert_stream(
            url: str = url,
            round_: int = round_,
            stop: threading.Event = stop,
            errors: list = errors,
            ops: list = expert_ops,
        ) -> None:
            """Add r{round}x{i}; remove it again when i is even (so some experts stay)."""
            with httpx.Client(base_url=url, timeout=30) as http:
                for i in range(10_000):
                    name = f"r{round_}x{i}"
                    for adding in (True, False) if i % 2 == 0 else (True,):
                        if stop.is_set():
                            return
                        in_doubt.add(name)
                        try:
                            if adding:
                                r = http.post(
                                    "/experts", json={"name": name, "texts": [f"{name} topic {j}" for j in range(5)]}
                                )
                            else:
                                r = http.delete(f"/experts/{name}")
                        except httpx.TransportError:
                            return
                        if r.status_code not in (200, 201):
                            errors.append(r.text)
                            return
                        expert_state[name] = adding
                        in_doubt.discard(name)
                        ops[0] += 1

        threads = [threading.Thread(target=feedback_stream, args=(w,)) for w in range(2)]
        threads.append(threading.Thread(target=expert_stream))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while (expert_ops[0] < 5 or len(acked_feedback) < 20 * (round_ + 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.13 * (round_ + 1))  # land the kill at a different point of the stream each round
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was on disk counts
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert expert_ops[0] >= 5 and len(acked_feedback) >= 20 * (round_ + 1)

        proc, url = start_server(
            ckpt, tmp_path / f"run{round_}-restart"
        )  # loads (and if need be recovers) the checkpoint
        try:
            names = {e["name"] for e in httpx.get(f"{url}/experts").json()["experts"]}
            assert {"alpha", "beta", "gamma"} <= names
            for name, present in expert_state.items():
                if name not in in_doubt:
                    assert (name in names) == present, f"acknowledged change of {name!r} lost"
            for name in in_doubt:  # its change was not acknowledged: either state, but settle it for the next round
                expert_state[name] = name in names
            in_doubt.clear()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    router = Router.load(ckpt)  # loads and verifies every file
    stored = {r.seq: (r.query, r.expert, r.positive) for r in router.parts().store.feedback(include_removed=True)}
    missing = {i: v for i, v in acked_feedback.items() if stored.get(i) != v}
    assert not missing, f"{len(missing)} acknowledged feedback rows lost, e.g. {list(missing.items())[:3]}"
    assert router.expert_names[:3] == ["alpha", "beta", "gamma"]


@pytest.mark.slow
def test_checkpoint_fuzz__small_run_ends_in_clear_errors(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fuzz_checkpoint.py"),
            "--per-file",
            "12",
            "--json-cases",
            "40",
            "--seed",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    # CURRENT, manifest, gate, store and the first expert's two files; FIFOs, links and directories
    # in place of each file and directory; the intact checkpoint made read-only.
    assert report["case_kinds"] == {"bytes": 6 * 12, "json": 40, "special": 42, "read_only": 1}
    failures = report["failures"]
    assert not [f for f in failures if f["outcome"].startswith(("crash", "hang"))], failures
    # Any failure is a way for Router.load to end without a clear error.
    assert not failures, failures
    assert proc.returncode == 0


def test_load__mangled_npy_header__is_a_checkpoint_error(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt")
    ids = version_path(ckpt) / "experts" / "0000.ids.npy"
    ids.write_bytes(ids.read_bytes().replace(b"'shape': (20,)", b"'shape': (20, "))
    with pytest.raises(CheckpointError):
        Router.load(ckpt, verify=False)


@pytest.mark.parametrize("forged", [{"members": 10**12}, {"hidden_dims": [4] * 100_000}])
def test_load__forged_gate_structure__is_a_checkpoint_error_at_once(tmp_path, forged):
    ckpt = build_checkpoint(tmp_path / "ckpt")
    manifest = read_manifest(ckpt)
    manifest["gate"]["config"].update(forged)  # building it would loop 10^12 / 10^5 times
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError, match="cannot fit the .* tensors of"):
        Router.load(ckpt)


def test_load__forged_gate_width__is_a_checkpoint_error(tmp_path):
    ckpt = build_checkpoint(tmp_path / "ckpt")
    manifest = read_manifest(ckpt)
    manifest["gate"]["config"]["hidden_dims"] = [10**12]  # 10^12 x 32 floats: cannot be allocated
    write_manifest(ckpt, manifest)
    with pytest.raises(CheckpointError):
        Router.load(ckpt)


@pytest.mark.slow
def test_schemathesis__no_5xx_and_the_schema_holds(tmp_path):
    """The server fuzz, short: the schema run, a foreign-Origin run and content types x origins (issue 10)."""
    out = tmp_path / "st.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "serve_fuzz_api.py"),
            "--max-examples",
            "5",
            "--seed",
            "0",
            "--browser-cases",
            "60",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    schema, foreign, browser = report["schema"], report["foreign_origin"], report["browser"]
    assert schema["operations"]["tested"] == 11
    assert schema["test_cases"]["generated"] > 100
    assert schema["failures"] == [] and schema["errors"] == [], proc.stdout[-3000:]
    assert schema["summary"]["5xx"] == 0 and foreign["summary"]["5xx"] == 0 and report["server_log_500s"] == 0
    # every write a foreign page could send was refused, and the checkpoint did not change
    assert foreign["summary"]["post_delete"] > 100 and foreign["unchanged"]
    assert all(code in (403, 405) for method, code in foreign["exchanges"] if method in ("POST", "DELETE"))
    assert browser["cases"] == 60 and browser["5xx"] == 0 and browser["failures"] == [], browser
    assert browser["refused_403"] > 0 and browser["refused_415"] > 0 and browser["accepted_2xx"] > 0
    assert browser["changed_by_refused"] == 0
    assert proc.returncode == 0, proc.stdout[-3000:]

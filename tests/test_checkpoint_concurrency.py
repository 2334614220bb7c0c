"""Concurrency: one process saves a checkpoint over and over while another loads it; no load fails or sees a mix.

The writer alternates two distinguishable routers (A: experts a, b; B: experts a, b, c, another gate,
other feedback). Every load must equal A or B exactly (vectors, ids, gate weights, store rows,
stats). Format 1 failed about one load in four here (a reader met the renamed-away directory).
The child scripts use only the public API and define their own digest, so they run against any version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moe_router import Router
from moe_router.gate import initial_gate
from tests.helpers import REPO

ROWS = 2000  # vectors per expert: big enough that a load spans many file opens while saves run

COMMON = r"""
import hashlib, json, os, sys, time
import numpy as np
from moe_router import Router

def digest(router):
    h = hashlib.sha256()
    h.update(json.dumps([router.dim, router.metric, router.expert_names, router.abstain_threshold,
                         router.parts().stats.counts.tolist()]).encode())
    for e in router.experts:
        h.update(e.vectors().tobytes()); h.update(e.ids.tobytes())
    for k, v in sorted((router.gate.state_dict() if router.gate is not None else {}).items()):
        h.update(k.encode()); h.update(v.detach().cpu().numpy().tobytes())
    for table in ("items", "feedback"):
        h.update(repr(router.parts().store.conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()).encode())
    return h.hexdigest()

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.005)
"""

WRITER = (
    COMMON
    + r"""
target, a_dir, b_dir, sync, saves = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
routers = [Router.load(a_dir), Router.load(b_dir)]
open(os.path.join(sync, "writer-ready"), "w").close()
wait_for(os.path.join(sync, "go"))
done, failures = 0, []
while done < saves or not os.path.exists(os.path.join(sync, "reader-done")):
    try:
        routers[done % 2].save(target)
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    done += 1
    if done > 50 * saves:  # the reader is stuck: stop, the parent reports it
        break
open(os.path.join(sync, "writer-done"), "w").close()
print(json.dumps({"saves": done, "failures": failures}))
"""
)

READER = (
    COMMON
    + r"""
target, sync, loads = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(os.path.join(sync, "reader-ready"), "w").close()
wait_for(os.path.join(sync, "go"))
seen, failures, during = {}, [], 0
for _ in range(loads):
    during += not os.path.exists(os.path.join(sync, "writer-done"))
    try:
        d = digest(Router.load(target))
        seen[d] = seen.get(d, 0) + 1
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
open(os.path.join(sync, "reader-done"), "w").close()
print(json.dumps({"seen": seen, "failures": failures, "loads_during_saves": during}))
"""
)

DIGEST = (
    COMMON
    + r"""
print(json.dumps([digest(Router.load(p)) for p in sys.argv[1:]]))
"""
)


def two_versions(tmp_path: Path, rows: int) -> tuple[Path, Path]:
    """Checkpoints A and B: small routers (`rows` vectors per expert) that differ in every part a save writes."""
    rng = np.random.default_rng(0)
    out = []
    for name, experts in (("A", "ab"), ("B", "abc")):
        router = Router(8, "ip")
        for e in experts:
            router.add_expert(
                e,
                vectors=rng.standard_normal((rows, 8)).astype(np.float32),
                texts=[f"{name}{e}{i}" for i in range(rows)],
                metadata=[{"v": name}] * rows,
            )
        router.set_gate(initial_gate(router.experts, hidden_dims=[8], dropout=0.0))
        router.record_feedback(rng.standard_normal(8).astype(np.float32), "a", name == "A")
        router.abstain_threshold = 0.25 if name == "A" else 0.75
        out.append(router.save(tmp_path / name))
    return out[0], out[1]


def run_concurrently(
    tmp_path: Path, saves: int, loads: int, rows: int, pythonpath: str = str(REPO)
) -> tuple[dict, dict, list]:
    a, b = two_versions(tmp_path, rows)
    target, sync = tmp_path / "target", tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "PYTHONPATH": pythonpath}
    expected = json.loads(
        subprocess.run(
            [sys.executable, "-c", DIGEST, str(a), str(b)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=120,
        ).stdout
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from moe_router import Router; Router.load(sys.argv[1]).save(sys.argv[2])",
            str(a),
            str(target),
        ],
        check=True,
        env=env,
        timeout=120,
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), str(a), str(b), str(sync), str(saves)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(target), str(sync), str(loads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not all((sync / f).exists() for f in ("writer-ready", "reader-ready")):
        assert writer.poll() is None and reader.poll() is None and time.monotonic() < deadline, (
            writer.stderr.read() if writer.poll() is not None else ""
        ) + (reader.stderr.read() if reader.poll() is not None else "")
        time.sleep(0.05)
    (sync / "go").touch()
    w_out, w_err = writer.communicate(timeout=300)
    r_out, r_err = reader.communicate(timeout=300)
    assert writer.returncode == 0 and reader.returncode == 0, w_err[-2000:] + r_err[-2000:]
    return json.loads(w_out), json.loads(r_out), expected


@pytest.mark.slow
def test_saves_while_another_process_loads__no_failure_and_every_load_is_a_saved_version(tmp_path: Path) -> None:
    w, r, expected = run_concurrently(tmp_path, saves=100, loads=100, rows=ROWS)
    assert w["failures"] == [] and r["failures"] == [], (w["failures"][:3], r["failures"][:3])
    assert w["saves"] >= 100 and sum(r["seen"].values()) == 100
    assert set(r["seen"]) <= set(expected)  # never a mix
    assert r["loads_during_saves"] == 100  # the writer kept saving until the reader finished
    assert set(r["seen"]) == set(expected)  # both versions were read: the loads really overlapped the saves

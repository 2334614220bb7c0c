"""benchmarks/ray_scaleout.py keeps working: its smoke mode on a multi-node test cluster, watched for its sockets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.ray_helpers import LOOPBACK, off_loopback, sockets


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install -e '.[ray]')")
def test_ray_scaleout_smoke__multi_node_routed_vs_broadcast_and_node_loss_on_loopback(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "benchmarks/ray_scaleout.py"), "--smoke", "--nodes", "2", "--node-loss"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([*cmd, "--json", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stray, listeners = [], set()
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:  # the benchmark's cluster, sampled while it runs
        stray += off_loopback(proc.pid)
        listeners |= {name for name, _, _, remote in sockets(proc.pid) if remote[1] == 0}
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    log = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == 0, log[-4000:]
    assert stray == [] and {"raylet", "gcs_server"} <= listeners  # seen, and only ever on loopback
    report = json.loads(out.read_text())
    print(log[-3000:], json.dumps(report, indent=1), sep="\n")  # shown when an assertion below fails
    assert report["node_addresses"] == [LOOPBACK] and report["ray results equal local"]
    rows = {(r["mode"], r["batch"]): r for r in report["rows"]}
    routed, broadcast = rows[("ray routed", 1)], rows[("ray broadcast", 1)]
    assert routed["actor_calls_per_search"] == 2 and broadcast["actor_calls_per_search"] == report["experts"]
    assert routed["nodes_per_search"] <= 2 and broadcast["nodes_per_search"] == 2  # broadcast reaches both nodes
    assert sum(routed["actor_calls_per_search_by_node"].values()) == 2
    loss = report["node_loss"]
    assert loss["recovered"] and loss["removed_node_experts (replicas=1)"]
    assert all(p["partial"] == 0 for name, p in loss["replicas=2"].items() if name != "slowest_search_s")
    down = loss["replicas=1"]["node down"]
    assert down["partial"] == down["searches"] > 0
    assert down["missing named"] == loss["removed_node_experts (replicas=1)"]
    assert loss["replicas=1"]["after"]["partial"] == 0 and loss["replicas=1"]["after"]["searches"] > 0

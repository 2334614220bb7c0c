"""benchmarks/serve_load.py --smoke: every path of the load benchmark runs and reports what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_load_smoke__reports_ratios_passes_and_the_embedder_share(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    vectors, texts = (report["checkpoints"][f"synthetic 4000 x 32, 4 experts, {m}"] for m in ("vectors", "texts"))
    assert vectors["top_experts"] == [2] and texts["top_experts"] == [2, 4]  # texts: top-2 and all experts
    for rows, paths in (
        (vectors, ["HTTP, micro-batched", "HTTP, one request per pass", "direct, per query", "direct, batched"]),
        (texts, ["HTTP, micro-batched", "direct, per query", "direct, batched"]),
    ):
        for top in rows["top_experts"]:
            for c in (1, 4):
                for path in paths:
                    row = rows[f"{path}/{c}/top{top}"]
                    assert row["calls"] > 0 and row["errors"] == 0, (path, c, top, row)
                micro = rows[f"HTTP, micro-batched/{c}/top{top}"]
                assert micro["queries_per_pass"] >= 1
                ratio = rows["ratio_http_batched_to_direct_batched"][f"HTTP, micro-batched/top{top}"][str(c)]
                assert ratio == pytest.approx(micro["qps"] / rows[f"direct, batched/{c}/top{top}"]["qps"])
        assert "HTTP micro-batched / direct batched" in proc.stdout
    # one pass of one client's query is one request; text passes spend part of their time embedding
    assert vectors["HTTP, micro-batched/1/top2"]["queries_per_pass"] == 1.0
    assert vectors["HTTP, micro-batched/1/top2"]["embed_share"] == 0.0
    assert all(0 < texts[f"HTTP, micro-batched/{c}/top{t}"]["embed_share"] < 1 for c in (1, 4) for t in (2, 4))
    assert texts["server"]["texts"] == texts["server"]["queries"] > 0

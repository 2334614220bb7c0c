"""Every benchmark runs: its seconds-long --smoke mode, in a subprocess, must finish cleanly.

The numbers of a smoke run mean nothing (toy sizes); what is checked is that no benchmark has
rotted: each one's code path runs end to end against the current library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import import_benchmark

REPO = Path(__file__).resolve().parents[1]

SMOKE = {  # benchmark -> arguments of its smoke run
    "speed_1m.py": ["--smoke"],
    "checkpoint_costs.py": ["--smoke"],
    "balance.py": ["--smoke"],
    "lifecycle_add.py": ["--smoke"],
    "lifecycle_feedback.py": ["--smoke"],
    "lifecycle_hierarchy.py": ["--smoke"],
    "lifecycle_optimize.py": ["--smoke"],
    "add_intent.py": ["--smoke"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_mode__runs_to_the_end(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *SMOKE[script]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_lifecycle_common_smoke_sample__keeps_a_few_rows_of_every_label_and_split(tmp_path: Path) -> None:
    import argparse
    import json

    common = import_benchmark("lifecycle_common")
    rows = [{"text": f"t{i}", "domain": "d", "label": f"l{i % 4}", "split": ("train", "val")[i % 2]} for i in range(80)]
    (tmp_path / "full.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argparse.Namespace(smoke=True, data=str(tmp_path / "full.jsonl"), cache_dir=None, steps=100)
    try:
        common.apply_smoke(args)
    finally:
        common._smoke = False  # the module flag would switch later importers to the hashing embedder
    kept = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    counts: dict[tuple[str, str], int] = {}
    for r in kept:
        counts[r["label"], r["split"]] = counts.get((r["label"], r["split"]), 0) + 1
    # labels l0, l2 only in train and l1, l3 only in val (i % 2 picks both): 4 (label, split) pairs, 3 rows each
    assert counts == {key: common.SMOKE_ROWS for key in counts} and len(counts) == 4
    assert args.steps == 5 and Path(args.cache_dir).parent == Path(args.data).parent


def test_lifecycle_common_exact_top10__equals_brute_force_over_every_expert() -> None:
    import numpy as np

    from tests.helpers import brute_force, make_router

    common = import_benchmark("lifecycle_common")
    router = make_router()
    xb = np.concatenate([e.vectors() for e in router.experts])
    ids = np.concatenate([e.ids for e in router.experts])
    xq = xb[::7][:20] + 0.01
    _, want = brute_force(xq, xb, ids, 10, router.metric)
    assert np.array_equal(np.sort(common.exact_top10(router, xq.astype(np.float32)), 1), np.sort(want, 1))

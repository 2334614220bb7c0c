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

REPO = Path(__file__).resolve().parents[1]

SMOKE = {  # benchmark -> arguments of its smoke run
    "speed_1m.py": ["--smoke"],
    "checkpoint_costs.py": ["--smoke"],
    "balance.py": ["--smoke"],
    "lifecycle_add.py": ["--smoke"],
    "lifecycle_feedback.py": ["--smoke"],
    "lifecycle_hierarchy.py": ["--smoke"],
    "lifecycle_optimize.py": ["--smoke"],
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

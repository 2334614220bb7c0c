"""What the Hydra apps share: where a run writes its files."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig


def run_dir() -> Path:
    """Hydra's output directory when running under @hydra.main, else a fresh temporary one."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # no Hydra run: composed by hand (tests, benchmarks)
        return Path(tempfile.mkdtemp(prefix="moe_router-"))

"""The calibration section of a report: ECE and reliability of the gate's top-1 probability.

Dimension legend: n queries, E experts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_router.data.base import Dataset
from moe_router.gate.confidence import reliability_bins, softmax
from moe_router.gate.model import infer
from moe_router.metrics import ece_noise_floor, expected_calibration_error
from moe_router.routing.router import Router


def calibration_report(router: Router, xq: np.ndarray, probs: np.ndarray, gold: np.ndarray) -> dict[str, Any]:
    """ECE and reliability bins of the top-1 probability, at the checkpoint's temperature and at T = 1."""
    known = gold >= 0
    raw = softmax(infer(router.gate, xq, "logits"))
    out: dict[str, Any] = {"temperature": float(router.gate.temperature)}
    for name, p in (("calibrated", probs), ("uncalibrated (T=1)", raw)):
        conf, correct = p.max(axis=1)[known], (p.argmax(axis=1) == gold)[known]
        out[name] = {"ece": expected_calibration_error(conf, correct), "bins": reliability_bins(conf, correct)}
    floor, floor90 = ece_noise_floor(probs.max(axis=1)[known])
    out["calibrated"].update({"ece_noise_floor": floor, "ece_noise_floor_q90": floor90})
    return out


def calibrated_with_bias(router: Router, dataset: Dataset) -> bool:
    """Whether the gate's calibration fitted per-expert offsets with its temperature (its training config's choice)."""
    setting = router.config.get("calibrate_bias", "auto")
    return bool(dataset.defaults().calibrate_bias if setting == "auto" else setting)

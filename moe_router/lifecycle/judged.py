"""Judged queries that arrive after training (a judged file, or an application's own labels) join the
router's calibration set, so the next fine-tune (train.fine_tune) replays them and recalibrates on them.

Positive feedback (Router.record_feedback) needs no step here: fine_tune reads it as judged queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_router.data.jsonl import json_objects
from moe_router.routing.parts import Change, RouterParts
from moe_router.routing.router import Router

JUDGED_FIELDS = ("text", "expert")  # one JSON object per line: {"text": "...", "expert": "<expert name>"}


def add_judged_queries(router: Router, queries: Any, experts: Sequence[str]) -> int:
    """Add queries (texts or vectors) judged to belong to `experts` (one name per query); the count added."""
    if isinstance(experts, (str, bytes)):
        raise ValueError("add_judged_queries: experts must be a list of expert names, one per query, not one string")
    xq, _ = router.prepare(queries)
    experts = list(experts)
    if len(experts) != len(xq):
        raise ValueError(f"add_judged_queries: {len(xq)} queries but {len(experts)} experts; expected one per query")
    router.expert_indices(experts)  # unknown names: KeyError naming the known ones

    def plan(parts: RouterParts) -> Change:
        return Change(parts.replace(calibration=parts.calibration.added(xq, experts)))

    router.update(plan)
    return len(xq)


def read_judged_file(path: str | Path) -> tuple[list[str], list[str]]:
    """(texts, experts) from a JSONL file of {"text", "expert"} objects; errors name the file and line."""
    path = Path(path)
    texts, experts = [], []
    for lineno, obj in json_objects(path, JUDGED_FIELDS):
        for key in JUDGED_FIELDS:
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise ValueError(f"{path}:{lineno}: {key!r} must be a non-empty string, got {obj.get(key)!r:.60}")
        texts.append(obj["text"])
        experts.append(obj["expert"])
    if not texts:
        raise ValueError(f"{path}: no judged queries; expected JSON lines with fields {list(JUDGED_FIELDS)}")
    return texts, experts


def add_judged_file(router: Router, path: str | Path) -> int:
    """Add the judged queries of a JSONL file (read_judged_file); the count added."""
    texts, experts = read_judged_file(path)
    return add_judged_queries(router, texts, experts)

"""Reading JSON-lines and other line files so that every error names the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path


def lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a UTF-8 file, skipping blank lines; a bad byte names its line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:  # decoded per line, so the error can name the line
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if line.strip():
                yield lineno, line.rstrip("\r\n")


def json_objects(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSONL file: each non-blank line one JSON object (`fields` name it in errors)."""
    for lineno, line in lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with fields {list(fields)}")
        yield lineno, obj

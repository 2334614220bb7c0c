"""SQLite helpers shared by the metadata store and the embedding cache."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

MAX_PARAMS = 900  # SQLite's default limit on bound parameters is 999; leave room for the others


def select_in(conn: sqlite3.Connection, sql: str, values: Sequence[Any], before: Sequence[Any] = ()) -> Iterator[tuple]:
    """Rows of `sql` with its one `IN ({marks})` placeholder bound to `values`, a chunk of MAX_PARAMS at a time.

    `before` are parameters that come before the IN list in `sql` (bound again for every chunk).
    """
    for start in range(0, len(values), MAX_PARAMS):
        chunk = list(values[start : start + MAX_PARAMS])
        yield from conn.execute(sql.format(marks=",".join("?" * len(chunk))), [*before, *chunk])

"""Read-only questions to the call history database, across functions (gateway/history.py answers per function).

Every connection is opened read-only: the console never changes history. Columns added later (error_type,
error_message, traceback, ...) come along in the rows as they appear; nothing here depends on them.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

PAGE = 50


@dataclass(frozen=True)
class CallFilter:
    function: str | None = None
    outcome: str | None = None
    status: int | None = None
    since: float | None = None  # time >= since
    until: float | None = None  # time < until: the cursor of the next page when several boards are merged
    errors: bool = False  # only calls that did not end ok

    def where(self) -> tuple[str, list[Any]]:
        parts, args = [], []
        for col, val in (("function", self.function), ("outcome", self.outcome), ("status", self.status)):
            if val not in (None, ""):
                parts.append(f"{col} = ?")
                args.append(val)
        if self.errors:
            parts.append("outcome != 'ok'")
        if self.since is not None:
            parts.append("time >= ?")
            args.append(self.since)
        if self.until is not None:
            parts.append("time < ?")
            args.append(self.until)
        return (" AND ".join(parts) or "1"), args


class HistoryReader:
    def __init__(self, path: str) -> None:
        self.path = path

    def _rows(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2.0)
        except sqlite3.OperationalError:
            return []
        try:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, tuple(args))]
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        finally:
            db.close()

    def calls(self, f: CallFilter, before_id: int | None = None, limit: int = PAGE,
              by_time: bool = False) -> list[dict[str, Any]]:
        """Newest first; the next page is the rows before the last one's id (stable while new calls arrive).
        by_time: in the order of their time, which is what rows of several boards are merged by."""
        where, args = f.where()
        if before_id is not None:
            where += " AND id < ?"
            args.append(before_id)
        order = "time DESC, id DESC" if by_time else "id DESC"
        return self._rows(f"SELECT * FROM calls WHERE {where} ORDER BY {order} LIMIT ?", [*args, limit])

    def calls_after(self, f: CallFilter, after_id: int, limit: int = 100) -> list[dict[str, Any]]:
        """For the live tail: oldest first."""
        where, args = f.where()
        return self._rows(f"SELECT * FROM calls WHERE {where} AND id > ? ORDER BY id LIMIT ?",
                          [*args, after_id, limit])

    def last_id(self) -> int:
        rows = self._rows("SELECT MAX(id) AS m FROM calls")
        return (rows[0]["m"] or 0) if rows else 0

    def call(self, request_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM calls WHERE request_id=? ORDER BY id DESC LIMIT 1", (request_id,))
        return rows[0] if rows else None

    def last_calls(self) -> dict[str, float]:
        rows = self._rows("SELECT function, MAX(time) AS t FROM calls GROUP BY function")
        return {r["function"]: r["t"] for r in rows}

    def recent(self, since: float, function: str | None = None) -> list[dict[str, Any]]:
        """(time, function, outcome, status, duration_ms) of every call since a time, oldest first."""
        if function:
            return self._rows("SELECT time, function, outcome, status, duration_ms FROM calls WHERE time >= ? AND "
                              "function = ? ORDER BY time", (since, function))
        return self._rows("SELECT time, function, outcome, status, duration_ms FROM calls WHERE time >= ? "
                          "ORDER BY time", (since,))

    def functions(self) -> list[str]:
        return [r["function"] for r in self._rows("SELECT DISTINCT function FROM calls ORDER BY function")]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass(frozen=True)
class Bucket:
    start: float
    calls: int
    errors: int
    p50: float | None
    p99: float | None


def buckets(rows: list[dict[str, Any]], since: float, width_s: float, n: int) -> list[Bucket]:
    """Rows (oldest first) cut into n buckets of width_s from `since`."""
    groups: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for r in rows:
        i = int((r["time"] - since) // width_s)
        if 0 <= i < n:
            groups[i].append(r)
    out = []
    for i, grp in enumerate(groups):
        d = [r["duration_ms"] for r in grp if r["duration_ms"] is not None]
        out.append(Bucket(since + i * width_s, len(grp), sum(1 for r in grp if r["outcome"] != "ok"),
                          percentile(d, 0.5), percentile(d, 0.99)))
    return out


def window(minutes: int, points: int) -> tuple[float, float]:
    """The start of a window ending now, aligned to its bucket width, and that width."""
    width = minutes * 60 / points
    now = time.time()
    start = (now // width + 1) * width - minutes * 60
    return start, width

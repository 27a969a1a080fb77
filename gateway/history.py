"""Call history in SQLite (WAL mode), written off the request path, safe with several Gunicorn workers.

Each worker queues its records; one writer thread per worker inserts them in batches. A locked or corrupt
database costs a logged warning and the lost records are counted, never a failed call or a crashed worker;
the writer reopens the database on its next batch, so history resumes once the cause is gone.
"""

from __future__ import annotations

import queue
import sqlite3
import sys
import threading
import time
from typing import Any

COLUMNS = ("time", "request_id", "function", "version", "method", "path", "status", "outcome", "duration_ms",
           "cpu_ms", "max_rss_kb", "output")
SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL, request_id TEXT NOT NULL, function TEXT NOT NULL, version INTEGER,
    method TEXT, path TEXT, status INTEGER, outcome TEXT, duration_ms REAL, cpu_ms REAL, max_rss_kb INTEGER,
    output TEXT
);
CREATE INDEX IF NOT EXISTS calls_function ON calls (function, id);
CREATE INDEX IF NOT EXISTS calls_request ON calls (request_id);
CREATE INDEX IF NOT EXISTS calls_time ON calls (time);
"""
PRUNE_EVERY = 200  # inserts between two retention passes (per worker)


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=2.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes of the process
    db.executescript(SCHEMA)
    return db


class History:
    def __init__(self, path: str, max_rows: int = 100_000, max_age_days: float = 30.0,
                 queue_size: int = 10_000) -> None:
        self.path = path
        self.max_rows, self.max_age_s = max_rows, max_age_days * 86400
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(queue_size)
        self.dropped = 0
        self.error: str | None = None
        self._since_prune = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._writer, name="fnbox-history", daemon=True)
        self._thread.start()

    # -- writing ---------------------------------------------------------------------------------------------
    def record(self, rec: dict[str, Any]) -> None:
        try:
            self._idle.clear()
            self._queue.put_nowait(rec)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 2.0) -> bool:
        """Waits (bounded) until every queued record of this worker is written."""
        deadline = time.monotonic() + timeout
        while not (self._queue.empty() and self._idle.is_set()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 2.0) -> None:
        self.flush(timeout)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _writer(self) -> None:
        db: sqlite3.Connection | None = None
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 500:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                if db is None:
                    db = connect(self.path)
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany(
                        f"INSERT INTO calls ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})",
                        [tuple(r.get(c) for c in COLUMNS) for r in batch])
                self._since_prune += len(batch)
                if self._since_prune >= PRUNE_EVERY:
                    self._since_prune = 0
                    self.prune(db)
                self.error = None
            except sqlite3.Error as e:
                self.dropped += len(batch)
                if self.error != str(e):
                    print(f"fnbox: call history: {e}; {len(batch)} records lost, retrying on the next call",
                          file=sys.stderr)
                self.error = str(e)
                if db is not None:
                    try:
                        db.close()
                    except sqlite3.Error:
                        pass
                db = None
            finally:
                if self._queue.empty():
                    self._idle.set()

    def prune(self, db: sqlite3.Connection) -> None:
        with db:
            db.execute("DELETE FROM calls WHERE time < ?", (time.time() - self.max_age_s,))
            db.execute("DELETE FROM calls WHERE id <= (SELECT MAX(id) FROM calls) - ?", (self.max_rows,))

    # -- reading ---------------------------------------------------------------------------------------------
    def _read(self, sql: str, args: tuple) -> list[dict[str, Any]]:
        db = connect(self.path)
        try:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, args)]
        finally:
            db.close()

    def calls(self, function: str, limit: int = 50, outcome: str | None = None) -> list[dict[str, Any]]:
        if outcome:
            return self._read("SELECT * FROM calls WHERE function=? AND outcome=? ORDER BY id DESC LIMIT ?",
                              (function, outcome, limit))
        return self._read("SELECT * FROM calls WHERE function=? ORDER BY id DESC LIMIT ?", (function, limit))

    def call(self, request_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM calls WHERE request_id=? ORDER BY id DESC LIMIT 1", (request_id,))
        return rows[0] if rows else None

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self._read("SELECT function, outcome, COUNT(*) AS n FROM calls GROUP BY function, outcome", ()):
            out.setdefault(r["function"], {})[r["outcome"]] = r["n"]
        return out

    def count(self) -> int:
        return self._read("SELECT COUNT(*) AS n FROM calls", ())[0]["n"]

"""The embedded queue: one SQLite database in FNBOX_DATA_DIR, shared by every Gunicorn worker of the board and
by `fnbox worker`. WAL mode with synchronous=FULL: a call is answered 202 only once its row is on disk, so a
crash of the process or of the machine after the answer never loses it.

Each call is a row with the columns the queue selects on (state, run_at, owner, lease) and the whole record as
JSON (jobs.calls.Call). Every change is one short IMMEDIATE transaction, so two workers never claim one call.
Schedule ticks are claimed by inserting (function, scheduled time): the primary key lets exactly one in.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gateway.sqlite_wal import connect_wal
from jobs.calls import CB_PENDING, DONE, FAILED, QUEUED, RUNNING, Call

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, function TEXT NOT NULL, run_at REAL NOT NULL,
    owner TEXT, lease_until REAL, finished REAL, cb_state TEXT, cb_next REAL, cb_lease REAL, doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_ready ON calls (state, run_at);
CREATE INDEX IF NOT EXISTS calls_finished ON calls (finished);
CREATE INDEX IF NOT EXISTS calls_callback ON calls (cb_state, cb_next);
CREATE TABLE IF NOT EXISTS ticks (function TEXT NOT NULL, scheduled REAL NOT NULL, board TEXT, claimed REAL,
                                  call_id TEXT, PRIMARY KEY (function, scheduled));
CREATE TABLE IF NOT EXISTS schedule_marks (function TEXT PRIMARY KEY, last REAL NOT NULL);
"""


class QueueFull(Exception):
    """The queue holds queue_max calls already: answered 503 busy."""


class QueueUnavailable(Exception):
    """The queue cannot be written or read right now (disk, lock, Redis down): answered 503 unavailable."""


class SqliteQueue:
    def __init__(self, path: str, queue_max: int) -> None:
        self.path = path
        self.queue_max = queue_max
        if not os.path.exists(path):
            # Queued requests carry headers and bodies: private to the server's user, like the history.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        self._local = threading.local()
        db = self._connect()
        db.executescript(SCHEMA)
        db.close()

    def _connect(self) -> sqlite3.Connection:
        return connect_wal(self.path, 5.0, "FULL")  # FULL: the 202 promises the call is on disk

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened once (per process: a forked child opens its own)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.db, local.pid = self._connect(), os.getpid()
        return local.db

    def _due(self, sql: str, args: tuple) -> bool:
        """A read without any lock: whether there is anything to take before taking the write lock for it."""
        try:
            return self._conn().execute(sql, args).fetchone() is not None
        except sqlite3.Error as e:
            raise QueueUnavailable(f"the queue database failed: {e}") from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction on this thread's connection."""
        try:
            db = self._conn()
        except sqlite3.Error as e:
            raise QueueUnavailable(f"the queue database cannot be opened: {e}") from None
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise QueueUnavailable(f"the queue database failed: {e}") from None
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    @staticmethod
    def _write(db: sqlite3.Connection, c: Call) -> None:
        cb = c.callback or {}
        db.execute("INSERT OR REPLACE INTO calls (id, state, function, run_at, owner, lease_until, finished, cb_state,"
                   " cb_next, cb_lease, doc) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                   (c.id, c.state, c.function, c.run_at, c.owner, c.lease_until, c.finished, cb.get("state"),
                    cb.get("next_at"), cb.get("lease_until"), c.to_json()))

    # -- the call's life ----------------------------------------------------------------------------------------
    def add(self, c: Call) -> None:
        with self._tx() as db:
            (n,) = db.execute("SELECT COUNT(*) FROM calls WHERE state=?", (QUEUED,)).fetchone()
            if n >= self.queue_max:
                raise QueueFull(f"the queue already holds {n} calls (FNBOX_QUEUE_MAX)")
            self._write(db, c)

    def claim(self, owner: str, lease_for: Callable[[str], float]) -> Call | None:
        """The oldest call that is due, now RUNNING under `owner`, its attempt counted; None if none is due."""
        now = time.time()
        if not self._due("SELECT 1 FROM calls WHERE state=? AND run_at<=? LIMIT 1", (QUEUED, now)):
            return None
        with self._tx() as db:
            row = db.execute("SELECT doc FROM calls WHERE state=? AND run_at<=? ORDER BY run_at LIMIT 1",
                             (QUEUED, now)).fetchone()
            if row is None:
                return None
            c = Call.from_json(row[0])
            c.state, c.owner, c.started, c.finished = RUNNING, owner, now, None
            c.ran_on = owner.split("/")[0]
            c.lease_until = now + lease_for(c.function)
            c.attempts += 1
            self._write(db, c)
            return c

    def update(self, c: Call, owner: str | None = None) -> bool:
        """Writes the record back; with `owner`, only if the call is still RUNNING under it (a call given up
        as lost and handed to another worker must not be overwritten by its first runner)."""
        with self._tx() as db:
            if owner is not None:
                row = db.execute("SELECT state, owner FROM calls WHERE id=?", (c.id,)).fetchone()
                if row is None or row[0] != RUNNING or row[1] != owner:
                    return False
            self._write(db, c)
            return True

    def get(self, call_id: str) -> Call | None:
        try:
            row = self._conn().execute("SELECT doc FROM calls WHERE id=?", (call_id,)).fetchone()
        except sqlite3.Error as e:
            raise QueueUnavailable(f"the queue database failed: {e}") from None
        return Call.from_json(row[0]) if row else None

    def modify(self, call_id: str, fn: Callable[[Call], bool]) -> Call | None:
        """Reads, changes (fn returns whether to write) and writes one call in one transaction."""
        with self._tx() as db:
            row = db.execute("SELECT doc FROM calls WHERE id=?", (call_id,)).fetchone()
            if row is None:
                return None
            c = Call.from_json(row[0])
            if fn(c):
                self._write(db, c)
            return c

    def list(self, state: str | None = None, limit: int = 100) -> list[Call]:
        db = self._connect()
        try:
            if state:
                rows = db.execute("SELECT doc FROM calls WHERE state=? ORDER BY rowid DESC LIMIT ?", (state, limit))
            else:
                rows = db.execute("SELECT doc FROM calls ORDER BY rowid DESC LIMIT ?", (limit,))
            return [Call.from_json(r[0]) for r in rows]
        except sqlite3.Error as e:
            raise QueueUnavailable(f"the queue database failed: {e}") from None
        finally:
            db.close()

    def running(self) -> list[Call]:
        return self.list(RUNNING, 100_000)

    def counts(self) -> dict[str, int]:
        db = self._connect()
        try:
            return dict(db.execute("SELECT state, COUNT(*) FROM calls GROUP BY state").fetchall())
        finally:
            db.close()

    # -- callbacks ----------------------------------------------------------------------------------------------
    def claim_callback(self, lease_s: float) -> Call | None:
        """A finished call whose callback is due and not being delivered by someone else, leased to the caller."""
        now = time.time()
        if not self._due("SELECT 1 FROM calls WHERE cb_state=? AND cb_next<=? LIMIT 1", (CB_PENDING, now)):
            return None
        with self._tx() as db:
            row = db.execute("SELECT doc FROM calls WHERE cb_state=? AND cb_next<=? AND (cb_lease IS NULL OR "
                             "cb_lease<?) AND state IN (?,?) ORDER BY cb_next LIMIT 1",
                             (CB_PENDING, now, now, DONE, FAILED)).fetchone()
            if row is None:
                return None
            c = Call.from_json(row[0])
            assert c.callback is not None
            c.callback["lease_until"] = now + lease_s
            self._write(db, c)
            return c

    # -- schedules ----------------------------------------------------------------------------------------------
    def add_tick(self, c: Call, scheduled: float) -> bool:
        """Queues a tick's call if nobody has claimed (function, scheduled time) yet: True for exactly one caller,
        across every worker of the board. Ticks are not refused by queue_max (they come at a bounded rate)."""
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO ticks (function, scheduled, board, claimed, call_id) "
                             "VALUES (?,?,?,?,?)", (c.function, scheduled, c.board, time.time(), c.id))
            if cur.rowcount != 1:
                return False
            self._write(db, c)
            return True

    def last_tick(self, function: str) -> float | None:
        try:
            row = self._conn().execute("SELECT last FROM schedule_marks WHERE function=?", (function,)).fetchone()
        except sqlite3.Error as e:
            raise QueueUnavailable(f"the queue database failed: {e}") from None
        return row[0] if row else None

    def mark_tick(self, function: str, scheduled: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO schedule_marks (function, last) VALUES (?, ?) ON CONFLICT(function) DO UPDATE "
                       "SET last=max(last, excluded.last)", (function, scheduled))

    # -- retention ----------------------------------------------------------------------------------------------
    def prune(self, retention_s: float) -> int:
        cutoff = time.time() - retention_s
        with self._tx() as db:
            n = db.execute("DELETE FROM calls WHERE state IN (?,?) AND finished<? AND (cb_state IS NULL OR "
                           "cb_state!=?)", (DONE, FAILED, cutoff, CB_PENDING)).rowcount
            db.execute("DELETE FROM ticks WHERE claimed<?", (cutoff,))
            return n

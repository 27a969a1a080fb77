"""Call history in SQLite (WAL mode), written by one thread per worker, safe with several Gunicorn workers.

Each worker queues its records; one writer thread per worker inserts them in batches (the calls of a few ms
share one transaction, and a call's row and its completion, when both are queued, become one INSERT). A call
does not wait for its commit (`record(wait=False)`, the gateway's calls): instead every history reader waits.
Each writing process publishes two counters in a small shared file (`<database>.pending/<pid>-<start>`: records
accepted, records written), and flush(), which every read of the admin API and the console does first, waits
(bounded) until every live writer has written what it had accepted when the read began. So a client that gets
its answer and then asks for the call finds it, whichever worker answers either request. A locked or corrupt
database costs a logged warning and the lost records are counted, never a failed call or a crashed worker;
while it fails, nobody waits for it, and the writer reopens the database on its next batch, so history resumes
once the cause is gone.

Retention (max_rows, max_age_days) is applied every PRUNE_EVERY records under load, and once a worker's
queue has been idle for PRUNE_IDLE_S, so shortly after calls stop the table holds at most max_rows rows.

The database holds every function's output: it is created 0600, because sandboxed calls run on the same
filesystem (SQLite gives the -wal and -shm files the database file's mode).
"""

from __future__ import annotations

import mmap
import os
import queue
import sqlite3
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from gateway.sqlite_wal import connect_wal

COLUMNS = ("time", "request_id", "function", "version", "method", "path", "status", "outcome", "duration_ms",
           "cpu_ms", "max_rss_kb", "output", "complete", "error_type", "message", "traceback", "trigger")
# Columns added after 0.1, added to an older database when it is opened.
LATER_COLUMNS = {"complete": "INTEGER NOT NULL DEFAULT 1", "error_type": "TEXT", "message": "TEXT",
                 "traceback": "TEXT", "trigger": "TEXT NOT NULL DEFAULT 'sync'"}
# What a record that does not say gets: sync calls come from gateway/routes.py, queued ones say async|schedule.
_DEFAULTS = {"complete": 1, "trigger": "sync"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL, request_id TEXT NOT NULL, function TEXT NOT NULL, version INTEGER,
    method TEXT, path TEXT, status INTEGER, outcome TEXT, duration_ms REAL, cpu_ms REAL, max_rss_kb INTEGER,
    output TEXT, complete INTEGER NOT NULL DEFAULT 1, error_type TEXT, message TEXT, traceback TEXT,
    trigger TEXT NOT NULL DEFAULT 'sync'
);
CREATE INDEX IF NOT EXISTS calls_function ON calls (function, id);
CREATE INDEX IF NOT EXISTS calls_request ON calls (request_id);
CREATE INDEX IF NOT EXISTS calls_time ON calls (time);
"""
PRUNE_EVERY = 200  # inserts between two retention passes (per worker) while its queue does not drain
PRUNE_IDLE_S = 0.2  # a pass per commit cost two DELETEs per call: wait for a pause in the calls instead
BATCH_WINDOW_S = 0.005  # the writer gathers this long after a first record: fewer commits, answer+completion merged
_COUNTERS = struct.Struct("=QQ")  # records accepted, records written (committed or lost)


def connect(path: str) -> sqlite3.Connection:
    db = connect_wal(path, 2.0, "NORMAL")  # WAL + NORMAL: durable across crashes of the process
    db.executescript(SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
    for column, decl in LATER_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE calls ADD COLUMN {column} {decl}")
    return db


_INSERT = f"INSERT INTO calls ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})"


class _Message:
    """What a worker's writer thread receives. `counted`: a record() or finish() that flush() waits for."""

    counted = True

    def apply(self, db: sqlite3.Connection) -> int:
        """Writes itself inside the writer's transaction; returns the rows it inserted."""
        return 0


@dataclass(frozen=True)
class Insert(_Message):
    row: dict[str, Any]

    def apply(self, db: sqlite3.Connection) -> int:
        db.execute(_INSERT, tuple(self.row.get(c, _DEFAULTS.get(c)) for c in COLUMNS))
        return 1


@dataclass(frozen=True)
class Finish(_Message):
    request_id: str
    cpu_ms: float | None
    max_rss_kb: int | None
    outcome: str | None = None  # replaces the answer's when the call ended otherwise (killed after answering)
    duration_ms: float | None = None

    def apply(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE calls SET cpu_ms=?, max_rss_kb=?, outcome=COALESCE(?, outcome), "
                   "duration_ms=COALESCE(?, duration_ms), complete=1 WHERE request_id=? AND complete=0",
                   (self.cpu_ms, self.max_rss_kb, self.outcome, self.duration_ms, self.request_id))
        return 0


class _Idle(_Message):
    """The queue was idle for PRUNE_IDLE_S: apply retention now."""

    counted = False


class _Stop(_Message):
    counted = False


IDLE, STOP = _Idle(), _Stop()


def _merge(batch: list[_Message]) -> list[_Message]:
    """A call's completion queued in the same batch as its row is folded into that row: one INSERT, no UPDATE."""
    rows: dict[str, int] = {}
    out: list[_Message] = []
    for m in batch:
        if isinstance(m, Insert) and not m.row.get("complete", 1):
            rows[m.row.get("request_id", "")] = len(out)
        elif isinstance(m, Finish) and m.request_id in rows:
            i = rows.pop(m.request_id)
            row = dict(out[i].row, cpu_ms=m.cpu_ms, max_rss_kb=m.max_rss_kb, complete=1)  # type: ignore[attr-defined]
            if m.outcome is not None:
                row["outcome"] = m.outcome
            if m.duration_ms is not None:
                row["duration_ms"] = m.duration_ms
            out[i] = Insert(row)
            continue
        out.append(m)
    return out


def _make_private(path: str) -> None:
    """Creates the database file 0600, or tightens one made before. Only before this process opens any SQLite
    connection to it: closing any descriptor of a file drops every POSIX lock the process holds on it."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for p in (path, path + "-wal", path + "-shm"):
            if os.path.exists(p):
                os.chmod(p, 0o600)
    except OSError as e:
        print(f"fnbox: call history: cannot make {path} private: {e}", file=sys.stderr)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat): with the pid, what tells a live
    writer from a dead one whose pid was reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class _Progress:
    """This process's two history counters (accepted, written), shared with every other process through a
    16-byte file that each reader maps: see the module docstring."""

    def __init__(self, path: str) -> None:
        self.folder = path + ".pending"
        self._map: mmap.mmap | None = None
        self._pid = -1
        self._file = ""  # this process's counters file (named by pid and start time)

    def publish(self, queued: int, done: int) -> None:
        if self._pid != os.getpid():  # first use (or a forked copy): a file of our own
            self._open()
        if self._map is not None:
            _COUNTERS.pack_into(self._map, 0, queued, done)

    def _open(self) -> None:
        self._pid = os.getpid()
        self._map = None
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            self._file = os.path.join(self.folder, f"{self._pid}-{_start_time(self._pid)}")
            fd = os.open(self._file, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, _COUNTERS.size)
                self._map = mmap.mmap(fd, _COUNTERS.size)
            finally:
                os.close(fd)
        except OSError as e:  # readers then cannot wait for this writer: they read what is committed
            print(f"fnbox: call history: cannot publish progress in {self.folder}: {e}", file=sys.stderr)

    def close(self) -> None:
        if self._map is not None and self._pid == os.getpid():
            self._map.close()
            self._map = None
            try:
                os.unlink(self._file)
            except OSError:
                pass

    def others(self) -> list[tuple[str, int]]:
        """(file, records accepted) of every other live writer; dead writers' files are removed."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        out = []
        for name in names:
            pid_s, _, start = name.partition("-")
            if not pid_s.isdigit() or int(pid_s) == os.getpid():
                continue
            path = os.path.join(self.folder, name)
            if _start_time(int(pid_s)) != start:
                try:
                    os.unlink(path)
                except OSError:
                    pass
                continue
            counters = _read_counters(path)
            if counters is not None and counters[1] < counters[0]:
                out.append((path, counters[0]))
        return out


def _read_counters(path: str) -> tuple[int, int] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(_COUNTERS.size)
    except OSError:
        return None
    return _COUNTERS.unpack(data) if len(data) == _COUNTERS.size else None


class History:
    def __init__(self, path: str, max_rows: int = 100_000, max_age_days: float = 30.0,
                 queue_size: int = 10_000, wait_s: float = 1.0) -> None:
        self.path = path
        self.max_rows, self.max_age_s = max_rows, max_age_days * 86400
        self.wait_s = wait_s
        self._queue: queue.Queue[_Message] = queue.Queue(queue_size)
        self.dropped = 0  # records lost: the queue was full or the database failed (since this worker started)
        self.errors = 0  # failed writes of the database
        self.error: str | None = None  # the last failure, until a write succeeds again
        self._since_prune = 0
        self._cond = threading.Condition()
        self._queued = 0  # records accepted so far
        self._done = 0  # of them, those the writer has finished with (committed or lost)
        self._closed = False
        self._progress = _Progress(path)
        _make_private(path)
        self._thread = threading.Thread(target=self._writer, name="fnbox-history", daemon=True)
        self._thread.start()

    # -- writing ---------------------------------------------------------------------------------------------
    def record(self, rec: dict[str, Any], wait: bool = True) -> None:
        """Queues one call's record. With `wait`, waits (at most wait_s; not at all while the database fails)
        until the writer has committed it; without, returns at once: flush() in any process waits for it."""
        with self._cond:
            try:
                self._queue.put_nowait(Insert(rec))
            except queue.Full:
                self.dropped += 1
                return
            self._queued += 1
            seq = self._queued
            self._progress.publish(self._queued, self._done)
            if wait and self.wait_s > 0 and self.error is None and not self._closed and self._thread.is_alive():
                self._cond.wait_for(lambda: self._done >= seq, self.wait_s)

    def finish(self, request_id: str, cpu_ms: float | None, max_rss_kb: int | None, outcome: str | None = None,
               duration_ms: float | None = None) -> None:
        """Completes a call's row once its processes are gone (the answer went out before that); `outcome` and
        `duration_ms` replace the answer's when the call ended otherwise (a function that answered and kept
        running until its timeout). Never waits: it runs on the runner's reader thread."""
        with self._cond:
            try:
                self._queue.put_nowait(Finish(request_id, cpu_ms, max_rss_kb, outcome, duration_ms))
            except queue.Full:
                self.dropped += 1
                return
            self._queued += 1
            self._progress.publish(self._queued, self._done)

    def flush(self, timeout: float = 2.0) -> bool:
        """Waits (bounded) until every record this worker and every other live writer (the server's other
        workers) had accepted is written. Retention is not waited for: it runs when the calls pause, and a read
        must not wait for that pause."""
        deadline = time.monotonic() + timeout
        others = self._progress.others()
        with self._cond:
            ok = self._cond.wait_for(lambda: self._done >= self._queued, timeout)
        for path, target in others:
            while True:
                counters = _read_counters(path)
                if counters is None or counters[1] >= target:
                    break
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.002)
        return ok

    def close(self, timeout: float = 2.0) -> None:
        self.flush(timeout)
        self._closed = True
        try:
            self._queue.put_nowait(STOP)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._progress.close()

    def _open(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """The writer's connection, and the identity of the file it opened. A database file that is missing
        (removed while the server runs) is created 0600 first, as at start; a file a reader connection created
        meanwhile is made private by path (closing a descriptor of our own would drop the process's locks)."""
        if not os.path.exists(self.path):
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            except OSError:
                pass  # created by a reader meanwhile (chmod below), or not creatable: connect() says why
        db = connect(self.path)
        try:
            st = os.stat(self.path)
            for p in (self.path, self.path + "-wal", self.path + "-shm"):
                if os.path.exists(p):
                    os.chmod(p, 0o600)
        except OSError as e:
            db.close()
            raise sqlite3.OperationalError(str(e)) from None
        return db, (st.st_dev, st.st_ino)

    def _replaced(self, ident: tuple[int, int]) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != ident

    def _writer(self) -> None:
        db: sqlite3.Connection | None = None
        ident = (0, 0)
        while True:
            try:
                first = self._queue.get(timeout=PRUNE_IDLE_S if self._since_prune else None)
            except queue.Empty:
                first = IDLE  # calls paused: apply retention now
            if first is STOP:
                return
            if first.counted and BATCH_WINDOW_S:
                time.sleep(BATCH_WINDOW_S)  # let the calls of the next few ms (and this one's completion) join
            batch = [first]
            while len(batch) < 500:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is STOP:
                    self._queue.put(STOP)
                    break
                batch.append(nxt)
            counted = sum(1 for m in batch if m.counted)
            batch = _merge(batch)
            try:
                if db is not None and self._replaced(ident):
                    # Removed or replaced under us (an operator moving a corrupt file aside, a restore): our
                    # connection would go on writing into the old file, where nobody ever reads it.
                    print(f"fnbox: call history: {self.path} was removed or replaced; reopening it", file=sys.stderr)
                    db.close()
                    db = None
                if db is None:
                    db, ident = self._open()
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    self._since_prune += sum(m.apply(db) for m in batch)
                    if self._since_prune >= PRUNE_EVERY or (first is IDLE and self._since_prune):
                        self._prune(db)
                        self._since_prune = 0
                self.error = None
            except sqlite3.Error as e:
                self.dropped += counted
                self.errors += 1
                if self.error != str(e):
                    print(f"fnbox: call history: {e}; {counted} records lost, retrying on the next call",
                          file=sys.stderr)
                self.error = str(e)
                if db is not None:
                    try:
                        db.close()
                    except sqlite3.Error:
                        pass
                db = None
            finally:
                with self._cond:
                    self._done += counted
                    self._progress.publish(self._queued, self._done)
                    self._cond.notify_all()

    def _prune(self, db: sqlite3.Connection) -> None:
        """Retention, inside the writer's transaction: both deletes walk an index."""
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

    def _read_complete(self, sql: str, args: tuple, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Rows whose calls are over: a call answered a moment ago may still be finishing (its CPU and peak memory
        come with the end of its processes, a few ms after the answer), so wait for that, bounded."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self._read(sql, args)
            if all(r["complete"] for r in rows) or time.monotonic() > deadline:
                for r in rows:
                    del r["complete"]
                return rows
            time.sleep(0.01)

    def calls(self, function: str, limit: int = 50, outcome: str | None = None, errors: bool = False,
              since: float | None = None) -> list[dict[str, Any]]:
        """The function's newest calls first; `errors`: only those that did not end ok; `since`: unix time."""
        where, args = ["function=?"], [function]
        if outcome:
            where.append("outcome=?")
            args.append(outcome)
        if errors:
            where.append("outcome != 'ok'")
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        return self._read_complete(f"SELECT * FROM calls WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                                   (*args, limit))

    def known(self, function: str) -> bool:
        return bool(self._read("SELECT 1 FROM calls WHERE function=? LIMIT 1", (function,)))

    def health(self) -> dict[str, Any]:
        """This worker's writer: records lost so far and the database's last error (None once writes work), once
        what it had accepted is written (bounded): a call answered just before is counted."""
        with self._cond:
            self._cond.wait_for(lambda: self._done >= self._queued, 1.0)
        return {"dropped": self.dropped, "write_errors": self.errors, "error": self.error}

    def call(self, request_id: str) -> dict[str, Any] | None:
        rows = self._read_complete("SELECT * FROM calls WHERE request_id=? ORDER BY id DESC LIMIT 1", (request_id,))
        return rows[0] if rows else None

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self._read("SELECT function, outcome, COUNT(*) AS n FROM calls GROUP BY function, outcome", ()):
            out.setdefault(r["function"], {})[r["outcome"]] = r["n"]
        return out

    def count(self) -> int:
        return self._read("SELECT COUNT(*) AS n FROM calls", ())[0]["n"]

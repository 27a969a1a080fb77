"""The console's own state in SQLite, shared by every Gunicorn worker: sessions, rate-limit attempts, and the
request headers of recent calls (the call history keeps no headers).

Sessions are server-side: the cookie holds a random id and the table only its SHA-256, so logging out (or
expiry) ends a session for good, and a copy of the database does not hold usable cookies.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import secrets
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from gateway.sqlite_wal import connect_wal

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY, role TEXT NOT NULL, csrf TEXT NOT NULL, client TEXT,
    created REAL NOT NULL, last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (key TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS attempts_key ON attempts (key, time);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, time REAL NOT NULL,
    query TEXT, headers TEXT, client TEXT
);
CREATE INDEX IF NOT EXISTS requests_rid ON requests (request_id);
"""
MAX_SESSION_AGE_S = 7 * 86400  # even a session in constant use signs in again after a week
REQUESTS_KEEP = 100_000  # request headers kept (the history's default row count)


@dataclass(frozen=True)
class Session:
    id_hash: str
    role: str  # "admin" or "playground"
    csrf: str


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class ConsoleStore:
    def __init__(self, path: str, idle_s: float) -> None:
        self.path = path
        self.idle_s = idle_s
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.chmod(path, 0o600)
        except OSError as e:
            print(f"fnbox: console: cannot create {path}: {e}", file=sys.stderr)
        with self._db() as db:
            db.executescript(SCHEMA)
        self._queue: queue.Queue[tuple | None] = queue.Queue(10_000)
        self._thread = threading.Thread(target=self._writer, name="fnbox-console-requests", daemon=True)
        self._thread.start()

    def _db(self) -> sqlite3.Connection:
        return connect_wal(self.path, 5.0, "NORMAL")

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        db = self._db()
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    # -- sessions --------------------------------------------------------------------------------------------
    def create_session(self, role: str, client: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        s = Session(_hash(sid), role, secrets.token_urlsafe(32))
        now = time.time()
        self._run("INSERT INTO sessions VALUES (?,?,?,?,?,?)", (s.id_hash, role, s.csrf, client, now, now))
        return sid, s

    def session(self, sid: str) -> Session | None:
        if not sid or len(sid) > 100:
            return None
        now = time.time()
        h = _hash(sid)
        rows = self._run("SELECT role, csrf, created, last_used FROM sessions WHERE id_hash=?", (h,))
        if not rows:
            return None
        role, csrf, created, last_used = rows[0]
        if now - last_used > self.idle_s or now - created > MAX_SESSION_AGE_S:
            self.end_session(sid)
            return None
        if now - last_used > 60:  # one write a minute per session, not one per request
            self._run("UPDATE sessions SET last_used=? WHERE id_hash=?", (now, h))
        return Session(h, role, csrf)

    def end_session(self, sid: str) -> None:
        self._run("DELETE FROM sessions WHERE id_hash=?", (_hash(sid),))

    # -- rate limits -----------------------------------------------------------------------------------------
    def over_limit(self, key: str, limit: int, window_s: float, count: bool = True) -> float:
        """0 when one more attempt under `key` fits in `limit` per `window_s` (and, with count, records it);
        else the seconds until it will."""
        now = time.time()
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")  # check and record as one step, across workers
            db.execute("DELETE FROM attempts WHERE time < ?", (now - 3600,))
            times = [t for (t,) in db.execute("SELECT time FROM attempts WHERE key=? AND time > ? ORDER BY time",
                                              (key, now - window_s))]
            if len(times) >= limit:
                db.execute("COMMIT")
                return max(1.0, times[0] + window_s - now)
            if count:
                db.execute("INSERT INTO attempts VALUES (?,?)", (key, now))
            db.execute("COMMIT")
            return 0.0
        finally:
            db.close()

    def record_attempt(self, key: str) -> None:
        self._run("INSERT INTO attempts VALUES (?,?)", (key, time.time()))

    def clear_attempts(self, key: str) -> None:
        self._run("DELETE FROM attempts WHERE key=?", (key,))

    # -- request headers of calls ----------------------------------------------------------------------------
    def record_request(self, request_id: str, query: str, headers: list[tuple[str, str]], client: str) -> None:
        """Queued, never waits: it runs after every function call."""
        try:
            self._queue.put_nowait((request_id, time.time(), query, headers, client))  # JSON in the writer
        except queue.Full:
            pass

    def request(self, request_id: str) -> dict[str, Any] | None:
        self.flush()
        rows = self._run("SELECT query, headers, client FROM requests WHERE request_id=? ORDER BY id DESC LIMIT 1",
                         (request_id,))
        if not rows:
            return None
        query, headers, client = rows[0]
        return {"query": query, "headers": json.loads(headers), "client": client}

    def flush(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _writer(self) -> None:
        db: sqlite3.Connection | None = None
        since_prune = 0
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            while len(batch) < 500:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(nxt)
            try:
                db = db or self._db()
                rows = [(rid, t, q, json.dumps(h), c) for rid, t, q, h, c in (b for b in batch if b is not None)]
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany("INSERT INTO requests (request_id, time, query, headers, client) VALUES "
                                   "(?,?,?,?,?)", rows)
                    since_prune += len(rows)
                    if since_prune >= 500:
                        db.execute("DELETE FROM requests WHERE id <= (SELECT MAX(id) FROM requests) - ?",
                                   (REQUESTS_KEEP,))
                        since_prune = 0
            except sqlite3.Error as e:
                print(f"fnbox: console: request headers not recorded: {e}", file=sys.stderr)
                if db is not None:
                    db.close()
                db = None
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(2.0)

"""Opening the server's SQLite databases (history, queue, console) in WAL mode, safely from several processes.

Every Gunicorn worker opens the same files as it boots. Switching a new database to WAL needs an exclusive
lock, and SQLite answers a second process that asks at the same moment with "database is locked" at once,
without waiting for its busy timeout: a worker that gave up then would fail to boot and take the whole server
down. So the switch is retried, bounded by the connection's own timeout.

Each connection's page cache is bounded to CACHE_KIB: these databases are appended to and read by key, and
SQLite's default (2 MB per connection) let every worker's memory grow with the history's size, and the queue
has a connection per request thread.
"""

from __future__ import annotations

import sqlite3
import time

CACHE_KIB = 256


def connect_wal(path: str, timeout: float, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.01)
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # negative: KiB, not pages
    return db

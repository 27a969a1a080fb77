"""Every worker opens the server's databases as it boots: opening a new one from several processes at once must
never fail with "database is locked" (a worker that failed so would take the whole server down)."""

from __future__ import annotations

import multiprocessing
import os

from gateway.sqlite_wal import CACHE_KIB, connect_wal


def _open(path: str, go: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    go.wait(10)
    try:
        db = connect_wal(path, 5.0, "NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
        out.put(db.execute("PRAGMA journal_mode").fetchone()[0])
        db.close()
    except Exception as e:  # reported, never raised in the child
        out.put(repr(e))


def test_many_processes_open_a_new_database_at_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(20):  # the race is narrow: without the retry about one round in ten hits it
        path = os.path.join(tmp_path, f"db{round_}.sqlite3")
        go, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(path, go, out)) for _ in range(8)]
        for p in procs:
            p.start()
        go.set()
        results = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        assert results == ["wal"] * len(procs), results


def test_a_connection_keeps_a_small_page_cache(tmp_path):
    """The history, queue and console connections live as long as their worker (the queue's, one per request
    thread): each one's page cache is bounded, not SQLite's 2 MB default."""
    db = connect_wal(str(tmp_path / "x.sqlite3"), 2.0, "NORMAL")
    try:
        assert db.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()

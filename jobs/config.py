"""Settings of the queue side, read from the environment once, validated in one place, frozen."""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass

from runner.config import ConfigError, env_float


def valid_board(name: str) -> bool:
    """A board's name (FNBOX_BOARD): letters, digits, '-', '_' and '.', at most 64 characters."""
    return name.replace("-", "").replace("_", "").replace(".", "").isalnum() and len(name) <= 64


def _hostport(item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"FNBOX_CALLBACK_ALLOW: {item!r} must be host:port, e.g. 127.0.0.1:9000")
    return host.strip("[]").lower(), int(port)


@dataclass(frozen=True)
class JobSettings:
    board: str  # this board's name in call records and logs (FNBOX_BOARD, default the host name)
    redis_url: str | None  # set: RQ on Redis (several boards); unset: the embedded SQLite queue
    queue_max: int  # calls waiting in the queue; one more is 503 busy
    concurrency: int  # queued calls one Gunicorn worker runs at once (0: leave them to `fnbox worker`)
    retention_s: float  # how long a finished call's record (and result) is kept
    callback_allow: frozenset[tuple[str, int]]  # host:port pairs a callback may be POSTed to
    callback_retries: int
    schedules: bool  # whether this process fires schedule ticks
    schedule_late_s: float | None  # a tick noticed later than this is missed (None: its period, in 5..60 s)
    board_url: str = "http://127.0.0.1:8000"  # where other boards reach this one's admin API (FNBOX_BOARD_URL)
    board_timeout_s: float = 3.0  # how long a listing of every board's calls waits for one board

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> JobSettings:
        env = dict(os.environ if env is None else env)
        allow = frozenset(_hostport(i.strip()) for i in env.get("FNBOX_CALLBACK_ALLOW", "").split(",") if i.strip())
        redis_url = env.get("FNBOX_REDIS_URL") or None
        if redis_url:
            u = urllib.parse.urlsplit(redis_url)
            if u.scheme not in ("redis", "rediss") or not u.password:
                raise ConfigError("FNBOX_REDIS_URL must be redis://:PASSWORD@host:port/db (Redis without a "
                                  "password is refused: see docs/cluster.md)")
        board = env.get("FNBOX_BOARD") or socket.gethostname()
        if not valid_board(board):
            raise ConfigError(f"FNBOX_BOARD={board!r}: letters, digits, '-', '_' and '.' only, at most 64")
        board_url = (env.get("FNBOX_BOARD_URL") or f"http://{env.get('FNBOX_BIND') or '127.0.0.1:8000'}").rstrip("/")
        u = urllib.parse.urlsplit(board_url)
        if u.scheme not in ("http", "https") or not u.hostname or u.username or u.query or u.fragment:
            raise ConfigError(f"FNBOX_BOARD_URL={board_url!r}: must be http(s)://host:port, where the other boards "
                              "reach this board's Gunicorn")
        return cls(
            board=board,
            board_url=board_url,
            board_timeout_s=env_float(env, "FNBOX_BOARD_TIMEOUT_S", 3.0, 0.1),
            redis_url=redis_url,
            queue_max=int(env_float(env, "FNBOX_QUEUE_MAX", 10_000, 1)),
            concurrency=int(env_float(env, "FNBOX_ASYNC_CONCURRENCY", 2, 0)),
            retention_s=env_float(env, "FNBOX_CALLS_RETENTION_S", 7 * 86400, 1),
            callback_allow=allow,
            callback_retries=int(env_float(env, "FNBOX_CALLBACK_RETRIES", 5, 0)),
            schedules=env.get("FNBOX_SCHEDULES", "1") != "0",
            schedule_late_s=env_float(env, "FNBOX_SCHEDULE_LATE_S", 0, 0) or None,
        )

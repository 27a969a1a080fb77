"""Which boards are up, and where their admin API answers: each board's Gunicorn workers refresh
fnbox:board:<name> = its URL (FNBOX_BOARD_URL, default http://FNBOX_BIND) every few seconds, with an expiry,
so the boards listed are those alive now. Used to show the call history of every board in one place."""

from __future__ import annotations

import sys
import threading

import redis

TTL_S = 15
EVERY_S = 5.0


class BoardRegistry:
    def __init__(self, url: str, board: str, advertised: str) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        self.board, self.advertised = board, advertised.rstrip("/")
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="fnbox-board", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                self.r.set(f"fnbox:board:{self.board}", self.advertised, ex=TTL_S)
            except redis.RedisError as e:
                print(f"fnbox: board registry: {e}", file=sys.stderr)
            if self._stop.wait(EVERY_S):
                return

    def boards(self) -> dict[str, str]:
        """name -> URL of every board alive now (this one included)."""
        out = {self.board: self.advertised}
        keys = list(self.r.scan_iter(match="fnbox:board:*", count=100))
        for key, url in zip(keys, self.r.mget(keys) if keys else [], strict=True):
            if url:
                out[key.decode().split(":", 2)[2]] = url.decode()
        return out

"""Which boards there are, and where their admin API answers: each board's Gunicorn workers write
{url, seen} into the Redis hash fnbox:boards under the board's name every few seconds (the URL is
FNBOX_BOARD_URL, default http://FNBOX_BIND). Used to show the calls of every board in one place
(gateway/board_calls.py).

A board that stopped writing is still listed for FORGET_S: its calls are still somewhere, so a listing that
cannot reach it says so (`unreachable`) rather than silently showing fewer calls. A board taken out of the
cluster for good is forgotten after that, or at once with `HDEL fnbox:boards NAME`."""

from __future__ import annotations

import json
import sys
import threading
import time

import redis

KEY = "fnbox:boards"
EVERY_S = 5.0
FORGET_S = 86400.0


class BoardRegistry:
    def __init__(self, url: str, board: str, advertised: str) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=2)
        self.board, self.advertised = board, advertised.rstrip("/")
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="fnbox-board", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                self.r.hset(KEY, self.board, json.dumps({"url": self.advertised, "seen": time.time()}))
            except redis.RedisError as e:
                print(f"fnbox: board registry: {e}", file=sys.stderr)
            if self._stop.wait(EVERY_S):
                return

    def boards(self) -> dict[str, str]:
        """name -> admin URL of every board heard of in the last FORGET_S (this one included). Raises
        redis.RedisError when Redis cannot be asked."""
        out = {self.board: self.advertised}
        now = time.time()
        for name, raw in self.r.hgetall(KEY).items():
            try:
                doc = json.loads(raw)
                url, seen = str(doc["url"]), float(doc["seen"])
            except (ValueError, KeyError, TypeError):
                continue
            if now - seen < FORGET_S and url.startswith(("http://", "https://")):
                out.setdefault(name.decode(), url.rstrip("/"))
        return out

"""The deploy channel of several boards: a deploy, rollback or delete on any board is applied by every board.

The board that changed a function publishes the code it now serves (the module's source, or the package as a
tar.gz) with a sequence number, in Redis (fnbox:deploy:<name>, and a message on the fnbox:deploys channel).
Every Gunicorn worker of every board listens; the first worker of a board to see a newer sequence applies it
through that board's FunctionStore (so it is validated, versioned and switched atomically there too), under a
board-wide file lock, and notes the sequence in <data>/cluster-applied.json. A board that was down or cut off
from Redis catches up when it (re)connects. Version numbers stay each board's own; the code served is the same.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import sys
import tarfile
import threading
import time
from typing import Any

import redis

from gateway.deploy import DeployError, FunctionStore

CHANNEL = "fnbox:deploys"


def current_code(store: FunctionStore, name: str) -> bytes | None:
    """What `name` serves now, as a deploy would send it; None if it has no deployed version."""
    cur = store.current(name)
    if cur is None:
        return None
    vdir = os.path.join(store.versions_dir, name, str(cur))
    module = os.path.join(vdir, name + ".py")
    with open(os.path.join(vdir, "meta.json")) as f:
        kind = json.load(f)["kind"]
    if kind == "module":
        with open(module, "rb") as f:
            return f.read()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for root, dirs, files in os.walk(vdir):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for fn in files:
                full = os.path.join(root, fn)
                rel = os.path.relpath(full, vdir)
                if rel != "meta.json" and os.path.isfile(full) and not os.path.islink(full):
                    tf.add(full, arcname=rel, recursive=False)
    return buf.getvalue()


class DeployChannel:
    def __init__(self, url: str, store: FunctionStore, data_dir: str, board: str) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=3)
        self.store, self.board = store, board
        self.applied_path = os.path.join(data_dir, "cluster-applied.json")
        self.lock_path = os.path.join(data_dir, "cluster-applied.lock")
        self._stop = threading.Event()

    # -- this board's record of what it applied ------------------------------------------------------------------
    def _locked(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _applied(self) -> dict[str, int]:
        try:
            with open(self.applied_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _note(self, applied: dict[str, int]) -> None:
        tmp = self.applied_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(applied, f)
        os.replace(tmp, self.applied_path)

    # -- publishing ----------------------------------------------------------------------------------------------
    def publish(self, op: str, name: str) -> None:
        """After a deploy/rollback/delete here: tell every board what `name` serves now."""
        code = current_code(self.store, name) if op != "delete" else None
        fd = self._locked()
        try:
            seq = int(self.r.incr("fnbox:deploy_seq"))
            event = {"seq": seq, "op": "delete" if code is None else "deploy", "name": name, "board": self.board,
                     "version": self.store.current(name), "time": time.time(),
                     "code": base64.b64encode(code).decode() if code is not None else None}
            with self.r.pipeline() as pipe:
                pipe.hset("fnbox:deploy", name, json.dumps(event))
                pipe.publish(CHANNEL, json.dumps({"seq": seq, "name": name}))
                pipe.execute()
            applied = self._applied()
            applied[name] = seq
            self._note(applied)
        finally:
            os.close(fd)

    # -- applying ------------------------------------------------------------------------------------------------
    def sync(self, names: list[str] | None = None) -> int:
        """Applies every function whose latest event is newer than what this board applied; how many."""
        events = self.r.hgetall("fnbox:deploy") if names is None else \
            dict(zip(names, self.r.hmget("fnbox:deploy", names), strict=True))
        n = 0
        fd = self._locked()
        try:
            applied = self._applied()
            for raw_name, raw in events.items():
                if raw is None:
                    continue
                name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
                ev: dict[str, Any] = json.loads(raw)
                if ev["seq"] <= applied.get(name, 0):
                    continue
                try:
                    if ev["op"] == "delete":
                        self.store.delete(name)
                    else:
                        self.store.deploy(name, base64.b64decode(ev["code"]))
                except DeployError as e:
                    print(f"fnbox: deploy channel: {name} from board {ev['board']}: {e.message}", file=sys.stderr)
                applied[name] = ev["seq"]
                self._note(applied)
                n += 1
        finally:
            os.close(fd)
        return n

    def start(self) -> None:
        threading.Thread(target=self._listen, name="fnbox-deploys", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                ps = self.r.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(CHANNEL)
                self.sync()  # what was published while this board was away
                while not self._stop.is_set():
                    msg = ps.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        self.sync([json.loads(msg["data"])["name"]])
            except (redis.RedisError, OSError, ValueError) as e:
                print(f"fnbox: deploy channel: {e}; reconnecting", file=sys.stderr)
                self._stop.wait(1.0)

"""The queue of several boards: RQ on Redis (FNBOX_REDIS_URL).

RQ carries the queue itself: each queued attempt is an RQ job on the `fnbox` queue, taken with RQ's reliable
dequeue (BLMOVE into its intermediate list, so a job taken by a board that dies is not lost) and delayed retries
go through RQ's ScheduledJobRegistry. What RQ would execute is never executed: every job is serialized as JSON
(never pickle), names one fixed function (FIXED_FUNCTION) with one argument, the call id, and a job naming
anything else is dropped unread. The call itself (the request as data, attempts, result) is a JSON document
under fnbox:call:<id>, the same record as the embedded queue's (jobs.calls.Call).

Keys: fnbox:call:<id> (the record; expires `retention` after the call ended), fnbox:idx (all calls by time),
fnbox:idx:<state> (ids by state), fnbox:cb (callbacks due, by time), fnbox:tick:<function>:<time> (a claimed
schedule tick), fnbox:marks (the last tick each schedule looked at), fnbox:alive:<owner> (a live executor).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from jobs.calls import CB_PENDING, DONE, FAILED, QUEUED, RUNNING, STATES, Call
from jobs.store import QueueFull, QueueUnavailable

FIXED_FUNCTION = "jobs.rq_backend.run_call"
QUEUE_NAME = "fnbox"
ALIVE_TTL_S = 10  # an executor that has not said it is alive for this long is dead
_MARK = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v or tonumber(v) < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


def run_call(call_id: str) -> None:
    """The one function every fnbox job names. RQ workers are never used: fnbox's executor reads the job's
    argument as data and runs the call through its sandbox; this exists so the name resolves."""
    raise RuntimeError("fnbox jobs are run by fnbox's executor, not by an RQ worker")


class RedisQueue:
    blocking = True  # claim() waits for a job itself

    def __init__(self, url: str, queue_max: int, retention_s: float) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=10)
        self.queue_max = queue_max
        self.retention_s = retention_s
        self.q = Queue(QUEUE_NAME, connection=self.r, serializer=JSONSerializer, default_timeout=-1)
        self._mark = self.r.register_script(_MARK)
        self._seen_intermediate: dict[str, float] = {}
        self._scheduler = RQScheduler([self.q], connection=self.r, serializer=JSONSerializer)

    # -- records -------------------------------------------------------------------------------------------------
    @staticmethod
    def _key(call_id: str) -> str:
        return f"fnbox:call:{call_id}"

    def _write(self, pipe: Any, c: Call) -> None:
        key = self._key(c.id)
        pipe.set(key, c.to_json())
        pipe.zadd("fnbox:idx", {c.id: c.created})
        for s in STATES:
            if s != c.state:
                pipe.zrem(f"fnbox:idx:{s}", c.id)
        pipe.zadd(f"fnbox:idx:{c.state}", {c.id: c.created})
        if c.state in (DONE, FAILED) and not (c.callback and c.callback.get("state") == CB_PENDING):
            pipe.expire(key, int(self.retention_s) + 1)
        else:
            pipe.persist(key)
        cb = c.callback or {}
        if cb.get("state") == CB_PENDING and c.state in (DONE, FAILED):
            pipe.zadd("fnbox:cb", {c.id: max(cb.get("next_at") or 0, cb.get("lease_until") or 0)})
        else:
            pipe.zrem("fnbox:cb", c.id)

    def _enqueue_job(self, c: Call, pipe: Any = None) -> None:
        delay = c.run_at - time.time()
        kw = {"args": (c.id,), "result_ttl": 0, "failure_ttl": int(self.retention_s), "timeout": -1}
        if delay > 0.05:
            self.q.enqueue_at(datetime.fromtimestamp(c.run_at, UTC), FIXED_FUNCTION, c.id, result_ttl=0,
                              job_timeout=-1)
        else:
            self.q.enqueue_call(FIXED_FUNCTION, pipeline=pipe, **kw)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except redis.RedisError as e:
            raise QueueUnavailable(f"the queue (Redis) is not reachable: {e}") from None

    # -- the call's life ----------------------------------------------------------------------------------------
    def add(self, c: Call) -> None:
        def go() -> None:
            n = self.q.count + self._scheduled_count()
            if n >= self.queue_max:
                raise QueueFull(f"the queue already holds {n} calls (FNBOX_QUEUE_MAX)")
            with self.r.pipeline() as pipe:
                self._write(pipe, c)
                pipe.execute()
            self._enqueue_job(c)

        self._guard(go)

    def _scheduled_count(self) -> int:
        return int(self.r.zcard(f"rq:scheduled:{QUEUE_NAME}"))

    def claim(self, owner: str, lease_for: Callable[[str], float]) -> Call | None:
        """Takes the next RQ job (blocking up to 1 s), and the call it names, now RUNNING under owner."""
        try:
            got = Queue.dequeue_any([self.q], timeout=1, connection=self.r, serializer=JSONSerializer)
        except redis.RedisError as e:
            raise QueueUnavailable(str(e)) from None
        except Exception as e:  # a job RQ cannot even read (a malformed hash): not ours
            job_id = getattr(e, "job_id", None)  # RQ names it; its id is in the intermediate list: drop it there
            if isinstance(job_id, str):
                print(f"fnbox: queue: dropped job {job_id}: it cannot be read as an fnbox job ({type(e).__name__})",
                      file=sys.stderr)
                self._guard(lambda: self._drop_job_id(job_id))
            return None
        if got is None:
            return None
        job, _ = got
        call_id = self._job_call_id(job)
        if call_id is None:
            self._guard(lambda: self._drop_job(job))
            return None
        now = time.time()

        def take(c: Call) -> bool:
            if c.state != QUEUED:
                return False  # a duplicate job of a call already taken (a recovery raced its runner)
            c.state, c.owner, c.started, c.finished = RUNNING, owner, now, None
            c.ran_on = owner.split("/")[0]
            c.lease_until = now + lease_for(c.function)
            c.attempts += 1
            return True

        # The call first, the job after: if Redis goes away in between, the job is still in RQ's intermediate
        # list and maintain() puts it back; a job whose call is taken already is then just dropped.
        c = self._modify(call_id, take, requeue=False)
        try:
            self._drop_job(job)
        except redis.RedisError:
            pass  # the call is ours now: run it; maintain() pushes the job back later and its claim drops it
        if c is None or c.state != RUNNING or c.owner != owner or c.started != now:
            return None
        return c

    def _job_call_id(self, job: Job) -> str | None:
        """The call id a job carries, only if it names the fixed function with exactly one string argument."""
        try:
            if job.func_name != FIXED_FUNCTION or len(job.args) != 1 or job.kwargs:
                raise ValueError(job.func_name)
            (call_id,) = job.args
            return call_id if isinstance(call_id, str) and len(call_id) == 32 else None
        except Exception:
            print(f"fnbox: queue: dropped job {job.id}: it does not name {FIXED_FUNCTION}(call_id)", file=sys.stderr)
            return None

    def _drop_job(self, job: Job) -> None:
        self._drop_job_id(job.id)

    def _drop_job_id(self, job_id: str) -> None:
        """Removes a taken job from RQ's intermediate list (so maintain() never puts it back) and its hash."""
        with self.r.pipeline() as pipe:
            pipe.lrem(IntermediateQueue(self.q.key, self.r).key, 1, job_id)
            pipe.delete(Job.key_for(job_id))
            pipe.execute()

    def update(self, c: Call, owner: str | None = None) -> bool:
        def change(x: Call) -> bool:
            if owner is not None and (x.state != RUNNING or x.owner != owner):
                return False
            x.__dict__.update(c.__dict__)
            return True

        written = self._modify(c.id, change, requeue=True)
        return written is not None and written.owner == c.owner and written.state == c.state

    def modify(self, call_id: str, fn: Callable[[Call], bool]) -> Call | None:
        return self._modify(call_id, fn, requeue=True)

    def _modify(self, call_id: str, fn: Callable[[Call], bool], requeue: bool) -> Call | None:
        key = self._key(call_id)

        def go() -> Call | None:
            with self.r.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        raw = pipe.get(key)
                        if raw is None:
                            pipe.unwatch()
                            return None
                        c = Call.from_json(raw)
                        was = c.state
                        if not fn(c):
                            pipe.unwatch()
                            return c
                        pipe.multi()
                        self._write(pipe, c)
                        pipe.execute()
                        if requeue and c.state == QUEUED and was != QUEUED:
                            self._enqueue_job(c)
                        return c
                    except redis.WatchError:
                        continue

        return self._guard(go)

    def get(self, call_id: str) -> Call | None:
        raw = self._guard(lambda: self.r.get(self._key(call_id)))
        return Call.from_json(raw) if raw else None

    def list(self, state: str | None = None, limit: int = 100) -> list[Call]:
        def go() -> list[Call]:
            index = f"fnbox:idx:{state}" if state else "fnbox:idx"
            ids = self.r.zrevrange(index, 0, limit - 1)
            out = []
            for raw in self.r.mget([self._key(i.decode()) for i in ids]) if ids else []:
                if raw:
                    out.append(Call.from_json(raw))
            return out

        return self._guard(go)

    def running(self) -> list[Call]:
        return self.list(RUNNING, 100_000)

    def counts(self) -> dict[str, int]:
        return self._guard(lambda: {s: int(self.r.zcard(f"fnbox:idx:{s}")) for s in STATES})

    # -- liveness of executors on other boards ---------------------------------------------------------------------
    def heartbeat(self, owner: str) -> None:
        self._guard(lambda: self.r.set(f"fnbox:alive:{owner}", "1", ex=ALIVE_TTL_S))

    def owner_alive(self, owner: str) -> bool:
        return bool(self._guard(lambda: self.r.exists(f"fnbox:alive:{owner}")))

    def maintain(self) -> None:
        """RQ's side of the upkeep: due retries move from the scheduled registry to the queue (one board at a
        time, under RQ's scheduler lock); a job left in RQ's intermediate list by a board that died between
        taking it and claiming its call goes back to the queue."""
        def go() -> None:
            if self._scheduler.acquire_locks():
                self._scheduler.enqueue_scheduled_jobs()
            inter = IntermediateQueue(self.q.key, self.r)
            now = time.time()
            ids = set(inter.get_job_ids())
            for job_id in ids:
                first = self._seen_intermediate.setdefault(job_id, now)
                if now - first > 10:
                    with self.r.pipeline() as pipe:
                        pipe.lrem(inter.key, 1, job_id)
                        pipe.rpush(self.q.key, job_id)
                        pipe.execute()
                    self._seen_intermediate.pop(job_id, None)
            for job_id in list(self._seen_intermediate):
                if job_id not in ids:
                    del self._seen_intermediate[job_id]

        self._guard(go)

    # -- callbacks ----------------------------------------------------------------------------------------------
    def claim_callback(self, lease_s: float) -> Call | None:
        now = time.time()

        def go() -> Call | None:
            for raw in self.r.zrangebyscore("fnbox:cb", 0, now, start=0, num=5):
                call_id = raw.decode()
                leased: dict[str, bool] = {}

                def lease(c: Call, leased: dict[str, bool] = leased) -> bool:
                    # Run again after a WatchError (another board wrote the call meanwhile): only the attempt
                    # that commits may count, or two boards would both deliver the callback.
                    leased.clear()
                    cb = c.callback or {}
                    if cb.get("state") != CB_PENDING or (cb.get("next_at") or 0) > now or \
                            (cb.get("lease_until") or 0) > now:
                        return False
                    cb["lease_until"] = now + lease_s
                    c.callback = cb
                    leased["ok"] = True
                    return True

                c = self._modify(call_id, lease, requeue=False)
                if c is not None and leased:
                    return c
                if c is None:
                    self.r.zrem("fnbox:cb", call_id)
            return None

        return self._guard(go)

    # -- schedules ----------------------------------------------------------------------------------------------
    def add_tick(self, c: Call, scheduled: float) -> bool:
        key = f"fnbox:tick:{c.function}:{scheduled:.3f}"
        if not self._guard(lambda: self.r.set(key, c.id, nx=True, ex=int(max(self.retention_s, 86400)))):
            return False
        with self.r.pipeline() as pipe:
            self._write(pipe, c)
            pipe.execute()
        self._enqueue_job(c)
        return True

    def last_tick(self, function: str) -> float | None:
        raw = self._guard(lambda: self.r.hget("fnbox:marks", function))
        return float(raw) if raw else None

    def mark_tick(self, function: str, scheduled: float) -> None:
        self._guard(lambda: self._mark(keys=["fnbox:marks"], args=[function, repr(scheduled)]))

    # -- retention ----------------------------------------------------------------------------------------------
    def prune(self, retention_s: float) -> int:
        """Records expire by themselves; the indexes forget ids whose record is gone."""
        def go() -> int:
            n = 0
            for index in ["fnbox:idx", *(f"fnbox:idx:{s}" for s in (DONE, FAILED))]:
                old = self.r.zrangebyscore(index, 0, time.time() - retention_s)
                gone = [i for i, raw in zip(old, self.r.mget([self._key(i.decode()) for i in old]) if old else [],
                                            strict=True) if raw is None]
                if gone:
                    n += self.r.zrem(index, *gone)
            return n

        return self._guard(go)

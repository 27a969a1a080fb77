"""The Redis queue's own guarantees, against a real redis-server, with two boards' queues side by side."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from jobs.calls import CB_PENDING, DONE, Call, new_id
from jobs.rq_backend import RedisQueue
from tests.rediskit import RedisServer


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


def test_a_callback_claimed_by_another_board_mid_transaction_is_delivered_once(redis_url):
    """Board B leases the callback between board A's WATCH and its EXEC: A's transaction fails and is retried,
    finds the lease taken, and A does not deliver too (CI saw a callback POSTed twice by a 3-board cluster)."""
    a, b = RedisQueue(redis_url, 100, 3600), RedisQueue(redis_url, 100, 3600)
    c = Call(id=new_id(), function="echo", trigger="async", environ={}, body_b64="", request_id="r1",
             max_attempts=1, backoff_s=0, state=DONE, finished=time.time(), callback_url="http://127.0.0.1:9/x",
             callback={"state": CB_PENDING, "attempts": 0, "next_at": 0})
    with a.r.pipeline() as pipe:
        a._write(pipe, c)
        pipe.execute()
    by_b = []
    write = a._write

    def write_while_b_claims(pipe, call):  # inside A's MULTI, after its WATCH: B commits first
        if not by_b:
            by_b.append(b.claim_callback(30))
        write(pipe, call)

    a._write = write_while_b_claims
    by_a = a.claim_callback(30)
    assert by_b and by_b[0] is not None and by_b[0].id == c.id
    assert by_a is None, "both boards leased the same callback"
    assert b.claim_callback(30) is None  # and B does not get it twice either while its lease holds

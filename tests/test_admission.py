"""Admission places across workers (gateway/admission.py): each worker tries the place it freed last first;
that place taken meanwhile by another worker is never granted twice."""

from __future__ import annotations

import threading

import pytest

from gateway.admission import Busy, ConcurrencyLimiter
from tests.faultkit import wait_for


def test_a_place_freed_here_and_taken_by_another_worker_is_not_granted_twice(tmp_path):
    a = ConcurrencyLimiter(str(tmp_path), max_calls=10)  # two workers: two open files of one lock file each
    b = ConcurrencyLimiter(str(tmp_path), max_calls=10)
    first = a.admit("f", 2)
    first.release()  # a's hint for "f" is now the place it freed
    taken_by_b = b.admit("f", 2)  # b takes that same place (the lowest free one)
    again = a.admit("f", 2)  # a's hint is held by b: a gets the other place
    with pytest.raises(Busy) as e:
        a.admit("f", 2)
    assert e.value.cap == "function"
    with pytest.raises(Busy):
        b.admit("f", 2)
    again.release()
    third = b.admit("f", 2)  # the freed place is free for any worker
    for t in (taken_by_b, third):
        t.release()


def test_a_place_freed_between_the_scan_and_the_ending_check_is_granted(tmp_path):
    """A client's next request after an answer never gets 503 because that call released its place just
    after the newcomer's scan and just before its "is any call ending?" check (the race the benchmark showed:
    8 connections against max_concurrency = 8 saw an occasional 503)."""
    a = ConcurrencyLimiter(str(tmp_path), max_calls=10)
    b = ConcurrencyLimiter(str(tmp_path), max_calls=10)
    ending = a.admit("f", 1)
    ending.answered()
    table = b._table("f")
    check = table.any_finishing

    def released_meanwhile(places: range) -> bool:
        ending.release()  # the answered call's processes are gone now, between b's scan and this check
        return check(places)

    table.any_finishing = released_meanwhile
    ticket = b.admit("f", 1)
    with pytest.raises(Busy):
        a.admit("f", 1)
    ticket.release()


def test_a_worker_full_only_of_ending_calls_waits_for_them(tmp_path):
    """The worker's own cap, like a function's, waits (bounded) for calls that answered and are ending instead
    of answering 503: a client's next request comes as soon as its previous call answered (the soak's 8 clients
    on one worker saw `this worker already has 14 calls in flight`)."""
    limiter = ConcurrencyLimiter(str(tmp_path), max_calls=10, worker_max=1)
    ending = limiter.admit("f", 5)
    ending.answered()
    got = _admit_while_ending(limiter, "g", 5, ending)
    assert got is not None
    got.release()


def _admit_while_ending(limiter: ConcurrencyLimiter, name: str, limit: int, ending) -> object:
    """admit() in a thread that finds every place taken by an ending call; once it waits, the call ends. Returns
    its Ticket, or None if it was still waiting 10 s later."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(limiter.admit(name, limit)), daemon=True)
    t.start()
    assert wait_for(lambda: sum(r.waiting for _, r in limiter._caps.values()) == 1, 10), "the newcomer did not wait"
    ending.release()
    t.join(10)
    return out[0] if out else None


@pytest.mark.parametrize("cap", ["function", "worker"])
def test_a_waiting_newcomer_is_woken_by_the_release_not_a_poll(tmp_path, monkeypatch, cap):
    """A place freed by this worker lets its waiting newcomer in at once: with the poll between attempts
    stretched to 60 s, the newcomer still gets in (a 5 ms sleep per attempt cost every back-to-back call of a
    full function up to 5 ms)."""
    from gateway import admission

    monkeypatch.setattr(admission, "_POLL", 60.0)
    monkeypatch.setattr(admission, "FINISHING_WAIT", 120.0)
    limiter = ConcurrencyLimiter(str(tmp_path), max_calls=10, worker_max=1 if cap == "worker" else None)
    ending = limiter.admit("f", 1)
    ending.answered()
    got = _admit_while_ending(limiter, "f" if cap == "function" else "g", 1, ending)
    assert got is not None, "the newcomer slept through the release"
    got.release()


def test_a_worker_full_of_running_calls_is_busy_at_once(tmp_path):
    limiter = ConcurrencyLimiter(str(tmp_path), max_calls=10, worker_max=1)
    running = limiter.admit("f", 5)
    with pytest.raises(Busy) as e:
        limiter.admit("g", 5)
    assert e.value.cap == "worker"
    running.release()
    limiter.admit("g", 5).release()

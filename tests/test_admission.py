"""Admission places across workers (gateway/admission.py): each worker tries the place it freed last first;
that place taken meanwhile by another worker is never granted twice."""

from __future__ import annotations

import pytest

from gateway.admission import Busy, ConcurrencyLimiter


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

"""One call's traces, written in one place: the metrics, the history row and the JSON log line.

A call is answered, then it ends (its last process is gone; often a few ms later, the cpu and peak memory
known only then). `answered()` counts it and queues its history row without waiting for the commit (a later
read on any worker waits for it: gateway/history.py, flush); `ended()` completes the row, observes the memory
and writes the log line.
A call that answered and then was killed (it kept running until its timeout) is recorded with that outcome.
The record itself is built by gateway.calllog.call_record / complete.
"""

from __future__ import annotations

import time
from typing import Any

from gateway import metrics
from gateway.calllog import call_record, complete, emit
from runner import outcomes
from runner.supervisor import CallResult


class CallRecorder:
    def __init__(self, rt: Any, function: str, method: str, path: str, request_id: str, t0: float) -> None:
        self.rt = rt
        self.function = function
        self.method, self.path, self.request_id = method, path, request_id
        self.t0 = t0
        self.record: dict[str, Any] = {}
        self.counted = False
        self.pending = False

    def answered(self, status: int, outcome: str, message: str, result: CallResult | None) -> None:
        total_ms = (time.monotonic() - self.t0) * 1000
        if result is not None and result.answer_outcome is not None:  # it already ended otherwise
            outcome, message = result.outcome, result.message
        self.record = call_record(request_id=self.request_id, function=self.function, method=self.method,
                                  path=self.path, status=status, outcome=outcome, duration_ms=total_ms,
                                  result=result, message=message)
        # Only real functions become metric labels and history rows.
        self.counted = outcome != outcomes.NOT_FOUND
        self.pending = result is not None and not result.complete
        if self.counted:
            metrics.observe(self.function, outcome, status, total_ms / 1000)
            row = dict(self.record, time=time.time(), version=self.rt.store.current(self.function),
                       complete=0 if self.pending else 1)
            self.rt.history.record(row, wait=False)

    def ended(self, result: CallResult | None) -> None:
        """When the call's last process is gone (now, or after the answer): its CPU and peak memory, and its
        real outcome if it ended otherwise than it answered."""
        late = result is not None and result.answer_outcome is not None
        if result is not None and self.pending:
            complete(self.record, result)
            if late:
                self.record.update(outcome=result.outcome, message=result.message,
                                   duration_ms=round((time.monotonic() - self.t0) * 1000, 2))
            if self.counted:
                self.rt.history.finish(self.request_id, result.cpu_ms, result.max_rss_kb,
                                       result.outcome if late else None,
                                       self.record["duration_ms"] if late else None)
        if result is not None and self.counted:
            metrics.observe_memory(self.function, result.max_rss_kb)
        emit(self.record)

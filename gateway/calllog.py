"""One JSON line per call, on stderr (Gunicorn's error log, journald under systemd)."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from runner.supervisor import CallResult

LOG_OUTPUT_CHARS = 2000  # of the captured output, in the log line; the rest is marked as truncated
MESSAGE_CHARS = 2000  # of an error's message, in the record (history and log)
TRACEBACK_CHARS = 8000  # of the user-frames traceback in the history: its end (where it failed) is kept

# One write of the whole line per call, under a lock (as logging's StreamHandler does, without building a
# LogRecord per call: about a tenth of a warm call's gateway CPU went to the logging machinery).
_write_lock = threading.Lock()


def call_record(*, request_id: str, function: str, method: str, path: str, status: int, outcome: str,
                duration_ms: float, result: CallResult | None, message: str = "") -> dict[str, Any]:
    """One call's record, for the log line and the history. cpu_ms and max_rss_kb are null when no process ran
    (or until its exit is reported: see complete())."""
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "request_id": request_id, "function": function,
        "method": method, "path": path, "status": status, "outcome": outcome,
        "duration_ms": round(duration_ms, 2), "cpu_ms": None, "max_rss_kb": None,
    }
    if result is not None:
        output = result.output.decode("utf-8", "replace")
        dropped = result.output_dropped
        if len(output) > LOG_OUTPUT_CHARS:
            dropped += len(output) - LOG_OUTPUT_CHARS
            output = output[:LOG_OUTPUT_CHARS]
        record["output"] = output
        if dropped:
            record["output_dropped_bytes"] = dropped
        if result.error_type:
            record["error_type"] = result.error_type
        if result.traceback:
            record["traceback"] = _tail(result.traceback, TRACEBACK_CHARS)
        if result.full_traceback:
            record["full_traceback"] = result.full_traceback  # the log line's only: see emit()
        complete(record, result)
    if message:
        record["message"] = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + " [...]"
    return record


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} characters dropped ...]\n" + text[-limit:]


def complete(record: dict[str, Any], result: CallResult) -> None:
    """Adds what only the end of the call's processes tells: CPU, peak memory, exit status."""
    record.update(cpu_ms=result.cpu_ms, max_rss_kb=result.max_rss_kb, exitcode=result.exitcode,
                  signal=result.signal)


def emit(record: dict[str, Any]) -> None:
    """The server log has the whole traceback (with the runner's and Flask's frames) as `traceback`."""
    line = dict(record)
    full = line.pop("full_traceback", None)
    if full:
        line["traceback"] = full
    text = json.dumps(line, ensure_ascii=False) + "\n"
    with _write_lock:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed or full log must not fail the call
            pass

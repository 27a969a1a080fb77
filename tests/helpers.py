"""Assertions and small clients shared by the HTTP contract tests."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from typing import Any

import requests

from tests.conftest import Server


def new_request_id() -> str:
    return uuid.uuid4().hex


def raw_request(server: Server, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """Sends the request target byte for byte (requests would normalise `..` and `.` away)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_error_body(status: int, headers: Any, body: bytes, *, expected_status: int, error: str,
                      function: str | None) -> dict[str, Any]:
    """Every gateway error: the status, a JSON body with error/function/request_id/message, X-Request-Id."""
    assert status == expected_status, body
    content_type = headers.get("content-type") or headers.get("Content-Type")
    assert content_type and content_type.split(";")[0].strip() == "application/json", content_type
    doc = json.loads(body)
    assert doc["error"] == error, doc
    assert doc["function"] == function, doc
    assert isinstance(doc["message"], str) and doc["message"], doc
    rid = headers.get("x-request-id") or headers.get("X-Request-Id")
    assert rid and doc["request_id"] == rid, (doc, rid)
    return doc


def assert_error(r: requests.Response, status: int, error: str, function: str | None) -> dict[str, Any]:
    return assert_error_body(r.status_code, r.headers, r.content, expected_status=status, error=error,
                             function=function)


def log_lines(server: Server, request_id: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    """The JSON call lines of the server log that carry request_id (waits a bounded time for the first)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in server.read_log().splitlines():
            if line.startswith("{") and request_id in line:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("request_id") == request_id:
                    found.append(rec)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def log_line(server: Server, request_id: str) -> dict[str, Any]:
    found = log_lines(server, request_id)
    assert len(found) == 1, f"expected one call line for {request_id}, got {found}"
    return found[0]


class LoopbackHTTP:
    """A test's own HTTP server on a free 127.0.0.1 port, served by a thread of the test process; close() stops
    it. Subclasses define their request handler and call serve(handler)."""

    def serve(self, handler: type) -> None:
        from http.server import ThreadingHTTPServer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

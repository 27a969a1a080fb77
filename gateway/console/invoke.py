"""The function page's "invoke" form: one real call of a function, dispatched through this same WSGI app
(the public /function/<name> route, with admission, history and metrics as for any client), then its history
row for the outcome, CPU and peak memory."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Flask
from werkzeug.test import Client

from gateway.console.playground import RequestSpec

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")


def invoke(app: Flask, rt: Any, name: str, spec: RequestSpec, client_ip: str) -> dict[str, Any]:
    rid = "console-" + uuid.uuid4().hex[:20]
    path = f"/function/{name}" + ("/" + spec.path.lstrip("/") if spec.path.strip("/") else "")
    headers = [(k, v) for k, v in spec.headers if k.lower() != "x-request-id"] + [("X-Request-Id", rid)]
    resp = Client(app).open(path, method=spec.method, query_string=spec.query, headers=headers,
                            data=spec.body or None, environ_base={"REMOTE_ADDR": client_ip})
    body = resp.get_data()
    rt.history.flush(1.0)
    row = rt.history.call(rid) or {}
    return {
        "request_id": rid, "status": resp.status_code, "headers": [list(h) for h in resp.headers.items()],
        "body": body.decode("utf-8", "replace"), "outcome": row.get("outcome"), "duration_ms": row.get("duration_ms"),
        "cpu_ms": row.get("cpu_ms"), "max_rss_kb": row.get("max_rss_kb"), "output": row.get("output") or "",
        "version": row.get("version"),
    }

"""Keeps each function call's request query and headers (secrets redacted before they are stored) for the
console's call detail: the call history has no room for them."""

from __future__ import annotations

import functools
import re

from flask import Response, g, request

from gateway.console.store import ConsoleStore

REDACTED = "[redacted]"
MAX_HEADERS_BYTES = 16 * 1024
# Headers and query parameters whose value is a credential: never stored.
SECRET = re.compile(r"authorization|cookie|token|secret|password|passwd|api[-_]?key|session|signature|x-line-sig",
                    re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def is_secret(name: str) -> bool:
    """Per header or parameter name; cached, since clients send the same few names on every call."""
    return bool(SECRET.search(name))


def redact_headers(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out, size = [], 0
    for k, v in items:
        v = REDACTED if is_secret(k) else v
        size += len(k) + len(v)
        if size > MAX_HEADERS_BYTES:
            out.append(("…", "(more headers not kept)"))
            break
        out.append((k, v))
    return out


def redact_query(qs: str) -> str:
    parts = []
    for item in qs.split("&"):
        k, sep, _ = item.partition("=")
        parts.append(f"{k}={REDACTED}" if sep and is_secret(k) else item)
    return "&".join(parts)[:4096]


def recorder(store: ConsoleStore, trusted: frozenset[str]):
    from gateway.console.auth import client_ip

    def record(resp: Response) -> Response:
        if request.endpoint == "fnbox.invoke" and g.get("request_id"):
            store.record_request(g.request_id, redact_query(request.query_string.decode("latin-1")),
                                 redact_headers(list(request.headers.items())), client_ip(request, trusted))
        return resp

    return record

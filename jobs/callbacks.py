"""X-Callback-Url: POSTs a finished call's record to an address on the operator's allow-list, and nowhere else.

No SSRF: the URL's host:port must be on FNBOX_CALLBACK_ALLOW as written; the name is resolved once and the
connection goes to that address (a second resolution cannot swap it for another); redirects are not followed.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import Any

TIMEOUT_S = 10.0
MAX_URL = 2048


class CallbackRefused(ValueError):
    """The URL is malformed or its host:port is not on FNBOX_CALLBACK_ALLOW."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str


def check_url(url: str, allow: frozenset[tuple[str, int]]) -> Target:
    if len(url) > MAX_URL:
        raise CallbackRefused("the callback URL is too long")
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        raise CallbackRefused(f"{url!r} is not a valid URL") from None
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
        raise CallbackRefused("the callback URL must be http:// or https://host[:port]/path, without credentials")
    host = u.hostname.lower()
    if (host, port) not in allow:
        raise CallbackRefused(f"{host}:{port} is not on the callback allow-list (FNBOX_CALLBACK_ALLOW)")
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return Target(u.scheme, host, port, path)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address resolved beforehand, with the certificate checked against the URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(url: str, allow: frozenset[tuple[str, int]], doc: dict[str, Any], headers: dict[str, str]) -> int:
    """POSTs doc as JSON; the HTTP status. Raises CallbackRefused (never worth a retry) or OSError."""
    t = check_url(url, allow)
    infos = socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{t.host} does not resolve")
    body = json.dumps(doc).encode()
    hdrs = {"Host": t.host if t.port in (80, 443) else f"{t.host}:{t.port}", "Content-Type": "application/json",
            "User-Agent": "fnbox-callback", **headers}
    error: OSError | None = None
    for info in infos:  # the addresses of this one resolution, in order, until one connects
        address = str(info[4][0])
        if t.scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPS(t.host, address, t.port, TIMEOUT_S)
        else:
            conn = http.client.HTTPConnection(address, t.port, timeout=TIMEOUT_S)
        try:
            conn.connect()
        except OSError as e:
            error = e
            conn.close()
            continue
        try:
            conn.request("POST", t.path, body=body, headers=hdrs)
            resp = conn.getresponse()
            resp.read(65536)
            return resp.status
        except (http.client.HTTPException, ssl.SSLError) as e:
            raise OSError(str(e)) from None
        finally:
            conn.close()
    raise error or OSError(f"cannot connect to {t.host}:{t.port}")

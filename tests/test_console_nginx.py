"""The console behind the shipped nginx site (ops/nginx/fnbox.conf): reachable, the client address nginx
reports decides the playground allow-list, and the live tail's events pass nginx unbuffered."""

from __future__ import annotations

import http.client
import re
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import Server
from tests.console_kit import ADMIN_TOKEN, HELLO
from tests.test_nginx import OUTSIDE, Nginx, _need_nginx


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[Server, Nginx]]:
    _need_nginx()
    s = Server(functions={"hello": HELLO}, env={"FNBOX_ADMIN_TOKEN": ADMIN_TOKEN, "FNBOX_PLAYGROUND_TOKEN": "",
                                                "FNBOX_CONSOLE_PASSWORD": "", "FNBOX_PLAYGROUND_ALLOW": OUTSIDE})
    s.start()
    n = Nginx(f"127.0.0.1:{s.port}", s.profiles_dir)
    try:
        n.start()
        yield s, n
    finally:
        n.stop()
        s.stop()


def cookie_of(headers: http.client.HTTPMessage, name: str) -> str:
    for value in headers.get_all("Set-Cookie") or []:
        if value.startswith(name + "="):
            return value.split(";", 1)[0]
    raise AssertionError(f"no {name} cookie in {headers.get_all('Set-Cookie')}")


def test_allow_list_sees_the_real_client_behind_nginx(proxied):
    _, n = proxied
    # From the allowed address (as nginx reports it in X-Forwarded-For): the playground opens without a token.
    status, headers, body = n.fetch("/console/playground", source=OUTSIDE)
    assert status == 200, body
    assert b"Playground" in body
    # From any other address: sign in first.
    status, headers, _ = n.fetch("/console/playground", source="127.0.0.1")
    assert status == 302 and "/console/login" in headers["Location"]
    # Forging X-Forwarded-For does not help: nginx appends the real address, and only that one is believed.
    status, _, _ = n.fetch("/console/playground", source="127.0.0.1", headers={"X-Forwarded-For": OUTSIDE})
    assert status == 302


def _sign_in(n: Nginx) -> str:
    status, headers, body = n.fetch("/console/login", source="127.0.0.1")
    assert status == 200
    login_cookie = cookie_of(headers, "fnbox_console_login")
    tok = re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()
    status, headers, _ = n.fetch("/console/login", method="POST", body=f"csrf={tok}&secret={ADMIN_TOKEN}".encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded",
                                          "Cookie": login_cookie}, source="127.0.0.1")
    assert status == 302
    return cookie_of(headers, "fnbox_console")


@pytest.mark.timeout(60)
def test_live_tail_events_pass_nginx_at_once(proxied):
    s, n = proxied
    cookie = _sign_in(n)
    conn = http.client.HTTPConnection("127.0.0.1", n.port, timeout=15)
    try:
        conn.request("GET", "/console/api/calls/stream", headers={"Cookie": cookie})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.readline().startswith(b"retry:")  # arrives before the stream ends: nothing buffers it
        rid = uuid.uuid4().hex
        assert s.get("/function/hello", headers={"X-Request-Id": rid}).status_code == 200
        deadline = time.monotonic() + 10
        while True:
            line = resp.readline()
            if rid.encode() in line:
                break
            assert line and time.monotonic() < deadline, "the call's event did not arrive through nginx"
    finally:
        conn.close()

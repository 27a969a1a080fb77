"""X-Callback-Url through a real server and a real receiver on 127.0.0.1: delivered, retried with backoff,
refused off the allow-list, redirects not followed; the outcome is in the call's record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from tests.asynckit import enqueue, wait_call, wait_for
from tests.helpers import LoopbackHTTP, assert_error

HELLO = """
    def main(request):
        return "hello " + request.get_data().decode()
"""


class Receiver(LoopbackHTTP):
    """An HTTP server in a thread of the test process: records every POST, answers from a script of statuses."""

    def __init__(self, statuses: list[int] | None = None, location: str | None = None) -> None:
        self.got: list[dict] = []
        self.statuses = list(statuses or [])
        recv = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                recv.got.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                status = recv.statuses.pop(0) if recv.statuses else 200
                self.send_response(status)
                if location and 300 <= status < 400:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.serve(Handler)


@pytest.fixture
def receivers() -> Iterator:
    made: list[Receiver] = []

    def make(*a, **kw) -> Receiver:
        made.append(Receiver(*a, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _server(make_server, allow: str):
    return make_server(functions={"hello": HELLO}, env={"FNBOX_CALLBACK_ALLOW": allow}).start()


def test_result_is_posted_to_the_callback(make_server, receivers):
    rx = receivers()
    s = _server(make_server, f"127.0.0.1:{rx.port}")
    cid = enqueue(s.url, "hello", data="Ann", headers={"X-Callback-Url": f"http://127.0.0.1:{rx.port}/hook?k=v"})
    call = wait_call(s.url, cid)
    assert call["status"] == "done"
    wait_for(lambda: rx.got, 20, "the callback")
    got = rx.got[0]
    assert got["path"] == "/hook?k=v"
    assert got["headers"]["X-Fnbox-Call-Id"] == cid and got["headers"]["X-Fnbox-Call-Status"] == "done"
    assert got["body"]["call_id"] == cid and got["body"]["result"]["body"] == "hello Ann"
    cb = wait_for(lambda: (c := wait_call(s.url, cid)["callback"])["state"] == "delivered" and c, 10, "delivered")
    assert cb["attempts"] == 1 and cb["last_status"] == 200 and cb["url"].endswith("/hook?k=v")
    assert len(rx.got) == 1


def test_failed_deliveries_are_retried_with_backoff(make_server, receivers):
    rx = receivers(statuses=[500, 503])
    s = _server(make_server, f"127.0.0.1:{rx.port}")
    cid = enqueue(s.url, "hello", headers={"X-Callback-Url": f"http://127.0.0.1:{rx.port}/"})
    cb = wait_for(lambda: (c := wait_call(s.url, cid).get("callback", {}))["state"] == "delivered" and c, 30,
                  "delivered on the third attempt")
    assert cb["attempts"] == 3 and len(rx.got) == 3
    assert [g["body"]["call_id"] for g in rx.got] == [cid] * 3


def test_redirects_are_not_followed(make_server, receivers):
    other = receivers()
    rx = receivers(statuses=[302], location=f"http://127.0.0.1:{other.port}/")
    s = _server(make_server, f"127.0.0.1:{rx.port},127.0.0.1:{other.port}")
    cid = enqueue(s.url, "hello", headers={"X-Callback-Url": f"http://127.0.0.1:{rx.port}/"})
    cb = wait_for(lambda: (c := wait_call(s.url, cid).get("callback", {}))["state"] == "failed" and c, 20, "failed")
    assert cb["last_status"] == 302 and "redirect" in cb["last_error"]
    assert len(rx.got) == 1 and other.got == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.2:{port}/",  # another address
    "http://127.0.0.1:{other}/",  # another port
    "http://localhost:{port}/",  # the same address under a name that is not listed
    "http://user:pw@127.0.0.1:{port}/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{port}/",
    "http://[::1:{port}/",
])
def test_callbacks_off_the_allow_list_are_refused_when_queued(make_server, receivers, url):
    rx = receivers()
    s = _server(make_server, f"127.0.0.1:{rx.port}")
    target = url.format(port=rx.port, other=rx.port + 1 if rx.port < 65535 else rx.port - 1)
    r = s.request("POST", "/async-function/hello", headers={"X-Callback-Url": target})
    assert_error(r, 400, "callback_not_allowed", "hello")
    assert rx.got == []


def test_an_allow_listed_name_is_resolved_and_delivered(make_server, receivers):
    rx = receivers()
    s = _server(make_server, f"localhost:{rx.port}")
    cid = enqueue(s.url, "hello", headers={"X-Callback-Url": f"http://localhost:{rx.port}/named"})
    wait_for(lambda: rx.got, 20, "the callback")
    assert rx.got[0]["headers"]["Host"] == f"localhost:{rx.port}"
    assert wait_for(lambda: wait_call(s.url, cid)["callback"]["state"] == "delivered", 10, "delivered")

"""The seed write-up's three URLs, served by a real Gunicorn server with the repo's own functions/hello.py."""

import os
import time

import pytest

from tests.conftest import REPO, assert_nothing_left, server_fixture

with open(os.path.join(REPO, "functions", "hello.py")) as _f:
    seed_server = server_fixture("seed_server", functions={"hello": _f.read()})


@pytest.mark.parametrize("path, expected", [
    ("/function/hello?name=Tony", "Hello Tony!"),
    ("/function/hello/Ann", "Hello Ann!"),
    ("/function/hello", "Hello World!"),
])
def test_seed_urls(seed_server, path, expected):
    r = seed_server.get(path)
    assert r.status_code == 200
    assert r.text == expected
    assert r.headers["X-Request-Id"]
    assert_nothing_left(time.time())

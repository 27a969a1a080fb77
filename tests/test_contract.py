"""The HTTP contract of /function/<name>: methods, names, errors, request ids, hot reload, output and call log."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import uuid

import pytest

from tests.conftest import server_fixture
from tests.helpers import assert_error, assert_error_body, log_line, log_lines, new_request_id, raw_request

FUNCTIONS = {
    "hello": """
        def main(request):
            return 'hello'
    """,
    "method": """
        def main(request):
            return {'method': request.method}, 200, {'X-Seen-Method': request.method}
    """,
    # A private helper: importable by functions as a sibling, never callable by URL.
    "_util": """
        VALUE = 'from _util'
        def main(request):
            return 'private helper ran'
    """,
    "useutil": """
        import _util
        def main(request):
            return _util.VALUE
    """,
    "pkgfn/__init__.py": """
        from .helper import VALUE
        def main(request):
            return VALUE
    """,
    "pkgfn/helper.py": """
        VALUE = 'package function'
    """,
    # A namespace folder (no __init__.py) is not a function.
    "nsdir/mod.py": """
        def main(request):
            return 'namespace'
    """,
    # Named like stdlib modules: the name resolves inside the functions package only.
    "json": """
        def main(request):
            return 'functions/json.py'
    """,
    "nomain": """
        x = 1
    """,
    "notcallable": """
        main = 'not a function'
    """,
    "boom": """
        def main(request):
            return 1 / 0
    """,
    "modlevel": """
        1 / 0
        def main(request):
            return 'unreachable'
    """,
    "syntaxerr": """
        def main(request)
            return 1
    """,
    "importmissing": """
        import fnbox_no_such_module_xyz
        def main(request):
            return 'unreachable'
    """,
    "importname": """
        from os import fnbox_no_such_name
        def main(request):
            return 'unreachable'
    """,
    "printer": """
        import os, sys
        def main(request):
            print('STDOUT-MARK')
            sys.stderr.write('STDERR-MARK\\n')
            os.write(1, b'FD1-MARK\\n')
            os.write(2, b'FD2-MARK\\n')
            print('x' * 300_000)  # more than a pipe buffer
            sys.stderr.write('y' * 300_000 + '\\n')
            return 'the body'
    """,
    "printraise": """
        def main(request):
            print('PRINTED-BEFORE-RAISE')
            raise ValueError('bad value')
    """,
    "printexit": """
        import os
        def main(request):
            print('PRINTED-BEFORE-EXIT')
            os._exit(4)
    """,
}

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
LOG_KEYS = ("time", "request_id", "function", "method", "status", "outcome", "duration_ms", "cpu_ms",
            "max_rss_kb")


server = server_fixture(functions=FUNCTIONS)


@pytest.fixture
def functions_toml(server):
    """Lets a test edit functions.toml; the original text is restored afterwards."""
    path = os.path.join(server.profiles_dir, "functions.toml")
    with open(path) as f:
        original = f.read()
    yield lambda text: server.write_profile("functions.toml", text)
    server.write_profile("functions.toml", original)


# -- methods -----------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_reaches_main(server, method):
    r = server.request(method, "/function/method", data=b"payload" if method in ("POST", "PUT", "PATCH") else None)
    assert r.status_code == 200
    assert r.headers["X-Seen-Method"] == method
    assert r.headers["X-Request-Id"]
    if method == "HEAD":
        assert r.content == b""
    else:
        assert r.json() == {"method": method}


@pytest.mark.timeout(30)
def test_head_sends_no_body_on_the_wire(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"HEAD /function/hello HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"\r\nx-request-id: " in head.lower()
    assert b"\r\ncontent-length: 5" in head.lower()  # what GET would send: 'hello'
    assert rest == b""


# -- names -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("target, name", [
    ("/function/a.b", "a.b"),
    ("/function/hello.py", "hello.py"),
    ("/function/pkgfn.helper", "pkgfn.helper"),
    ("/function/..", ".."),
    ("/function/.", "."),
    ("/function/%2e%2e", ".."),
    ("/function/%2E%2E/hello", ".."),
    ("/function/..%2fhello", ".."),
    ("/function/__init__", "__init__"),
    ("/function/_util", "_util"),
    ("/function/missing", "missing"),
    ("/function/nsdir", "nsdir"),
    ("/function/os", "os"),
    ("/function/sys", "sys"),
    ("/function/flask", "flask"),
    ("/function/runner", "runner"),
    ("/function/gateway", "gateway"),
    ("/function/tests", "tests"),
    ("/function/functions", "functions"),
    ("/function/hello%00", "hello\x00"),
    ("/function/1abc", "1abc"),
])
def test_invalid_or_missing_name_is_not_found(server, target, name):
    rid = new_request_id()
    status, headers, body = raw_request(server, "GET", target, headers={"X-Request-Id": rid})
    assert_error_body(status, headers, body, expected_status=404, error="not_found", function=name)
    assert b"private helper ran" not in body
    # Refused by the gateway itself: no process was started, so nothing was imported for that name.
    rec = log_line(server, rid)
    assert rec["cpu_ms"] is None and "exitcode" not in rec, rec


@pytest.mark.timeout(30)
def test_private_helper_is_importable_by_a_sibling_function(server):
    r = server.get("/function/useutil")
    assert r.status_code == 200
    assert r.text == "from _util"


@pytest.mark.timeout(30)
def test_package_function(server):
    r = server.get("/function/pkgfn")
    assert r.status_code == 200
    assert r.text == "package function"
    r = server.get("/function/pkgfn/sub/path")
    assert r.status_code == 200
    assert r.text == "package function"


@pytest.mark.timeout(30)
def test_name_resolves_inside_the_functions_package_only(server):
    # functions/json.py, not the stdlib json module (which has no main and would be no_entry_point).
    r = server.get("/function/json")
    assert r.status_code == 200
    assert r.text == "functions/json.py"


# -- no main / function errors ------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["nomain", "notcallable"])
def test_module_without_callable_main_is_no_entry_point(server, name):
    # The function's own mistake, not the client's: a 500-class error (issue 12).
    doc = assert_error(server.get(f"/function/{name}"), 500, "no_entry_point", name)
    assert "main(request)" in doc["message"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, etype, message", [
    ("boom", "ZeroDivisionError", "division by zero"),
    ("modlevel", "ZeroDivisionError", "division by zero"),
    ("syntaxerr", "SyntaxError", None),
    ("importname", "ImportError", None),
])
def test_function_error(server, name, etype, message):
    doc = assert_error(server.get(f"/function/{name}"), 500, "function_error", name)
    assert doc["type"] == etype
    if message is not None:
        assert doc["message"] == message
    assert "traceback" not in doc
    assert "Traceback" not in json.dumps(doc)


@pytest.mark.timeout(30)
def test_function_error_body_is_exactly_documented(server):
    r = server.get("/function/boom")
    doc = r.json()
    assert {k: doc[k] for k in ("error", "type", "message")} == {
        "error": "function_error", "type": "ZeroDivisionError", "message": "division by zero"}
    assert set(doc) == {"error", "type", "message", "function", "request_id"}


@pytest.mark.timeout(30)
def test_traceback_in_body_only_when_the_profile_says_so(server, functions_toml):
    functions_toml("[boom]\ntraceback = true\n")
    doc = assert_error(server.get("/function/boom"), 500, "function_error", "boom")
    assert "Traceback (most recent call last)" in doc["traceback"]
    assert "boom.py" in doc["traceback"]
    assert "ZeroDivisionError: division by zero" in doc["traceback"]
    # Only boom's profile says so.
    assert "traceback" not in server.get("/function/modlevel").json()
    # And an edit back takes effect on the next call, too.
    functions_toml("[boom]\ntraceback = false\n")
    assert "traceback" not in server.get("/function/boom").json()


@pytest.mark.timeout(30)
def test_traceback_for_import_time_errors_when_enabled(server, functions_toml):
    functions_toml("[syntaxerr]\ntraceback = true\n[modlevel]\ntraceback = true\n")
    tb = server.get("/function/syntaxerr").json()["traceback"]
    assert "SyntaxError" in tb and "syntaxerr.py" in tb
    tb = server.get("/function/modlevel").json()["traceback"]
    assert "ZeroDivisionError" in tb and "modlevel.py" in tb


# -- request ids, healthz, unmatched routes -------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("method, path", [
    ("GET", "/function/hello"), ("GET", "/function/boom"), ("GET", "/function/nomain"),
    ("GET", "/function/missing"), ("GET", "/function/printexit"), ("GET", "/healthz"), ("GET", "/not-a-route"),
    ("GET", "/function/"), ("TRACE", "/function/hello"), ("POST", "/healthz"),
])
def test_every_response_has_a_request_id(server, method, path):
    r = server.request(method, path)
    assert r.headers.get("X-Request-Id")
    if r.status_code >= 400:
        assert r.headers["Content-Type"].startswith("application/json")
        doc = r.json()
        assert doc["request_id"] == r.headers["X-Request-Id"]
        assert "function" in doc and doc["message"]


@pytest.mark.timeout(30)
def test_request_too_large_is_a_json_error(server, functions_toml):
    functions_toml("[hello]\nmax_request_kb = 1\n")
    r = server.request("POST", "/function/hello", data=b"x" * 5000)
    doc = assert_error(r, 413, "request_too_large", "hello")
    assert "max_request_kb" in doc["message"]
    assert server.request("POST", "/function/hello", data=b"x" * 1000).status_code == 200


@pytest.mark.timeout(30)
def test_incoming_request_id_is_kept(server):
    rid = new_request_id()
    r = server.get("/function/boom", headers={"X-Request-Id": rid})
    assert r.headers["X-Request-Id"] == rid
    assert r.json()["request_id"] == rid
    assert log_line(server, rid)["request_id"] == rid


@pytest.mark.timeout(30)
def test_healthz(server):
    r = server.get("/healthz")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["status"] == "ok"
    assert r.headers["X-Request-Id"]


# -- hot reload ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_new_and_edited_function_take_effect_on_the_next_call(server):
    worker = server.get("/healthz").json()["worker_pid"]
    name = "fresh_" + uuid.uuid4().hex[:8]
    assert_error(server.get(f"/function/{name}"), 404, "not_found", name)
    server.write_function(name, "def main(request):\n    return 'version 1'\n")
    r = server.get(f"/function/{name}")
    assert (r.status_code, r.text) == (200, "version 1")
    # Same size, same second: nothing cached (no bytecode, no module) may serve the old code.
    server.write_function(name, "def main(request):\n    return 'version 2'\n")
    r = server.get(f"/function/{name}")
    assert (r.status_code, r.text) == (200, "version 2")
    server.write_function(name, "def main(request):\n    return 1 / 0\n")
    assert_error(server.get(f"/function/{name}"), 500, "function_error", name)
    os.remove(os.path.join(server.functions_dir, name + ".py"))
    assert_error(server.get(f"/function/{name}"), 404, "not_found", name)
    assert server.get("/healthz").json()["worker_pid"] == worker  # no restart happened


# -- captured output ----------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_output_never_corrupts_the_response_and_is_logged(server):
    rid = new_request_id()
    r = server.get("/function/printer", headers={"X-Request-Id": rid})
    assert r.status_code == 200
    assert r.content == b"the body"
    assert r.headers["Content-Length"] == str(len(b"the body"))
    out = log_line(server, rid)["output"]
    for mark in ("STDOUT-MARK", "STDERR-MARK", "FD1-MARK", "FD2-MARK"):
        assert mark in out


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name, status, mark", [
    ("printraise", 500, "PRINTED-BEFORE-RAISE"),
    ("printexit", 502, "PRINTED-BEFORE-EXIT"),
])
def test_output_before_a_failure_is_logged(server, name, status, mark):
    rid = new_request_id()
    r = server.get(f"/function/{name}", headers={"X-Request-Id": rid})
    assert r.status_code == status
    assert mark not in r.text
    assert mark in log_line(server, rid)["output"]


# -- call log -----------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
@pytest.mark.parametrize("method, path, status, outcome, ran", [
    ("GET", "/function/hello", 200, "ok", True),
    ("POST", "/function/boom", 500, "function_error", True),
    ("PUT", "/function/nomain", 500, "no_entry_point", True),
    ("DELETE", "/function/printexit", 502, "crashed", True),
    ("GET", "/function/missing", 404, "not_found", False),
])
def test_one_json_log_line_per_call(server, method, path, status, outcome, ran):
    rid = new_request_id()
    r = server.request(method, path, headers={"X-Request-Id": rid})
    assert r.status_code == status
    time.sleep(0.1)  # a second line, if any, would have been written by now
    lines = log_lines(server, rid)
    assert len(lines) == 1, lines
    rec = lines[0]
    for key in LOG_KEYS:
        assert key in rec, (key, rec)
    datetime.datetime.strptime(rec["time"], "%Y-%m-%dT%H:%M:%S%z")
    assert rec["request_id"] == rid
    assert rec["function"] == path.split("/")[2]
    assert rec["method"] == method
    assert rec["status"] == status
    assert rec["outcome"] == outcome
    assert isinstance(rec["duration_ms"], (int, float)) and rec["duration_ms"] >= 0
    if ran:
        assert isinstance(rec["cpu_ms"], (int, float)) and rec["cpu_ms"] > 0
        assert isinstance(rec["max_rss_kb"], int) and rec["max_rss_kb"] > 1000
    else:
        assert rec["cpu_ms"] is None and rec["max_rss_kb"] is None

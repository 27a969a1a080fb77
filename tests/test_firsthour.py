"""A function author's first hour (issue 12), through a real server: failures that can be diagnosed (error type,
message and the user's traceback in the history and the call detail), entry points, JSON for every platform
error, the network-off hint, missing packages, and the admin API's guard rails."""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import Server
from tests.helpers import assert_error, log_line, new_request_id

TOKEN = "firsthour-token-41c9"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

FUNCTIONS = {
    "boom": """
        import json

        def helper(x):
            return json.loads(x)

        def main(request):
            return helper(request.args.get('x', '{not json'))
    """,
    "handler_only": """
        def handler(request):
            return 'handled by handler'
    """,
    "jsonin": """
        def main(request):
            return {'got': request.get_json()}
    """,
    "own415": """
        from flask import abort

        def main(request):
            abort(415)
    """,
    "netcall": """
        import socket

        def main(request):
            socket.create_connection(('fnbox-test.invalid', 80), timeout=2)
    """,
    "needsdep": """
        import fnbox_not_installed_pkg

        def main(request):
            return 'never'
    """,
    "lazydep": """
        def main(request):
            import fnbox_lazy_missing.sub
            return 'never'
    """,
    "badsubmodule": """
        import json.no_such_submodule

        def main(request):
            return 'never'
    """,
    "secretive": """
        import os

        def main(request):
            return 'has a secret' if os.environ.get('API_KEY') else 'no secret'
    """,
}
PROFILES = {
    "functions.toml": """
        [boom]
        traceback = true

        [handler_only]
        entry_point = "handler"

        [secretive]
        env = { API_KEY = "s3cr3t-value-9f" }
    """,
}


@pytest.fixture(scope="module")
def server():
    s = Server(functions=FUNCTIONS, profiles=PROFILES, env={"FNBOX_ADMIN_TOKEN": TOKEN})
    s.start()
    yield s
    s.stop()


def admin(server: Server, method: str, path: str, **kw) -> requests.Response:
    return server.request(method, "/admin" + path, headers=AUTH, **kw)


# -- failures you can diagnose -------------------------------------------------------------------------------
def test_error_type_message_and_user_traceback_are_in_the_history_and_call_detail(server):
    rid = new_request_id()
    doc = assert_error(server.get("/function/boom", headers={"X-Request-Id": rid}), 500, "function_error", "boom")
    assert doc["type"] == "JSONDecodeError"
    # traceback = true: the short traceback is in the body; it starts at the function's own frame.
    tb = doc["traceback"]
    first_frame = tb.splitlines()[1]
    assert "boom.py" in first_frame and "in main" in first_frame, tb
    assert "runner/child.py" not in tb and "flask/app.py" not in tb
    assert "in helper" in tb and "json/decoder.py" in tb  # the library frames after the user's stay
    assert tb.rstrip().endswith("json.decoder.JSONDecodeError: " + doc["message"])

    rec = admin(server, "GET", f"/calls/{rid}").json()
    assert rec["error_type"] == "JSONDecodeError"
    assert rec["message"] == doc["message"]
    assert rec["traceback"] == tb

    # The server log keeps the whole traceback, the runner's and Flask's frames included.
    line = log_line(server, rid)
    assert "runner/child.py" in line["traceback"] and "boom.py" in line["traceback"]


def test_the_traceback_stays_out_of_the_body_without_the_profile_key(server):
    rid = new_request_id()
    doc = assert_error(server.get("/function/needsdep", headers={"X-Request-Id": rid}), 500, "missing_dependency",
                       "needsdep")
    assert "traceback" not in doc
    rec = admin(server, "GET", f"/calls/{rid}").json()
    assert "fnbox_not_installed_pkg" in rec["traceback"] and "needsdep.py" in rec["traceback"]


def test_a_missing_package_names_it_and_says_how_to_install(server):
    for name, package in (("needsdep", "fnbox_not_installed_pkg"), ("lazydep", "fnbox_lazy_missing")):
        doc = assert_error(server.get(f"/function/{name}"), 500, "missing_dependency", name)
        assert doc["type"] == "ModuleNotFoundError"
        assert f"No module named '{package}'" in doc["message"]
        assert "requirements.txt" in doc["message"] and "fnbox deps install" in doc["message"]


def test_a_missing_submodule_of_an_existing_package_is_a_function_error(server):
    doc = assert_error(server.get("/function/badsubmodule"), 500, "function_error", "badsubmodule")
    assert doc["type"] == "ModuleNotFoundError" and doc["message"] == "No module named 'json.no_such_submodule'"


def test_no_main_is_a_500_and_entry_point_is_per_function(server):
    assert server.get("/function/handler_only").text == "handled by handler"
    # The same module without the profile key: no `main`.
    server.write_function("handler_too", FUNCTIONS["handler_only"])
    doc = assert_error(server.get("/function/handler_too"), 500, "no_entry_point", "handler_too")
    assert "`main(request)`" in doc["message"]


def test_a_network_error_with_network_off_says_so(server):
    rid = new_request_id()
    doc = assert_error(server.get("/function/netcall", headers={"X-Request-Id": rid}), 500, "function_error",
                       "netcall")
    assert doc["type"] == "gaierror"
    assert "network = false" in doc["message"] and "network = true" in doc["message"]
    assert "network = false" in log_line(server, rid)["message"]


# -- every platform error is JSON -----------------------------------------------------------------------------
def test_get_json_without_a_content_type_is_a_json_415(server):
    r = server.request("POST", "/function/jsonin", data=b'{"a": 1}')  # no Content-Type, as curl -d sends
    doc = assert_error(r, 415, "unsupported_media_type", "jsonin")
    assert "Content-Type" in doc["message"]
    r = server.request("POST", "/function/jsonin", data=b"{bad", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "bad_request", "jsonin")
    r = server.request("POST", "/function/jsonin", json={"a": 1})
    assert r.status_code == 200 and r.json() == {"got": {"a": 1}}


def test_a_functions_own_abort_415_is_its_own(server):
    r = server.request("POST", "/function/own415")
    assert r.status_code == 415
    assert "application/json" not in r.headers["Content-Type"]  # Flask's page, as the function asked


def test_a_gateway_405_and_404_are_json(server):
    r = server.request("TRACE", "/function/boom")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = server.get("/nothing/here")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


# -- the admin API's guard rails ------------------------------------------------------------------------------
def test_a_300_character_name_is_invalid_name_not_a_500(server):
    name = "a" * 300
    r = admin(server, "PUT", f"/functions/{name}", data=b"def main(request):\n    return 'x'\n")
    doc = r.json()
    assert r.status_code == 400 and doc["error"] == "invalid_name", doc
    assert "at most 64 characters" in doc["message"]
    for method, path in (("GET", f"/functions/{name}/versions"), ("GET", f"/functions/{name}/calls"),
                         ("DELETE", f"/functions/{name}")):
        assert admin(server, method, path).json()["error"] == "invalid_name"
    assert server.get(f"/function/{name}").status_code == 404


def test_env_values_are_masked_in_the_listing(server):
    assert server.get("/function/secretive").text == "has a secret"
    text = admin(server, "GET", "/functions").text
    assert "s3cr3t-value-9f" not in text
    listing = {f["name"]: f for f in json.loads(text)["functions"]}
    assert listing["secretive"]["limits"]["env"] == {"API_KEY": "***"}


def test_calls_of_an_unknown_function_are_404(server):
    r = admin(server, "GET", "/functions/nosuchfn/calls")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_calls_filters_errors_and_since(server):
    server.get("/function/handler_only")
    server.get("/function/boom")
    calls = admin(server, "GET", "/functions/boom/calls", params={"errors": 1}).json()["calls"]
    assert calls and all(c["outcome"] != "ok" for c in calls)
    newest = calls[0]["time"]
    assert admin(server, "GET", "/functions/boom/calls", params={"since": newest + 1}).json()["calls"] == []
    assert admin(server, "GET", "/functions/boom/calls", params={"since": newest}).json()["calls"]
    assert admin(server, "GET", "/functions/boom/calls", params={"since": "yesterday"}).status_code == 400


def test_healthz_reports_the_history_writer(server):
    doc = server.get("/healthz").json()
    assert doc["history"] == {"dropped": 0, "write_errors": 0, "error": None}


def test_admin_api_off_says_how_to_turn_it_on(make_server):
    s = make_server(functions={"hello": "def main(request):\n    return 'hi'\n"}).start()
    r = s.get("/admin/functions", headers=AUTH)
    doc = r.json()
    assert r.status_code == 404 and doc["error"] == "admin_disabled"
    assert "FNBOX_ADMIN_TOKEN" in doc["message"]


# -- the gateway's own failures (in process: a bug cannot be provoked through a healthy server) ---------------
def test_unexpected_gateway_exceptions_and_werkzeug_413_are_json(tmp_path):
    from werkzeug.exceptions import RequestEntityTooLarge

    from gateway.app import create_app
    from runner.config import Settings

    fdir = tmp_path / "functions"
    fdir.mkdir()
    settings = Settings.from_env({"FNBOX_FUNCTIONS_DIR": str(fdir), "FNBOX_DATA_DIR": str(tmp_path / "data"),
                                  "FNBOX_STATE_DIR": str(tmp_path / "state")})
    app = create_app(settings, start=False)

    @app.get("/test-bug")
    def bug():
        raise KeyError("oops")

    @app.get("/test-too-large")
    def too_large():
        raise RequestEntityTooLarge()

    client = app.test_client()
    r = client.get("/test-bug")
    assert r.status_code == 500 and r.json["error"] == "internal_error" and r.json["request_id"]
    r = client.get("/test-too-large")
    assert r.status_code == 413 and r.json["error"] == "request_too_large"
    app.extensions["fnbox"].history.close()


# -- the history writer -----------------------------------------------------------------------------------------
def test_a_read_does_not_wait_for_retention(tmp_path, monkeypatch):
    """flush() (what every admin read does first) returns once the records are written, even while the
    retention pass waits for the calls to pause."""
    from gateway import history

    monkeypatch.setattr(history, "PRUNE_IDLE_S", 30.0)  # retention would run only after 30 idle seconds
    h = history.History(str(tmp_path / "h.sqlite3"), max_rows=1, wait_s=0)
    try:
        for n in range(3):
            h.record({"time": 1.0 + n, "request_id": f"r{n}", "function": "f", "outcome": "ok"})
        assert h.flush(timeout=5.0)
        assert h.count() == 3  # written, not pruned yet: retention did not hold the read back
        assert h.health() == {"dropped": 0, "write_errors": 0, "error": None}
    finally:
        h.close(timeout=5.0)

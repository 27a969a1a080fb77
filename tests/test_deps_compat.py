"""Function dependencies (requirements.txt installed by pip into the data folder, imported read-only by calls) and
the functions_framework compatibility, with the shapes of Google's documented HTTP samples, through a real server."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import zipfile

import pytest

from tests.conftest import Server
from tests.helpers import assert_error
from tests.test_cli import TOKEN, fnbox, ok, one_line_error

# Google's Cloud Functions HTTP samples (python-docs-samples functions/helloworld, functions/http), as published:
# the decorator, no `main`, and every usual return shape.
GOOGLE_SAMPLES = {
    "hello_http": """
        import functions_framework
        from markupsafe import escape


        @functions_framework.http
        def hello_http(request):
            request_json = request.get_json(silent=True)
            request_args = request.args

            if request_json and "name" in request_json:
                name = request_json["name"]
            elif request_args and "name" in request_args:
                name = request_args["name"]
            else:
                name = "World"
            return f"Hello {escape(name)}!"
    """,
    "hello_method": """
        import functions_framework


        @functions_framework.http
        def hello_method(request):
            from flask import abort

            if request.method == "GET":
                return "Hello World!"
            elif request.method == "PUT":
                return abort(403)
            else:
                return abort(405)
    """,
    "cors_enabled": """
        import functions_framework


        @functions_framework.http
        def cors_enabled_function(request):
            if request.method == "OPTIONS":
                headers = {
                    "Access-Control-Allow-Origin": "*",
                    "Access-Control-Allow-Methods": "GET",
                    "Access-Control-Allow-Headers": "Content-Type",
                    "Access-Control-Max-Age": "3600",
                }
                return ("", 204, headers)
            headers = {"Access-Control-Allow-Origin": "*"}
            return ("Hello World!", 200, headers)
    """,
    "json_reply": """
        import flask
        import functions_framework


        @functions_framework.http
        def json_reply(request):
            data = request.get_json(silent=True) or {}
            return flask.jsonify({"echo": data, "args": request.args.to_dict()})
    """,
    "made_response": """
        import flask
        import functions_framework


        @functions_framework.http
        def made_response(request):
            resp = flask.make_response("made", 201)
            resp.headers["X-Sample"] = "yes"
            return resp
    """,
    "two_entries": """
        import functions_framework


        @functions_framework.http
        def first(request):
            return "first"


        @functions_framework.http
        def second(request):
            return "second"
    """,
    "uses_tinydep": """
        import fnbox_tinydep


        def main(request):
            return fnbox_tinydep.GREETING
    """,
    "writes_deps": """
        import os

        import fnbox_tinydep


        def main(request):
            target = os.path.join(os.path.dirname(fnbox_tinydep.__file__), "__init__.py")
            try:
                with open(target, "a") as f:
                    f.write("GREETING = 'tampered'")
            except OSError as e:
                return type(e).__name__
            return "wrote"
    """,
}
PROFILES = {"functions.toml": """
    [two_entries]
    entry_point = "second"
"""}


def build_wheel(folder: str, greeting: str) -> str:
    """A real, minimal pure-Python wheel (PEP 427), built without any network or build backend."""
    dist = "fnbox_tinydep-1.0.dist-info"
    files = {
        "fnbox_tinydep/__init__.py": f"GREETING = {greeting!r}\n".encode(),
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: fnbox-tinydep\nVersion: 1.0\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fnbox-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = os.path.join(folder, "fnbox_tinydep-1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def server():
    # The data folder (where the deps are) outside /tmp: a call's view mounts a tmpfs of its own on /tmp, which
    # would hide a deps folder below it (docs/functions.md, Dependencies). /var/lib, as a real install's /opt.
    data = tempfile.mkdtemp(prefix="fnbox-test-deps-", dir="/var/lib")
    os.chmod(data, 0o755)
    s = Server(functions=GOOGLE_SAMPLES, profiles=PROFILES, env={"FNBOX_ADMIN_TOKEN": TOKEN, "FNBOX_DATA_DIR": data})
    shutil.rmtree(s.data_dir)
    s.data_dir = data  # removed by stop()
    s.start()
    yield s
    s.stop()


# -- functions_framework -----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_google_hello_http_sample_runs_unchanged(server):
    assert server.get("/function/hello_http").text == "Hello World!"
    assert server.get("/function/hello_http", params={"name": "Ann"}).text == "Hello Ann!"
    assert server.request("POST", "/function/hello_http", json={"name": "<b>Bo</b>"}).text == \
        "Hello &lt;b&gt;Bo&lt;/b&gt;!"
    # get_json(silent=True) with a body that is not JSON: None, not a 415.
    assert server.request("POST", "/function/hello_http", data=b"name=x").text == "Hello World!"


@pytest.mark.timeout(60)
def test_google_samples_return_shapes(server):
    assert server.get("/function/hello_method").text == "Hello World!"
    assert server.request("PUT", "/function/hello_method").status_code == 403
    r = server.request("OPTIONS", "/function/cors_enabled")
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Methods"] == "GET"
    r = server.get("/function/cors_enabled")
    assert r.status_code == 200 and r.text == "Hello World!" and r.headers["Access-Control-Allow-Origin"] == "*"
    r = server.request("POST", "/function/json_reply", params={"a": "1"}, json={"k": [1, 2]})
    assert r.headers["Content-Type"] == "application/json" and r.json() == {"echo": {"k": [1, 2]}, "args": {"a": "1"}}
    r = server.get("/function/made_response")
    assert r.status_code == 201 and r.text == "made" and r.headers["X-Sample"] == "yes"


@pytest.mark.timeout(60)
def test_several_decorated_functions_need_an_entry_point(server):
    assert server.get("/function/two_entries").text == "second"  # entry_point = "second" in functions.toml
    server.write_function("two_no_entry", GOOGLE_SAMPLES["two_entries"])
    assert_error(server.get("/function/two_no_entry"), 500, "no_entry_point", "two_no_entry")


# -- dependencies --------------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_requirements_are_installed_and_imported_read_only(server, tmp_path):
    doc = assert_error(server.get("/function/uses_tinydep"), 500, "missing_dependency", "uses_tinydep")
    assert "fnbox_tinydep" in doc["message"] and "fnbox deps install" in doc["message"]

    wheel = build_wheel(str(tmp_path), "hello from a dependency")
    req = tmp_path / "requirements.txt"
    req.write_text(f"{wheel}\n")
    out = ok(fnbox("deps", "install", str(req), url=server.url, timeout=300))
    assert out == "installed: fnbox_tinydep==1.0\n"
    assert server.get("/function/uses_tinydep").text == "hello from a dependency"
    # The sandbox sees the folder read-only: a call cannot change what the next call imports.
    assert server.get("/function/writes_deps").text == "PermissionError"
    assert server.get("/function/uses_tinydep").text == "hello from a dependency"
    site = os.path.join(server.data_dir, "deps", "site-packages")
    assert os.path.isfile(os.path.join(site, "fnbox_tinydep", "__init__.py"))
    with open(os.path.join(server.functions_dir, "requirements.txt")) as f:
        assert f.read() == f"{wheel}\n"  # deployed beside the functions

    shown = ok(fnbox("deps", url=server.url))
    assert f"    {wheel}" in shown and "fnbox_tinydep==1.0" in shown

    # A failing install changes nothing: the old packages and the old requirements.txt stay.
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{tmp_path}/no-such-package-1.0-py3-none-any.whl\n")
    p = fnbox("deps", "install", str(bad), url=server.url, timeout=300)
    assert p.returncode == 1 and "deps_failed" in p.stderr.splitlines()[-1]
    assert server.get("/function/uses_tinydep").text == "hello from a dependency"
    with open(os.path.join(server.functions_dir, "requirements.txt")) as f:
        assert f.read() == f"{wheel}\n"

    # Reinstalling the deployed requirements.txt picks up a rebuilt wheel.
    build_wheel(str(tmp_path), "rebuilt")
    assert ok(fnbox("deps", "install", url=server.url, timeout=300)) == "installed: fnbox_tinydep==1.0\n"
    assert server.get("/function/uses_tinydep").text == "rebuilt"


@pytest.mark.timeout(60)
def test_deps_install_without_requirements_says_how(make_server):
    s = make_server(functions={"hello": "def main(request):\n    return 'hi'\n"},
                    env={"FNBOX_ADMIN_TOKEN": TOKEN}).start()
    one_line_error(fnbox("deps", "install", url=s.url), "not_found", "requirements.txt")
    assert json.loads(s.get("/admin/deps", headers={"Authorization": f"Bearer {TOKEN}"}).text)["installed"] == []

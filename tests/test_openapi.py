"""The OpenAPI document at /admin/openapi.json describes exactly the app's routes."""

from __future__ import annotations

import re

import pytest

from tests.conftest import Server

TOKEN = "openapi-token-7a"


def _app_routes(app) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every rule of the app: <name> and <path:subpath> become {name}, {subpath}."""
    out = set()
    for rule in app.url_map.iter_rules():
        # The web console (its pages, its session-authenticated helpers, `/` leading to it) is a browser UI
        # documented in docs/console.md, not the HTTP API.
        if rule.endpoint == "static" or rule.endpoint.startswith("console") or rule.rule.startswith("/console"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule).rstrip("/") or "/"
        methods = set(rule.methods)
        if not path.startswith("/function/"):  # Flask adds HEAD and OPTIONS to every rule; functions serve them
            methods -= {"HEAD", "OPTIONS"}
        out.update((path, m.lower()) for m in methods)
    return out


def _doc_routes(doc) -> set[tuple[str, str]]:
    return {(path, method) for path, ops in doc["paths"].items() for method in ops}


@pytest.fixture(scope="module")
def server():
    s = Server(functions={"hello": "def main(request):\n    return 'hi'\n"}, env={"FNBOX_ADMIN_TOKEN": TOKEN})
    s.start()
    yield s
    s.stop()


def test_the_document_matches_the_apps_routes(server, tmp_path, monkeypatch):
    from gateway.app import create_app
    from runner.config import Settings

    monkeypatch.setenv("FNBOX_ADMIN_TOKEN", TOKEN)
    settings = Settings.from_env({"FNBOX_FUNCTIONS_DIR": server.functions_dir, "FNBOX_DATA_DIR": str(tmp_path),
                                  "FNBOX_STATE_DIR": str(tmp_path / "state")})
    app = create_app(settings, start=False)
    try:
        r = server.get("/admin/openapi.json")  # served without the token: it holds no secret
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
        doc = r.json()
        assert doc["openapi"].startswith("3.")
        assert _doc_routes(doc) == _app_routes(app)
    finally:
        app.extensions["fnbox"].history.close()


def test_every_operation_is_described(server):
    doc = server.get("/admin/openapi.json").json()
    ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("summary") and op.get("responses"), (path, method)
            ids.append(op["operationId"])
            for p in op.get("parameters", []):
                if p["in"] == "path":
                    assert "{" + p["name"] + "}" in path
    assert len(ids) == len(set(ids))
    # Every stable error code the gateway answers with is named in the document.
    from gateway.errors import STATUS

    text = str(doc)
    missing = [code for code in STATUS if f"`{code}`" not in text and code not in doc["components"]["schemas"]
               ["Error"]["properties"]["error"]["examples"]]
    assert missing == []

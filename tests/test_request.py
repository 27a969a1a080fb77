"""The request a function sees: a real Flask request rebuilt in the child, attribute by attribute."""

from __future__ import annotations

import hashlib
import os
import random
from urllib.parse import quote

import pytest

from tests.conftest import Server, server_fixture

FUNCTIONS = {
    # Returns what it was asked for (?show=attr), as JSON: one function, many views of the same request.
    "echo": """
        def main(request):
            what = request.args.get('show')
            seen = {
                'method': request.method, 'path': request.path, 'full_path': request.full_path,
                'url': request.url, 'host': request.host, 'remote_addr': request.remote_addr,
                'headers': dict(request.headers), 'cookies': dict(request.cookies),
                'view_args': request.view_args, 'mimetype': request.mimetype,
                'content_length': request.content_length,
                'args': {k: request.args.getlist(k) for k in request.args},
            }
            if what == 'form':
                seen['form'] = {k: request.form.getlist(k) for k in request.form}
            return seen
    """,
    "raw": """
        def main(request):
            return request.get_data(), 200, {'Content-Type': 'application/octet-stream'}
    """,
    "rawlen": """
        import hashlib
        def main(request):
            data = request.data
            return {'len': len(data), 'sha256': hashlib.sha256(data).hexdigest()}
    """,
    "files": """
        import hashlib
        def main(request):
            out = {}
            for field in request.files:
                for f in request.files.getlist(field):
                    data = f.read()
                    out.setdefault(field, []).append({'filename': f.filename, 'mimetype': f.mimetype,
                                                      'len': len(data), 'sha256': hashlib.sha256(data).hexdigest()})
            return {'files': out, 'form': {k: request.form.getlist(k) for k in request.form}}
    """,
    "jsonin": """
        def main(request):
            return {'json': request.get_json()}
    """,
    "jsonsilent": """
        def main(request):
            return {'json': request.get_json(silent=True), 'silent': True}
    """,
}


server = server_fixture(functions=FUNCTIONS)


def echo(server: Server, method: str = "GET", path: str = "/function/echo", **kw) -> dict:
    r = server.request(method, path, **kw)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_method(server, method):
    assert echo(server, method)["method"] == method


@pytest.mark.timeout(30)
def test_path_full_path_url_host(server):
    seen = echo(server, path="/function/echo/a/b?x=1&y=two")
    assert seen["path"] == "/function/echo/a/b"
    assert seen["full_path"] == "/function/echo/a/b?x=1&y=two"
    assert seen["url"] == f"http://127.0.0.1:{server.port}/function/echo/a/b?x=1&y=two"
    assert seen["host"] == f"127.0.0.1:{server.port}"


@pytest.mark.timeout(30)
def test_full_path_without_query(server):
    seen = echo(server)
    assert seen["path"] == "/function/echo"
    assert seen["full_path"] == "/function/echo?"  # Flask's own rendering of an empty query
    assert seen["url"] == f"http://127.0.0.1:{server.port}/function/echo"


@pytest.mark.timeout(30)
def test_host_header(server):
    seen = echo(server, headers={"Host": "fn.example.test:8080"})
    assert seen["host"] == "fn.example.test:8080"
    assert seen["url"] == "http://fn.example.test:8080/function/echo"


@pytest.mark.timeout(30)
def test_args_with_repeated_keys(server):
    seen = echo(server, path="/function/echo?a=1&a=2&b=%C3%BC&c=&a=3")
    assert seen["args"] == {"a": ["1", "2", "3"], "b": ["ü"], "c": [""]}


@pytest.mark.timeout(30)
def test_form_urlencoded(server):
    seen = echo(server, "POST", "/function/echo?show=form", data={"k": ["v1", "v2"], "u": "ünï & ="})
    assert seen["form"] == {"k": ["v1", "v2"], "u": ["ünï & ="]}
    assert seen["mimetype"] == "application/x-www-form-urlencoded"


@pytest.mark.timeout(30)
def test_multipart_files_survive(server):
    blob = bytes(range(256)) + os.urandom(50_000)
    text = "ünïcødé\r\n--not-a-boundary\r\n".encode() * 10
    r = server.request("POST", "/function/files", files=[
        ("up", ("blob.bin", blob, "application/octet-stream")),
        ("up", ("second.txt", text, "text/plain")),
        ("other", ("ünï.dat", b"", "application/x-empty")),
    ], data={"field": "value"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["form"] == {"field": ["value"]}
    up = doc["files"]["up"]
    assert up[0] == {"filename": "blob.bin", "mimetype": "application/octet-stream", "len": len(blob),
                     "sha256": hashlib.sha256(blob).hexdigest()}
    assert up[1] == {"filename": "second.txt", "mimetype": "text/plain", "len": len(text),
                     "sha256": hashlib.sha256(text).hexdigest()}
    assert doc["files"]["other"][0]["filename"] == "ünï.dat"
    assert doc["files"]["other"][0]["len"] == 0


@pytest.mark.timeout(30)
def test_binary_body_round_trips_exactly(server):
    rng = random.Random(1234)
    data = bytes(range(256)) + bytes(rng.getrandbits(8) for _ in range(300_000)) + b"\r\n\x00\xff"
    r = server.request("POST", "/function/raw", data=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200
    assert r.content == data


@pytest.mark.timeout(30)
@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain; charset=utf-8"])
def test_get_data_sees_every_byte(server, content_type):
    data = bytes(range(256)) * 4 + os.urandom(4096)
    headers = {"Content-Type": content_type} if content_type else {}
    r = server.request("PUT", "/function/rawlen", data=data, headers=headers)
    assert r.status_code == 200
    assert r.json() == {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.timeout(30)
def test_chunked_body(server):
    parts = [b"\x00\x01", bytes(range(256)), b"", b"end"]
    r = server.request("POST", "/function/raw", data=iter(parts))
    assert r.status_code == 200
    assert r.content == b"".join(parts)


@pytest.mark.timeout(30)
def test_empty_body(server):
    r = server.request("POST", "/function/raw", data=b"")
    assert r.status_code == 200
    assert r.content == b""


@pytest.mark.timeout(30)
def test_get_json(server):
    payload = {"a": [1, 2.5, None, True], "ü": {"nested": "çødé"}, "big": "x" * 10_000}
    r = server.request("POST", "/function/jsonin", json=payload)
    assert r.status_code == 200
    assert r.json() == {"json": payload}


@pytest.mark.timeout(30)
def test_get_json_silent_on_bad_json_is_none(server):
    r = server.request("POST", "/function/jsonsilent", data=b"{not json",
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert r.json() == {"json": None, "silent": True}


@pytest.mark.timeout(30)
def test_get_json_on_bad_json_is_400(server):
    r = server.request("POST", "/function/jsonin", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.headers["X-Request-Id"]


@pytest.mark.timeout(30)
def test_get_json_with_wrong_content_type_is_415(server):
    r = server.request("POST", "/function/jsonin", data=b'{"a": 1}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.headers["X-Request-Id"]


@pytest.mark.timeout(30)
def test_headers(server):
    seen = echo(server, headers={"X-Custom": "value 1", "X-Latin": "caf\xe9", "Authorization": "Bearer t0k3n",
                                 "Accept": "application/json"})
    headers = seen["headers"]
    assert headers["X-Custom"] == "value 1"
    assert headers["X-Latin"] == "caf\xe9"
    assert headers["Authorization"] == "Bearer t0k3n"
    assert headers["Accept"] == "application/json"
    assert headers["Host"] == f"127.0.0.1:{server.port}"


@pytest.mark.timeout(30)
def test_cookies(server):
    seen = echo(server, headers={"Cookie": 'session=abc123; theme=dark; quoted="a b"'})
    assert seen["cookies"] == {"session": "abc123", "theme": "dark", "quoted": "a b"}


@pytest.mark.timeout(30)
def test_remote_addr(server):
    assert echo(server)["remote_addr"] == "127.0.0.1"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("subpath", ["ünï/çødé/x", "a/b/c/d/e", "日本/語", "with space/and+plus", "trailing/"])
def test_view_args_subpath(server, subpath):
    seen = echo(server, path="/function/echo/" + quote(subpath))
    assert seen["view_args"]["subpath"] == subpath
    assert seen["path"] == "/function/echo/" + subpath


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["/function/echo", "/function/echo/"])
def test_view_args_without_subpath(server, path):
    assert echo(server, path=path)["view_args"]["subpath"] == ""


@pytest.mark.timeout(30)
def test_mimetype_and_content_length(server):
    body = "ünï".encode() * 100
    seen = echo(server, "PATCH", data=body, headers={"Content-Type": "text/csv; charset=utf-8"})
    assert seen["mimetype"] == "text/csv"
    assert seen["content_length"] == len(body)
    assert seen["headers"]["Content-Type"] == "text/csv; charset=utf-8"


@pytest.mark.timeout(30)
def test_no_body_means_no_content_length(server):
    seen = echo(server)
    assert seen["content_length"] is None
    assert seen["mimetype"] == ""

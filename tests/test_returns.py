"""What main() returns becomes the HTTP response exactly as a Flask view's return value would."""

from __future__ import annotations

import pytest

from tests.conftest import Server, server_fixture
from tests.helpers import assert_error

FUNCTIONS = {
    "ret_str": """
        def main(request):
            return 'héllo wörld'
    """,
    "ret_bytes": """
        def main(request):
            return bytes(range(256))
    """,
    "ret_dict": """
        def main(request):
            return {'a': 1, 'b': [True, None], 'ü': 'çø'}
    """,
    "ret_list": """
        def main(request):
            return [1, 'two', {'three': 3}]
    """,
    "ret_status": """
        def main(request):
            return 'created', 201
    """,
    "ret_status_reason": """
        def main(request):
            return 'custom', '299 Custom Reason'
    """,
    "ret_headers": """
        def main(request):
            return 'with headers', {'X-One': '1', 'Cache-Control': 'no-store'}
    """,
    "ret_headers_list": """
        def main(request):
            return 'with header list', [('X-Multi', 'a'), ('X-Multi', 'b')]
    """,
    "ret_status_headers": """
        def main(request):
            return {'ok': False}, 418, {'X-Teapot': 'yes', 'Location': '/elsewhere'}
    """,
    "ret_make_response": """
        import flask
        def main(request):
            resp = flask.make_response('made', 202)
            resp.headers['X-Made'] = 'true'
            resp.set_cookie('session', 'abc', httponly=True, path='/')
            resp.set_cookie('theme', 'dark', max_age=60)
            return resp
    """,
    "ret_response_mimetype": """
        from flask import Response
        def main(request):
            return Response('a,b\\n1,2\\n', status=203, mimetype='text/csv', headers={'X-Csv': '1'})
    """,
    "ret_response_bytes": """
        from flask import Response
        def main(request):
            return Response(b'\\x89PNG\\r\\n\\x1a\\n\\x00', content_type='image/png')
    """,
    "ret_redirect": """
        import flask
        def main(request):
            return flask.redirect('/function/ret_str', code=307)
    """,
    "ret_gen_str": """
        def main(request):
            def gen():
                for i in range(5):
                    yield f'chunk{i};'
            return gen()
    """,
    "ret_gen_bytes": """
        def main(request):
            def gen():
                yield b'\\x00\\x01'
                yield b''
                yield bytes(range(256))
            return gen(), 200, {'Content-Type': 'application/octet-stream'}
    """,
    "ret_gen_raises": """
        def main(request):
            def gen():
                yield 'partial'
                raise ValueError('failed midway')
            return gen()
    """,
    "ret_jsonify": """
        import flask
        def main(request):
            return flask.jsonify(items=[1, 2], name='ünï')
    """,
    "ret_jsonify_status": """
        import flask
        def main(request):
            return flask.jsonify(error='nope'), 422
    """,
    "ret_abort": """
        import flask
        def main(request):
            flask.abort(403)
    """,
    "ret_abort_response": """
        import flask
        def main(request):
            flask.abort(flask.make_response({'why': 'teapot'}, 418))
    """,
    "ret_none": """
        def main(request):
            pass
    """,
    "ret_unserialisable": """
        def main(request):
            return {'thing': object()}
    """,
    "ret_deep": """
        def main(request):
            x = []
            for _ in range(100_000):
                x = [x]
            return x
    """,
    "ret_bad_type": """
        def main(request):
            return 42
    """,
}


server = server_fixture(functions=FUNCTIONS)


def call(server: Server, name: str, **kw):
    kw.setdefault("allow_redirects", False)
    r = server.get(f"/function/{name}", **kw)
    assert r.headers.get("X-Request-Id")
    return r


@pytest.mark.timeout(30)
def test_str(server):
    r = call(server, "ret_str")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert r.content == "héllo wörld".encode()


@pytest.mark.timeout(30)
def test_bytes(server):
    r = call(server, "ret_bytes")
    assert r.status_code == 200
    assert r.content == bytes(range(256))
    assert r.headers["Content-Length"] == "256"


@pytest.mark.timeout(30)
def test_dict_is_json(server):
    r = call(server, "ret_dict")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"a": 1, "b": [True, None], "ü": "çø"}


@pytest.mark.timeout(30)
def test_list_is_json(server):
    r = call(server, "ret_list")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == [1, "two", {"three": 3}]


@pytest.mark.timeout(30)
def test_body_status(server):
    r = call(server, "ret_status")
    assert (r.status_code, r.text) == (201, "created")


@pytest.mark.timeout(30)
def test_body_status_with_reason(server):
    r = call(server, "ret_status_reason")
    assert (r.status_code, r.reason, r.text) == (299, "Custom Reason", "custom")


@pytest.mark.timeout(30)
def test_body_headers(server):
    r = call(server, "ret_headers")
    assert (r.status_code, r.text) == (200, "with headers")
    assert r.headers["X-One"] == "1"
    assert r.headers["Cache-Control"] == "no-store"


@pytest.mark.timeout(30)
def test_body_header_list_keeps_repeated_headers(server):
    r = call(server, "ret_headers_list")
    assert r.status_code == 200
    assert r.raw.headers.getlist("X-Multi") == ["a", "b"]


@pytest.mark.timeout(30)
def test_body_status_headers(server):
    r = call(server, "ret_status_headers")
    assert r.status_code == 418
    assert r.json() == {"ok": False}
    assert r.headers["X-Teapot"] == "yes"
    assert r.headers["Location"] == "/elsewhere"


@pytest.mark.timeout(30)
def test_make_response_keeps_status_headers_cookies(server):
    r = call(server, "ret_make_response")
    assert (r.status_code, r.text) == (202, "made")
    assert r.headers["X-Made"] == "true"
    set_cookies = r.raw.headers.getlist("Set-Cookie")
    assert len(set_cookies) == 2, set_cookies
    session = next(c for c in set_cookies if c.startswith("session="))
    assert "HttpOnly" in session and "Path=/" in session
    theme = next(c for c in set_cookies if c.startswith("theme="))
    assert "Max-Age=60" in theme
    assert r.cookies.get("session") == "abc"
    assert r.cookies.get("theme") == "dark"


@pytest.mark.timeout(30)
def test_response_mimetype(server):
    r = call(server, "ret_response_mimetype")
    assert r.status_code == 203
    assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert r.headers["X-Csv"] == "1"
    assert r.text == "a,b\n1,2\n"


@pytest.mark.timeout(30)
def test_response_content_type_bytes(server):
    r = call(server, "ret_response_bytes")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "image/png"
    assert r.content == b"\x89PNG\r\n\x1a\n\x00"


@pytest.mark.timeout(30)
def test_redirect(server):
    r = call(server, "ret_redirect")
    assert r.status_code == 307
    assert r.headers["Location"] == "/function/ret_str"


@pytest.mark.timeout(30)
def test_generator_of_str(server):
    r = call(server, "ret_gen_str")
    assert r.status_code == 200
    assert r.text == "chunk0;chunk1;chunk2;chunk3;chunk4;"


@pytest.mark.timeout(30)
def test_generator_of_bytes(server):
    r = call(server, "ret_gen_bytes")
    assert r.status_code == 200
    assert r.content == b"\x00\x01" + bytes(range(256))
    assert r.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.timeout(30)
def test_generator_raising_midway_is_function_error(server):
    doc = assert_error(call(server, "ret_gen_raises"), 500, "function_error", "ret_gen_raises")
    assert (doc["type"], doc["message"]) == ("ValueError", "failed midway")


@pytest.mark.timeout(30)
def test_jsonify(server):
    r = call(server, "ret_jsonify")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"items": [1, 2], "name": "ünï"}


@pytest.mark.timeout(30)
def test_jsonify_with_status(server):
    r = call(server, "ret_jsonify_status")
    assert r.status_code == 422
    assert r.json() == {"error": "nope"}


@pytest.mark.timeout(30)
def test_abort_403(server):
    r = call(server, "ret_abort")
    assert r.status_code == 403
    assert "Forbidden" in r.text


@pytest.mark.timeout(30)
def test_abort_with_response(server):
    r = call(server, "ret_abort_response")
    assert r.status_code == 418
    assert r.json() == {"why": "teapot"}


@pytest.mark.timeout(30)
def test_none_is_function_error(server):
    doc = assert_error(call(server, "ret_none"), 500, "function_error", "ret_none")
    assert "did not return a valid response" in doc["message"]


@pytest.mark.timeout(30)
def test_unserialisable_dict_is_function_error(server):
    doc = assert_error(call(server, "ret_unserialisable"), 500, "function_error", "ret_unserialisable")
    assert doc["type"] == "TypeError"
    assert "not JSON serializable" in doc["message"]


@pytest.mark.timeout(30)
def test_deeply_nested_list_is_function_error(server):
    doc = assert_error(call(server, "ret_deep"), 500, "function_error", "ret_deep")
    assert doc["type"] == "RecursionError"


@pytest.mark.timeout(30)
def test_unsupported_return_type_is_function_error(server):
    doc = assert_error(call(server, "ret_bad_type"), 500, "function_error", "ret_bad_type")
    assert doc["type"] == "TypeError"

"""The console over plain HTTP against real servers: on/off, sign-in, cookie flags, CSRF, CSP, logout, rate
limits, the playground's roles, caps and errors, the live tail's event stream, call filters and pages."""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid

import pytest
import requests

from tests.conftest import Server
from tests.console_kit import ADMIN_TOKEN, HELLO, PLAY_TOKEN, PROFILES, login_form_token, page_csrf, sign_in

CONSOLE_ENV_OFF = {"FNBOX_ADMIN_TOKEN": "", "FNBOX_CONSOLE_PASSWORD": "", "FNBOX_PLAYGROUND_TOKEN": "",
                   "FNBOX_PLAYGROUND_ALLOW": ""}
FAILING = "def main(request):\n    raise ValueError('nope')\n"


def console_env(**extra: str) -> dict[str, str]:
    return {**CONSOLE_ENV_OFF, "FNBOX_ADMIN_TOKEN": ADMIN_TOKEN, "FNBOX_PLAYGROUND_TOKEN": PLAY_TOKEN, **extra}


@pytest.fixture(scope="module")
def server():
    # Two workers: sessions, CSRF tokens and rate limits live in the console's database, shared by both.
    s = Server(functions={"hello": HELLO, "failing": FAILING}, profiles=PROFILES, env=console_env(), workers=2)
    s.start()
    yield s
    s.stop()


def post_json(s: requests.Session, server: Server, path: str, doc: dict, csrf: str | None,
              **headers: str) -> requests.Response:
    h = dict(headers)
    if csrf is not None:
        h["X-CSRF-Token"] = csrf
    return s.post(server.url + path, json=doc, headers=h, timeout=30)


# -- on and off ------------------------------------------------------------------------------------------------
def test_console_is_off_without_tokens_and_the_server_says_so(make_server):
    s = make_server(functions={"hello": HELLO}, env=CONSOLE_ENV_OFF).start()
    for path in ("/", "/console/", "/console/login", "/console/playground", "/console/static/console.css"):
        r = s.get(path, allow_redirects=False)
        assert r.status_code == 404, (path, r.status_code)
        assert r.json()["error"] == "not_found"
    assert "web console off" in s.read_log()
    assert s.get("/function/hello").text == "hello v0"


def test_console_on_says_so_and_home_leads_to_sign_in(server):
    assert "web console on at /console/" in server.read_log()
    r = server.get("/", allow_redirects=False)
    assert r.status_code == 302 and r.headers["Location"].endswith("/console/")
    r = server.get("/console/calls?function=hello", allow_redirects=False)
    assert r.status_code == 302 and "/console/login?next=" in r.headers["Location"]
    r = server.request("POST", "/console/api/playground/run", json={"source": "x"})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"


# -- sign in, cookies, logout -----------------------------------------------------------------------------------
def test_wrong_token_gets_a_clear_message_and_no_session(server):
    s = requests.Session()
    tok = login_form_token(s, server)
    r = s.post(server.url + "/console/login", data={"csrf": tok, "secret": "wrong"}, allow_redirects=False,
               timeout=30)
    assert r.status_code == 401
    assert "That token or password is not right." in r.text
    assert "fnbox_console=" not in r.headers.get("Set-Cookie", "")


def test_session_cookie_flags_over_http_and_behind_https(server):
    s = requests.Session()
    tok = login_form_token(s, server)
    r = s.post(server.url + "/console/login", data={"csrf": tok, "secret": ADMIN_TOKEN}, allow_redirects=False,
               timeout=30)
    assert r.status_code == 302
    cookie = next(c for c in r.raw.headers.getlist("Set-Cookie") if c.startswith("fnbox_console="))
    flags = [f.strip().lower() for f in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags  # plain http: a Secure cookie would never come back

    # Behind nginx with TLS (X-Forwarded-Proto from a trusted proxy): a __Host- cookie, Secure.
    s2 = requests.Session()
    https = {"X-Forwarded-Proto": "https"}
    page = s2.get(server.url + "/console/login", headers=https, timeout=30)
    tok2 = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    s2.cookies.set("fnbox_console_login", tok2, path="/console/")  # requests keeps Secure cookies for https only
    r = s2.post(server.url + "/console/login", data={"csrf": tok2, "secret": ADMIN_TOKEN}, headers=https,
                allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text
    cookie = next(c for c in r.raw.headers.getlist("Set-Cookie") if c.startswith("__Host-fnbox_console="))
    flags = [f.strip().lower() for f in cookie.split(";")]
    assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags and "path=/" in flags


def test_logout_ends_the_session_for_good(server):
    s, csrf = sign_in(server)
    stolen = dict(s.cookies)
    r = s.post(server.url + "/console/logout", data={"csrf": csrf}, allow_redirects=False, timeout=30)
    assert r.status_code == 302 and r.headers["Location"].endswith("/console/login")
    # Replaying the old cookie: the server-side session is gone.
    r = requests.get(server.url + "/console/", cookies=stolen, allow_redirects=False, timeout=30)
    assert r.status_code == 302 and "/console/login" in r.headers["Location"]
    r = requests.post(server.url + "/console/api/playground/run", cookies=stolen, json={"source": "x"},
                      headers={"X-CSRF-Token": csrf}, timeout=30)
    assert r.status_code == 401


def test_logout_needs_the_csrf_token(server):
    s, csrf = sign_in(server)
    r = s.post(server.url + "/console/logout", data={}, allow_redirects=False, timeout=30)
    assert r.status_code == 403 and "missing or wrong CSRF token" in r.text
    assert s.get(server.url + "/console/", allow_redirects=False, timeout=30).status_code == 200


def test_failed_sign_ins_are_rate_limited_per_client(make_server):
    s = make_server(functions={"hello": HELLO}, env=console_env(FNBOX_CONSOLE_LOGIN_RATE="3")).start()
    sess = requests.Session()
    tok = login_form_token(sess, s)
    for _ in range(3):
        r = sess.post(s.url + "/console/login", data={"csrf": tok, "secret": "guess"}, timeout=30)
        assert r.status_code == 401
    # Even the right token waits now: guessing must not be told which guess was right.
    r = sess.post(s.url + "/console/login", data={"csrf": tok, "secret": ADMIN_TOKEN}, allow_redirects=False,
                  timeout=30)
    assert r.status_code == 429
    assert "Too many failed sign-ins from your address" in r.text  # on the sign-in page, for a person
    assert int(r.headers["Retry-After"]) >= 1


# -- CSRF and CSP ------------------------------------------------------------------------------------------------
def test_state_changes_without_the_csrf_token_are_refused(server):
    s, csrf = sign_in(server)
    deploy = "/console/api/functions/hello/deploy"
    new = {"source": "def main(request):\n    return 'csrf'\n"}
    for token, headers in ((None, {}), ("wrong", {}), (csrf, {"Origin": "http://evil.example"})):
        r = post_json(s, server, deploy, new, token, **headers)
        assert r.status_code == 403, r.text
        assert r.json()["error"] == "csrf_failed"
    assert server.get("/function/hello").text == "hello v0"  # nothing was deployed
    r = s.post(server.url + "/console/functions/hello/rollback", data={"version": "1"}, allow_redirects=False,
               timeout=30)
    assert r.status_code == 403
    # The sign-in form has its own token (there is no session yet).
    r = requests.post(server.url + "/console/login", data={"secret": ADMIN_TOKEN}, allow_redirects=False, timeout=30)
    assert r.status_code == 403


@pytest.mark.parametrize("path", ["/console/login", "/console/", "/console/functions/hello", "/console/calls",
                                  "/console/metrics", "/console/playground"])
def test_pages_have_a_strict_csp_and_no_inline_script_or_style(server, path):
    s, _ = sign_in(server)
    if path == "/console/login":
        s = requests.Session()
    r = s.get(server.url + path, timeout=30)
    assert r.status_code == 200
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Cache-Control"] == "no-store"
    html = r.text
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    assert not re.search(r"<style\b", html)
    assert not re.search(r"\sstyle\s*=", html)
    assert not re.search(r"\son[a-z]+\s*=", html)
    assert "javascript:" not in html


# -- functions, invoke, deploy, rollback ---------------------------------------------------------------------------
def test_deploy_syntax_error_is_422_at_its_line_then_deploy_and_rollback(make_server):
    s = make_server(functions={"hello": HELLO}, env=console_env()).start()
    sess, csrf = sign_in(s)
    r = post_json(sess, s, "/console/api/functions/hello/deploy",
                  {"source": "def main(request):\n    x = (\n\n"}, csrf)
    assert r.status_code == 422 and r.json()["error"] == "syntax_error" and r.json()["line"] == 2
    deployed = []
    for n in (1, 2):
        r = post_json(sess, s, "/console/api/functions/hello/deploy",
                      {"source": f"def main(request):\n    return 'v{n}'\n"}, csrf)
        assert r.status_code == 201
        deployed.append(r.json()["version"])
    assert deployed[1] == deployed[0] + 1  # (the hand-placed file before them is kept as a version too)
    assert s.get("/function/hello").text == "v2"
    page = sess.get(s.url + "/console/functions/hello", timeout=30).text
    assert "Roll back" in page
    r = sess.post(s.url + "/console/functions/hello/rollback", data={"csrf": csrf, "version": str(deployed[0])},
                  allow_redirects=False, timeout=30)
    assert r.status_code == 302 and "done=rolledback" in r.headers["Location"]
    assert s.get("/function/hello").text == "v1"
    r = post_json(sess, s, "/console/api/functions/_private/deploy", {"source": "x = 1\n"}, csrf)
    assert r.status_code == 400 and r.json()["error"] == "invalid_name"


def test_invoke_form_makes_a_real_call_and_reports_it(server):
    s, csrf = sign_in(server)
    server.write_function("add", "def main(request):\n    d = request.get_json()\n    print('adding', d)\n"
                                 "    return {'sum': d['a'] + d['b']}\n")
    r = post_json(s, server, "/console/api/functions/add/invoke",
                  {"method": "POST", "body": '{"a": 2, "b": 3}', "body_kind": "json", "headers": "X-Test: 1"}, csrf)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["status"] == 200 and doc["outcome"] == "ok"
    assert '"sum":5' in doc["body"].replace(" ", "")
    assert "adding" in doc["output"]
    assert doc["cpu_ms"] is not None and doc["max_rss_kb"] is not None
    r = post_json(s, server, "/console/api/functions/add/invoke", {"method": "POST", "body": "{bad",
                                                                   "body_kind": "json"}, csrf)
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]


def test_function_page_masks_env_secrets(server):
    s, _ = sign_in(server)
    page = s.get(server.url + "/console/functions/hello", timeout=30).text
    assert "API_KEY" in page and "s3cret-value-never-shown" not in page
    assert s.get(server.url + "/console/functions/nosuch", timeout=30).status_code == 404


# -- calls -------------------------------------------------------------------------------------------------------
def test_calls_filters_and_pages_newest_first(make_server):
    s = make_server(functions={"hello": HELLO, "failing": FAILING}, env=console_env()).start()
    for _ in range(53):
        assert s.get("/function/hello").status_code == 200
    assert s.get("/function/failing").status_code == 500
    sess, _ = sign_in(s)
    page = sess.get(s.url + "/console/calls", timeout=30).text
    ids = [int(x) for x in re.findall(r'<tr data-id="(\d+)"', page)]
    assert len(ids) == 50 and ids == sorted(ids, reverse=True)
    assert "failing" in page.split("<tbody>")[1].split("</tr>")[0]  # the newest call first
    # One board (no Redis): its own calls, each labelled with it, no board column or filter to choose from.
    board = socket.gethostname()
    assert set(re.findall(r'<tr data-id="\d+" data-board="([^"]*)"', page)) == {board}
    assert '<select name="board">' not in page and "<th>Board</th>" not in page
    # Pages go back in time: `until` is the last row's time.
    older = re.search(r'href="([^"]*until=[0-9.]+[^"]*)"', page).group(1).replace("&amp;", "&")
    page2 = sess.get(s.url + older, timeout=30).text
    ids2 = [int(x) for x in re.findall(r'<tr data-id="(\d+)"', page2)]
    assert len(ids2) == 4 and max(ids2) < min(ids)
    only = sess.get(s.url + "/console/calls?outcome=function_error", timeout=30).text
    assert len(re.findall(r'<tr data-id="', only)) == 1
    assert len(re.findall(r'<tr data-id="', sess.get(s.url + "/console/calls?status=500", timeout=30).text)) == 1
    assert len(re.findall(r'<tr data-id="', sess.get(s.url + "/console/calls?function=failing&range=15m",
                                                      timeout=30).text)) == 1
    r = sess.get(s.url + "/console/calls?status=abc", timeout=30)
    assert r.status_code == 400 and "status must be" in r.text
    r = sess.get(s.url + "/console/calls?until=yesterday", timeout=30)
    assert r.status_code == 400 and "until must be" in r.text
    r = sess.get(s.url + "/console/calls?board=elsewhere", timeout=30)
    assert r.status_code == 404 and "no board named" in r.text
    rid = re.search(r'href="/console/calls/([^"?]+)"', page).group(1)
    detail = sess.get(s.url + f"/console/calls/{rid}", timeout=30).text
    assert f'id="call-board">{board}<' in detail and 'id="elsewhere"' not in detail


def test_live_tail_streams_new_calls(server):
    s, _ = sign_in(server)
    rid = uuid.uuid4().hex
    with s.get(server.url + "/console/api/calls/stream?function=hello", stream=True, timeout=15) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = resp.iter_lines(decode_unicode=True)
        assert next(lines).startswith("retry:")  # the stream is open: calls from now on are sent
        assert server.get("/function/failing").status_code == 500  # filtered out
        assert server.get("/function/hello", headers={"X-Request-Id": rid}).status_code == 200
        deadline = time.monotonic() + 10
        seen = []
        for line in lines:
            if line.startswith("data:"):
                seen.append(line)
                if rid in line:
                    break
            assert time.monotonic() < deadline, seen
    assert all('"function": "hello"' in x for x in seen)


def test_call_detail_shows_request_and_error_fields_redacted(server):
    s, _ = sign_in(server)
    rid = uuid.uuid4().hex
    server.get("/function/failing?api_key=k123&x=1", headers={"X-Request-Id": rid, "Cookie": "a=cookie123",
                                                              "X-Api-Key": "xkey123"})
    page = s.get(server.url + f"/console/calls/{rid}", timeout=30).text
    assert "GET /function/failing?api_key=[redacted]&amp;x=1" in page
    assert "cookie123" not in page and "k123" not in page and "xkey123" not in page
    assert "function_error" in page
    assert s.get(server.url + "/console/calls/nosuchid", timeout=30).status_code == 404


# -- playground ----------------------------------------------------------------------------------------------------
SNIPPETS = {
    "memory": ("def main(request):\n    a = []\n    while True:\n        a.append(bytearray(8 << 20))\n",
               "memory_limit", 502),
    "crash": ("import os\n\ndef main(request):\n    os._exit(3)\n", "crashed", 502),
    "error": ("def main(request):\n    return 1 / 0\n", "function_error", 500),
    "timeout": ("import time\n\ndef main(request):\n    time.sleep(30)\n", "timeout", 504),
}


@pytest.mark.parametrize("kind", sorted(SNIPPETS))
def test_playground_shows_the_clean_error(server, kind):
    s, csrf = sign_in(server, PLAY_TOKEN)
    src, outcome, status = SNIPPETS[kind]
    r = post_json(s, server, "/console/api/playground/run", {"source": src}, csrf)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["outcome"] == outcome and doc["status"] == status, doc
    assert doc["profile"] == "strict" and doc["limits"]["memory_mb"] == 64
    assert f'"error": "{outcome}"' in doc["body"]
    if kind == "error":
        assert doc["error_type"] == "ZeroDivisionError" and "ZeroDivisionError" in doc["traceback"]


def test_playground_runs_like_fnbox_run_and_creates_nothing(server):
    s, csrf = sign_in(server, PLAY_TOKEN)
    src = ("import os\n\ndef main(request):\n    print('hi from', request.path)\n"
           "    return {'q': request.args.get('q'), 'json': request.get_json(silent=True), 'env': os.environ.get("
           "'API_KEY')}, 201, {'X-Snippet': 'yes'}\n")
    r = post_json(s, server, "/console/api/playground/run",
                  {"source": src, "method": "POST", "path": "sub", "query": "q=1", "body": '{"a": 1}',
                   "body_kind": "json"}, csrf)
    doc = r.json()
    assert doc["outcome"] == "ok" and doc["status"] == 201
    assert ["X-Snippet", "yes"] in doc["headers"]
    assert '"q":"1"' in doc["body"].replace(" ", "") and '"a":1' in doc["body"].replace(" ", "")
    assert '"env":null' in doc["body"].replace(" ", "")  # no function's secrets
    assert doc["output"].startswith("hi from /function/snippet/sub")
    assert doc["cpu_ms"] is not None and doc["max_rss_kb"] is not None
    assert server.get("/function/snippet").status_code == 404
    r = post_json(s, server, "/console/api/playground/run", {"source": "def main(request):\n  return (\n"}, csrf)
    assert r.status_code == 422 and r.json()["line"] == 2


def test_playground_token_opens_the_playground_only(server):
    s, csrf = sign_in(server, PLAY_TOKEN)
    for path in ("/console/", "/console/calls", "/console/functions/hello", "/console/metrics"):
        r = s.get(server.url + path, allow_redirects=False, timeout=30)
        assert r.status_code == 302 and r.headers["Location"].endswith("/console/playground"), path
    r = post_json(s, server, "/console/api/functions/hello/deploy", {"source": "x = 1\n"}, csrf)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = post_json(s, server, "/console/api/playground/save", {"name": "x", "source": "x = 1\n"}, csrf)
    assert r.status_code == 403
    page = s.get(server.url + "/console/playground", timeout=30).text
    assert "Save as function" not in page and ">Functions<" not in page
    r = s.get(server.url + "/console/api/calls/stream", timeout=30)
    assert r.status_code == 403


def test_playground_allow_list_opens_it_without_a_token(make_server):
    s = make_server(functions={"hello": HELLO}, env={**CONSOLE_ENV_OFF, "FNBOX_PLAYGROUND_ALLOW": "127.0.0.0/8"})
    s.start()
    assert "playground open to 127.0.0.0/8" in s.read_log()
    sess = requests.Session()
    page = sess.get(s.url + "/console/playground", timeout=30)
    assert page.status_code == 200
    r = post_json(sess, s, "/console/api/playground/run", {"source": "def main(request):\n    return 'ok'\n"},
                  page_csrf(page.text))
    assert r.json()["body"] == "ok"
    assert sess.get(s.url + "/console/calls", allow_redirects=False, timeout=30).headers["Location"].endswith(
        "/console/playground")
    # An operator on that network can still sign in: the sign-in page does not bounce a playground session.
    assert sess.get(s.url + "/console/login", allow_redirects=False, timeout=30).status_code == 200


def test_playground_rate_limit_per_client(make_server):
    s = make_server(functions={"hello": HELLO}, env=console_env(FNBOX_PLAYGROUND_RATE="2")).start()
    sess, csrf = sign_in(s, PLAY_TOKEN)
    src = {"source": "def main(request):\n    return 'ok'\n"}
    for _ in range(2):
        assert post_json(sess, s, "/console/api/playground/run", src, csrf).status_code == 200
    r = post_json(sess, s, "/console/api/playground/run", src, csrf)
    assert r.status_code == 429 and r.json()["error"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    assert s.get("/function/hello").status_code == 200  # functions are not rate limited by it


def test_playground_concurrency_cap_never_starves_functions(make_server):
    s = make_server(functions={"hello": HELLO}, env=console_env(FNBOX_PLAYGROUND_CONCURRENCY="1"))
    s.write_profile("strict.toml", "timeout_s = 8\ncpu_s = 1\nmemory_mb = 64\nmax_processes = 1\n")
    s.start()
    sess, csrf = sign_in(s, PLAY_TOKEN)
    slow = {"source": "import time\n\ndef main(request):\n    time.sleep(6)\n    return 'slow'\n"}
    quick = {"source": "def main(request):\n    return 'quick'\n"}
    results: list[requests.Response] = []
    def run_slow() -> None:
        for _ in range(100):  # a quick run of the main thread may hold the one place for a moment
            r = post_json(sess, s, "/console/api/playground/run", slow, csrf)
            if r.status_code != 503:
                results.append(r)
                return
            time.sleep(0.05)

    t = threading.Thread(target=run_slow)
    t.start()
    busy = None
    try:
        while t.is_alive() and busy is None:
            r = post_json(sess, s, "/console/api/playground/run", quick, csrf)
            if r.status_code == 503:
                busy = r
            else:
                time.sleep(0.05)  # the slow run has not taken its place yet
        assert busy is not None and busy.json()["error"] == "busy"
        assert "FNBOX_PLAYGROUND_CONCURRENCY" in busy.json()["message"]
        assert t.is_alive()
        assert s.get("/function/hello").text == "hello v0"  # while the playground is full
    finally:
        t.join(30)
    assert results and results[0].json()["body"] == "slow"
    assert post_json(sess, s, "/console/api/playground/run", quick, csrf).json()["body"] == "quick"


def test_save_as_function_deploys_the_snippet(server):
    s, csrf = sign_in(server)
    r = post_json(s, server, "/console/api/playground/save",
                  {"name": "saved_fn", "source": "def main(request):\n    return 'saved'\n"}, csrf)
    assert r.status_code == 201 and r.json()["version"] == 1
    assert server.get("/function/saved_fn").text == "saved"
    r = post_json(s, server, "/console/api/playground/save", {"name": "bad-name", "source": "x = 1\n"}, csrf)
    assert r.status_code == 400 and r.json()["error"] == "invalid_name"


def test_metrics_page_draws_charts_and_layers(server):
    server.get("/function/hello")
    server.get("/function/failing")
    s, _ = sign_in(server)
    page = s.get(server.url + "/console/metrics?range=15m", timeout=30).text
    assert page.count('<svg class="chart"') == 3  # calls/s, latency, errors per function
    assert "memory_cgroup" in page or "rlimits" in page
    assert s.get(server.url + "/console/metrics?range=2y", timeout=30).status_code == 400


def test_call_detail_shows_the_error_type_message_and_traceback(make_server):
    s = make_server(functions={"failing": FAILING}, env=console_env()).start()
    rid = uuid.uuid4().hex
    assert s.get("/function/failing", headers={"X-Request-Id": rid}).status_code == 500
    sess, _ = sign_in(s)
    page = sess.get(s.url + f"/console/calls/{rid}", timeout=30).text
    assert 'id="call-outcome">function_error<' in page
    details = page.split('id="error-details"', 1)[1].split("</section>", 1)[0]
    assert "ValueError" in details and "nope" in details
    assert "failing.py" in details  # the traceback, the function's own frames

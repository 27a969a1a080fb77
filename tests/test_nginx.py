"""ops/nginx/fnbox.conf in front of a real fnbox server: nginx started as its own process on a free loopback port.

nginx itself is installed by ops/setup-system.sh (`make test` runs it); this module installs nothing. Without
nginx the proxy tests are skipped when not root (setup-system.sh could not install it) and fail as root.
Every process started here is stopped by its pid: nginx's master (SIGQUIT, then SIGKILL) and its workers.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import psutil
import pytest

from ops.render_nginx import TEMPLATE, limits, main, render
from tests.conftest import REPO, Server, free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
ROOT = os.geteuid() == 0
ADMIN_TOKEN = "nginx-test-token-" + os.urandom(8).hex()
OUTSIDE = "127.0.0.2"  # a loopback address that is not 127.0.0.1: "another host" as far as nginx's allow/deny go

FUNCTIONS = {
    "echo": """
        def main(request):
            body = request.get_data()
            return {
                "remote_addr": request.remote_addr,
                "x_real_ip": request.headers.get("X-Real-IP"),
                "x_forwarded_for": request.headers.get("X-Forwarded-For"),
                "x_forwarded_proto": request.headers.get("X-Forwarded-Proto"),
                "host": request.headers.get("Host"),
                "path": request.path,
                "subpath": request.view_args.get("subpath"),
                "args": request.args.to_dict(),
                "method": request.method,
                "length": len(body),
                "tail": body[-8:].decode("latin-1"),
            }
    """,
    "small": """
        def main(request):
            return str(len(request.get_data()))
    """,
    "crash": """
        import os

        def main(request):
            os._exit(3)
    """,
    "bigheader": """
        def main(request):
            return "ok", 200, {"X-Big": "b" * 60000}
    """,
    "accel": """
        def main(request):
            return "not redirected", 200, {"X-Accel-Redirect": "/healthz", "X-Accel-Buffering": "no"}
    """,
}


class Nginx:
    """nginx -p <tmpdir> -c <tmpdir>/nginx.conf -g 'daemon off;' with the rendered fnbox site included."""

    def __init__(self, upstream: str | list[str], profiles_dir: str) -> None:
        """upstream: one address, or several boards' (one `server` line each, with passive health checks)."""
        self.dir = tempfile.mkdtemp(prefix="fnbox-test-nginx-")
        self.port = free_port()
        max_kb, max_timeout = limits(profiles_dir)
        with open(TEMPLATE) as f:
            site = render(f.read(), listen=f"127.0.0.1:{self.port}", upstream=upstream, max_request_kb=max_kb,
                          max_timeout_s=max_timeout)
        with open(os.path.join(self.dir, "fnbox.conf"), "w") as f:
            f.write(site)
        d = self.dir
        main = f"""
            {"user root;" if ROOT else ""}
            worker_processes 1;
            pid {d}/nginx.pid;
            error_log {d}/error.log info;
            events {{ worker_connections 256; }}
            http {{
                access_log {d}/access.log;
                client_body_temp_path {d}/client_body;
                proxy_temp_path {d}/proxy;
                fastcgi_temp_path {d}/fastcgi;
                uwsgi_temp_path {d}/uwsgi;
                scgi_temp_path {d}/scgi;
                include {d}/fnbox.conf;
            }}
        """
        self.conf = os.path.join(d, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(main)
        self.proc: subprocess.Popen | None = None
        self.known: set[int] = set()

    def check(self) -> subprocess.CompletedProcess:
        """nginx -t on this configuration (the rendered site included): parsed and accepted by the real binary."""
        return subprocess.run([NGINX, "-t", "-e", os.path.join(self.dir, "error.log"), "-p", self.dir, "-c", self.conf],
                              capture_output=True, text=True, timeout=30)

    def start(self) -> Nginx:
        self.log = open(os.path.join(self.dir, "stderr.log"), "wb")
        self.proc = subprocess.Popen([NGINX, "-e", os.path.join(self.dir, "error.log"), "-p", self.dir,
                                      "-c", self.conf, "-g", "daemon off;"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx not listening after 10 s:\n{self.read_log()}") from None
                time.sleep(0.05)
        self._remember()
        return self

    def _remember(self) -> None:
        try:
            master = psutil.Process(self.proc.pid)
            self.known |= {master.pid, *(c.pid for c in master.children(recursive=True))}
        except psutil.Error:
            pass

    def read_log(self) -> str:
        out = []
        for name in ("stderr.log", "error.log"):
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    out.append(f.read().decode("utf-8", "replace"))
            except OSError:
                pass
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._remember()
            os.kill(self.proc.pid, signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in self.known:  # workers outliving a killed master
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    os.kill(pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError):
                pass
        if self.proc is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def fetch(self, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
              source: str = "127.0.0.1") -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request from the given loopback source address; raw http.client, so the path goes as written."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=(source, 0))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()


def _need_nginx() -> None:
    if NGINX is None:
        if ROOT:
            pytest.fail("nginx is not installed: run `bash ops/setup-system.sh` (make test does)")
        pytest.skip("nginx is not installed and ops/setup-system.sh cannot install it without root")


@pytest.fixture(scope="module")
def upstream() -> Iterator[Server]:
    _need_nginx()
    s = Server(functions=FUNCTIONS, profiles={"functions.toml": "[small]\nmax_request_kb = 64\n"},
               env={"FNBOX_ADMIN_TOKEN": ADMIN_TOKEN})  # the admin API is on
    with open(os.path.join(REPO, "functions", "hello.py")) as f:
        s.write_function("hello", f.read())
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxy(upstream: Server) -> Iterator[Nginx]:
    n = Nginx(f"127.0.0.1:{upstream.port}", upstream.profiles_dir)
    try:
        n.start()
        yield n
    finally:
        n.stop()


def _json(body: bytes) -> dict:
    return json.loads(body.decode())


# --- rendering (no nginx needed) ------------------------------------------------------------------------------

def test_render_computes_limits_from_profiles(tmp_path):
    for name in os.listdir(os.path.join(REPO, "sandbox_profiles")):
        shutil.copy(os.path.join(REPO, "sandbox_profiles", name), tmp_path)
    assert limits(str(tmp_path)) == (1024, 30)  # default.toml's body, trusted.toml's timeout
    (tmp_path / "functions.toml").write_text("[upload]\nmax_request_kb = 5000\n[slow]\nprofile = \"trusted\"\n"
                                             "timeout_s = 44.5\n")
    max_kb, max_timeout = limits(str(tmp_path))
    assert (max_kb, max_timeout) == (5000, 44.5)
    with open(TEMPLATE) as f:
        text = render(f.read(), "127.0.0.1:8080", "127.0.0.1:8000", "_", max_kb, max_timeout)
    assert "client_max_body_size 5000k;" in text
    assert "proxy_read_timeout 75s;" in text  # above the largest timeout_s
    assert "location /function/ {\n        proxy_pass http://fnbox_gunicorn;\n" in text  # prefix kept
    assert "server 127.0.0.1:8000;" in text and "listen 127.0.0.1:8080;" in text


def test_render_refuses_unsafe_values_and_zero_body():
    with open(TEMPLATE) as f:
        template = f.read()
    with pytest.raises(ValueError):
        render(template, "80; include /etc/passwd", "127.0.0.1:8000")
    with pytest.raises(ValueError, match="unfilled"):
        render(template + "\nfoo @NOPE@;\n", "80", "127.0.0.1:8000")
    # 0 means "unlimited" to nginx: never render it.
    assert "client_max_body_size 1k;" in render(template, "80", "127.0.0.1:8000", max_request_kb=0)


def test_render_several_boards_one_server_line_each_and_one_board_as_before(tmp_path):
    with open(TEMPLATE) as f:
        template = f.read()
    boards = ["10.0.0.11:8000", "10.0.0.12:8000", "unix:/run/fnbox.sock"]
    text = render(template, "80", boards, fail_timeout_s=7)
    block = text[text.index("upstream fnbox_gunicorn {"):]
    block = block[:block.index("}")]
    assert [line.strip() for line in block.splitlines() if line.strip().startswith("server ")] == [
        f"server {b} max_fails=1 fail_timeout=7s;" for b in boards]
    assert "upstream=10.0.0.11:8000,10.0.0.12:8000,unix:/run/fnbox.sock," in text.splitlines()[0]
    # One board: the same file as a plain address renders, `server ADDR;` (what ops/install writes).
    one = render(template, "80", "127.0.0.1:8000")
    assert render(template, "80", ["127.0.0.1:8000"]) == one
    assert "\n    server 127.0.0.1:8000;\n" in one and "max_fails=" not in one
    for bad in (["127.0.0.1:8000 backup"], ["a:1", "a:1"], [], ["a:1;include /etc/passwd"], ["a:1,"]):
        with pytest.raises(ValueError):
            render(template, "80", bad)
    # The command line: --upstream repeated and comma lists, in order.
    out = tmp_path / "site.conf"
    assert main(["--upstream", "10.0.0.11:8000,10.0.0.12:8000", "--upstream", "10.0.0.13:8000", "--max-fails", "2",
                 "--profiles", os.path.join(REPO, "sandbox_profiles"), "-o", str(out)]) == 0
    assert [line.strip() for line in out.read_text().splitlines() if line.strip().startswith("server 10.")] == [
        f"server 10.0.0.1{i}:8000 max_fails=2 fail_timeout=10s;" for i in (1, 2, 3)]
    assert main(["--upstream", "10.0.0.11:8000 down", "-o", str(tmp_path / "no.conf")]) == 2
    assert not (tmp_path / "no.conf").exists()


def test_several_boards_rendered_pass_nginx_t():
    """The real nginx parses and accepts the rendered site with three boards (and, as a control, refuses a file
    whose upstream line is broken)."""
    _need_nginx()
    ports = [free_port() for _ in range(3)]
    n = Nginx([f"127.0.0.1:{p}" for p in ports], os.path.join(REPO, "sandbox_profiles"))
    try:
        ok = n.check()
        assert ok.returncode == 0, ok.stderr
        site = os.path.join(n.dir, "fnbox.conf")
        with open(site) as f:
            text = f.read()
        assert text.count(" max_fails=1 fail_timeout=10s;") == 3
        with open(site, "w") as f:
            f.write(text.replace(" max_fails=1 fail_timeout=10s;", " max_fails=1 fail_timeout=10s", 1))
        bad = n.check()
        assert bad.returncode != 0 and "fnbox.conf" in bad.stderr, bad.stderr
    finally:
        n.stop()


# --- through nginx --------------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_function_call_and_seed_urls(proxy):
    status, headers, body = proxy.fetch("/function/echo?x=1")
    assert status == 200, body
    data = _json(body)
    assert data["path"] == "/function/echo" and data["args"] == {"x": "1"} and data["subpath"] == ""
    assert headers["X-Request-Id"]
    for path, expected in [("/function/hello?name=Tony", "Hello Tony!"), ("/function/hello/Ann", "Hello Ann!"),
                           ("/function/hello", "Hello World!")]:
        status, _, body = proxy.fetch(path)
        assert (status, body.decode()) == (200, expected), path


@pytest.mark.timeout(60)
def test_subpath_reaches_the_function_unchanged(proxy):
    status, _, body = proxy.fetch("/function/echo/a/b%20c/d?k=v")
    assert status == 200, body
    data = _json(body)
    assert data["path"] == "/function/echo/a/b c/d" and data["subpath"] == "a/b c/d" and data["args"] == {"k": "v"}


@pytest.mark.timeout(60)
def test_large_bodies(proxy):
    payload = os.urandom(450 * 1024).hex().encode()  # 900 KiB
    status, _, body = proxy.fetch("/function/echo", "POST", payload, {"Content-Type": "application/octet-stream"})
    assert status == 200, body[:300]
    data = _json(body)
    assert data["length"] == len(payload) == 900 * 1024 and data["tail"] == payload[-8:].decode()
    # Exactly the largest max_request_kb passes nginx; one byte more is refused by nginx, in fnbox's JSON.
    status, _, body = proxy.fetch("/function/echo", "POST", b"x" * (1024 * 1024))
    assert status == 200 and _json(body)["length"] == 1024 * 1024
    status, headers, body = proxy.fetch("/function/echo", "POST", b"x" * (1024 * 1024 + 1))
    assert status == 413 and _json(body)["error"] == "request_too_large"
    assert "X-Request-Id" not in headers  # nginx answered: fnbox never saw it
    # A function with a smaller max_request_kb: nginx lets the body through, fnbox refuses it itself.
    status, headers, body = proxy.fetch("/function/small", "POST", b"x" * (100 * 1024))
    assert status == 413 and _json(body)["error"] == "request_too_large" and headers["X-Request-Id"]


@pytest.mark.timeout(60)
def test_client_address_headers(proxy):
    status, _, body = proxy.fetch("/function/echo", headers={"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6",
                                                             "Host": "fnbox.example"}, source=OUTSIDE)
    assert status == 200, body
    data = _json(body)
    assert data["x_real_ip"] == OUTSIDE  # set by nginx, whatever the client sent
    # Appended by nginx: the client's claim stays first, the real peer is the LAST element.
    assert data["x_forwarded_for"] == f"6.6.6.6, {OUTSIDE}"
    assert data["x_forwarded_proto"] == "http"
    assert data["host"] == "fnbox.example"


@pytest.mark.timeout(60)
def test_remote_addr_is_the_real_client(proxy):
    status, _, body = proxy.fetch("/function/echo", headers={"X-Forwarded-For": "6.6.6.6"}, source=OUTSIDE)
    assert status == 200
    assert _json(body)["remote_addr"] == OUTSIDE


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["/admin/", "/admin/functions/echo", "/metrics"])
def test_operator_endpoints_are_local_only(proxy, path):
    status, headers, body = proxy.fetch(path, source=OUTSIDE)
    assert status == 403, body
    assert "X-Request-Id" not in headers and _json(body)["error"] == "forbidden"  # nginx refused, not fnbox
    status, headers, body = proxy.fetch(path, source="127.0.0.1")
    # Passed through: whatever fnbox answers (404 until the endpoint exists, 401/403 without a token), it was
    # fnbox that answered, which every fnbox response says with X-Request-Id.
    assert headers["X-Request-Id"], (status, body)


@pytest.mark.timeout(60)
def test_deploys_larger_than_function_bodies_pass_from_localhost(proxy):
    # /admin/ has its own client_max_body_size (deploy archives, 20 MiB), above the functions' 1024k. The
    # module is a syntax error: the deploy API reads it all and refuses it, nothing is deployed.
    body = b"def (:\n" + b"#" * (3 * 1024 * 1024)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "text/x-python"}
    status, headers, resp = proxy.fetch("/admin/functions/bigdeploy", "PUT", body, auth)
    assert headers["X-Request-Id"] and status not in (403, 413, 502), (status, resp[:300])  # fnbox answered
    status, headers, resp = proxy.fetch("/admin/functions/bigdeploy", "PUT", body, auth, source=OUTSIDE)
    assert status == 403 and "X-Request-Id" not in headers


@pytest.mark.timeout(60)
def test_a_refused_body_never_breaks_the_next_call(proxy):
    # fnbox answers 413 without reading a body over the function's own limit; Gunicorn then drains at most
    # 64 KiB of it and closes the connection. Reusing upstream connections (nginx `keepalive`) would send the
    # next call, of anyone, on that dead connection: a 502. The refused request itself may also end as nginx's
    # 502 rather than fnbox's 413 (nginx was still writing the body when Gunicorn closed): that is the
    # gateway's to fix (drain the body before refusing), and it stays confined to the refused request.
    for i in range(20):
        status, headers, body = proxy.fetch("/function/small", "POST", b"x" * (200 * 1024))
        assert (status == 413 and headers["X-Request-Id"]) or (status == 502 and "X-Request-Id" not in headers)
        status, _, body = proxy.fetch(f"/function/echo?i={i}", "POST", b"ok")
        assert status == 200, (i, body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["/function/../admin/x", "/function/%2e%2e/admin/x", "/function/..%2fadmin/x",
                                  "//admin/x", "/metrics?x=1"])
def test_operator_endpoints_not_reachable_by_path_tricks(proxy, path):
    # nginx matches locations on the normalized path (dot segments resolved, %2e/%2f decoded, slashes merged).
    status, headers, body = proxy.fetch(path, source=OUTSIDE)
    assert status == 403 and "X-Request-Id" not in headers, (path, status, body)


@pytest.mark.timeout(60)
def test_healthz_public_and_other_paths_404(proxy):
    status, headers, body = proxy.fetch("/healthz", source=OUTSIDE)
    assert status == 200 and _json(body)["status"] == "ok" and headers["X-Request-Id"]
    status, headers, body = proxy.fetch("/etc/passwd", source=OUTSIDE)
    assert status == 404 and _json(body)["error"] == "not_found" and "X-Request-Id" not in headers


@pytest.mark.timeout(60)
def test_fnbox_errors_pass_through_unchanged(proxy):
    status, headers, body = proxy.fetch("/function/crash")
    assert status == 502 and headers["X-Request-Id"]
    assert _json(body)["error"] == "crashed"  # fnbox's answer, not nginx's bad-gateway page
    status, headers, body = proxy.fetch("/function/nope")
    assert status == 404 and headers["X-Request-Id"] and _json(body)["function"] == "nope"


@pytest.mark.timeout(60)
def test_large_response_headers_fit(proxy):
    status, headers, body = proxy.fetch("/function/bigheader")
    assert status == 200, body[:300]
    assert headers["X-Big"] == "b" * 60000


@pytest.mark.timeout(60)
def test_functions_cannot_steer_nginx(proxy):
    status, _, body = proxy.fetch("/function/accel")
    assert (status, body) == (200, b"not redirected")


@pytest.mark.timeout(60)
def test_many_calls_in_a_row(proxy):
    for i in range(30):
        status, _, body = proxy.fetch(f"/function/echo?i={i}", "POST" if i % 2 else "GET", b"z" * i)
        assert status == 200 and _json(body)["args"] == {"i": str(i)} and _json(body)["length"] == i


@pytest.mark.timeout(60)
def test_upstream_down_is_json_502():
    _need_nginx()
    profiles = os.path.join(REPO, "sandbox_profiles")
    n = Nginx(f"127.0.0.1:{free_port()}", profiles)  # nobody listens there
    try:
        n.start()
        status, headers, body = n.fetch("/function/hello")
        assert status == 502 and _json(body)["error"] == "unavailable" and "X-Request-Id" not in headers
    finally:
        n.stop()

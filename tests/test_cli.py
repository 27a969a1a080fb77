"""The `fnbox` command line, run as a user runs it (.venv/bin/fnbox in a subprocess) against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from tests.conftest import REPO, dedent, free_port, server_fixture

FNBOX = os.path.join(REPO, ".venv", "bin", "fnbox")
TOKEN = "cli-test-token-5e07"

FUNCTIONS = {
    "hello": """
        def main(request):
            return 'hello'
    """,
    "echo": """
        def main(request):
            return {'method': request.method, 'path': request.path,
                    'subpath': request.view_args.get('subpath'), 'args': request.args.to_dict(flat=False),
                    'body': request.get_data(as_text=True), 'thing': request.headers.get('X-Thing'),
                    'content_type': request.headers.get('Content-Type')}
    """,
    "boom": """
        def main(request):
            raise ValueError('it went boom')
    """,
    "chatty": """
        def main(request):
            print('line', request.args.get('n'))
            print('second')
            return 'chatted'
    """,
}
PROFILES = {
    "functions.toml": """
        [counted]
        profile = "strict"
        timeout_s = 1.5
    """,
}


server = server_fixture(functions=FUNCTIONS, profiles=PROFILES, env={"FNBOX_ADMIN_TOKEN": TOKEN})


def fnbox(*args: str, url: str | None = None, token: str | None = TOKEN, extra_env: dict[str, str] | None = None,
          timeout: float = 60, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FNBOX_")}
    if url:
        env["FNBOX_URL"] = url
    if token is not None:
        env["FNBOX_ADMIN_TOKEN"] = token
    env.update(extra_env or {})
    return subprocess.run([FNBOX, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p.stdout


def one_line_error(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """A failed command: non-zero exit, exactly one line on stderr (no traceback) naming the problem."""
    assert p.returncode != 0, (p.stdout, p.stderr)
    lines = p.stderr.strip("\n").splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def write(path: str, src: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(dedent(src))
    return path


# -- deploy, invoke ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_deploy_a_file_and_invoke_it(server, tmp_path):
    src = "def main(request):\n    return 'greetings from ' + request.args.get('who', 'nobody')\n"
    path = write(str(tmp_path / "greet.py"), src)
    out = ok(fnbox("deploy", path, url=server.url))
    assert out == f"deployed greet version 1 (module, {len(src)} bytes)\n"
    assert ok(fnbox("invoke", "greet", "-q", "who=cli", url=server.url)) == "greetings from cli\n"
    out = ok(fnbox("deploy", path, "--name", "greet2", url=server.url))
    assert out.startswith("deployed greet2 version 1 (module, ")
    assert server.get("/function/greet2?who=http").text == "greetings from http"
    assert ok(fnbox("deploy", path, url=server.url)).startswith("deployed greet version 2 ")


@pytest.mark.timeout(60)
def test_deploy_a_package_folder(server, tmp_path):
    pkg = tmp_path / "mypkg"
    write(str(pkg / "__init__.py"), """
        from .helper import shout

        def main(request):
            return shout(request.view_args.get('subpath') or 'quiet')
    """)
    write(str(pkg / "helper.py"), "def shout(s):\n    return s.upper() + '!'\n")
    write(str(pkg / "__pycache__" / "junk.pyc"), "not python")
    out = ok(fnbox("deploy", str(pkg), url=server.url))
    assert re.fullmatch(r"deployed mypkg version 1 \(package, \d+ bytes\)\n", out), out
    assert ok(fnbox("invoke", "mypkg", "some/words", url=server.url)) == "SOME/WORDS!\n"
    assert server.get("/function/mypkg").text == "QUIET!"


@pytest.mark.timeout(60)
def test_invoke_sends_path_method_query_body_and_headers(server, tmp_path):
    out = ok(fnbox("invoke", "echo", "sub/path", "-X", "PUT", "-q", "a=1", "-q", "a=2", "-q", "b=two words",
                   "-d", "the body", "-H", "X-Thing: yes", "-H", "Content-Type: text/plain", url=server.url))
    doc = json.loads(out)
    assert doc == {"method": "PUT", "path": "/function/echo/sub/path", "subpath": "sub/path",
                   "args": {"a": ["1", "2"], "b": ["two words"]}, "body": "the body", "thing": "yes",
                   "content_type": "text/plain"}
    body_file = write(str(tmp_path / "body.json"), '{"from": "file"}')
    doc = json.loads(ok(fnbox("invoke", "echo", "-d", f"@{body_file}", url=server.url)))
    assert doc["method"] == "POST" and doc["body"] == '{"from": "file"}'  # -d without -X: POST
    doc = json.loads(ok(fnbox("invoke", "echo", url=server.url)))
    assert doc["method"] == "GET" and doc["body"] == "" and doc["args"] == {}
    out = ok(fnbox("invoke", "hello", "-i", url=server.url))
    head, _, body = out.partition("\n\n")
    assert head.splitlines()[0] == "HTTP 200" and body == "hello\n"
    assert re.search(r"^X-Request-Id: \S+$", head, re.M | re.I), head
    assert re.search(r"^Server-Timing: total;dur=", head, re.M | re.I), head


@pytest.mark.timeout(60)
def test_invoke_of_a_failing_or_missing_function_exits_non_zero(server):
    p = fnbox("invoke", "boom", url=server.url)
    assert p.returncode == 1
    assert json.loads(p.stdout)["error"] == "function_error"
    one_line_error(p, "function_error", "it went boom")
    p = fnbox("invoke", "nosuchfunction", url=server.url)
    assert p.returncode == 1
    one_line_error(p, "not_found")


# -- rollback, rm --------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_rollback_and_rm(server, tmp_path):
    for n in (1, 2, 3):
        path = write(str(tmp_path / "cycle.py"), f"def main(request):\n    return 'v{n}'\n")
        assert ok(fnbox("deploy", path, url=server.url)).startswith(f"deployed cycle version {n} ")
    assert ok(fnbox("rollback", "cycle", url=server.url)) == "cycle now runs version 2\n"
    assert server.get("/function/cycle").text == "v2"
    assert ok(fnbox("rollback", "cycle", "--version", "3", url=server.url)) == "cycle now runs version 3\n"
    assert server.get("/function/cycle").text == "v3"
    one_line_error(fnbox("rollback", "cycle", "--version", "9", url=server.url), "no_version")
    assert ok(fnbox("rm", "cycle", url=server.url)).startswith("removed cycle (its versions are kept")
    assert server.get("/function/cycle").status_code == 404
    one_line_error(fnbox("invoke", "cycle", url=server.url), "not_found")
    one_line_error(fnbox("rm", "cycle", url=server.url), "fnbox: not_found")


# -- ls, limits, logs ----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_ls_table_and_json(server, tmp_path):
    path = write(str(tmp_path / "counted.py"), """
        def main(request):
            if request.args.get('fail'):
                raise RuntimeError('no')
            return 'counted'
    """)
    ok(fnbox("deploy", path, url=server.url))
    for q in ("", "", "?fail=1"):
        server.get("/function/counted" + q)
    lines = ok(fnbox("ls", url=server.url)).splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "PROFILE", "TIMEOUT_S", "MEMORY_MB", "CALLS", "ERRORS"]
    rows = {r.split()[0]: r.split() for r in lines[1:]}
    assert rows["counted"] == ["counted", "1", "strict", "1.5", "64", "3", "1"]
    assert rows["hello"][:5] == ["hello", "-", "default", "10", "128"]
    # Columns line up under their headers.
    starts = [lines[0].index(h) for h in ("VERSION", "PROFILE", "TIMEOUT_S")]
    row = next(line for line in lines if line.startswith("counted "))
    assert [row[s] != " " for s in starts] == [True, True, True], (lines[0], row)

    doc = json.loads(ok(fnbox("ls", "--json", url=server.url)))
    by_name = {f["name"]: f for f in doc}
    c = by_name["counted"]
    assert c["version"] == 1 and c["calls"] == 3 and c["errors"] == 1
    assert c["calls_by_outcome"] == {"ok": 2, "function_error": 1}
    assert c["limits"]["profile"] == "strict" and c["limits"]["timeout_s"] == 1.5 and c["deployed_at"]
    assert by_name["hello"]["version"] is None


@pytest.mark.timeout(60)
def test_limits(server, tmp_path):
    ok(fnbox("deploy", write(str(tmp_path / "counted.py"), "def main(request):\n    return 1\n"), url=server.url))
    lines = ok(fnbox("limits", "counted", url=server.url)).splitlines()
    assert lines[0].split() == ["KEY", "VALUE"]
    table = dict(line.split(None, 1) for line in lines[1:])
    assert table["profile"] == "strict" and table["timeout_s"] == "1.5" and table["memory_mb"] == "64"
    assert table["network"] == "false" and table["max_concurrency"] == "2" and table["env"] == "{}"
    doc = json.loads(ok(fnbox("limits", "counted", "--json", url=server.url)))
    assert doc["timeout_s"] == 1.5 and doc["cpu_s"] == 1 and doc["profile"] == "strict"
    one_line_error(fnbox("limits", "nosuchfunction", url=server.url), "not_found", "nosuchfunction")


@pytest.mark.timeout(60)
def test_logs(server):
    rids = [server.get(f"/function/chatty?n={n}").headers["X-Request-Id"] for n in range(4)]
    out = ok(fnbox("logs", "chatty", "-n", "3", url=server.url))
    lines = out.splitlines()
    calls = [line for line in lines if not line.startswith("    |")]
    assert len(calls) == 3, out
    # Oldest first, the last three calls, each with its captured output beneath it.
    for line, rid in zip(calls, rids[1:], strict=True):
        assert rid in line and "GET /function/chatty" in line and " 200 ok " in line
        assert re.search(r"\d+(\.\d+)? ms", line)
    assert [line for line in lines if line.startswith("    |")] == [
        "    | line 1", "    | second", "    | line 2", "    | second", "    | line 3", "    | second"]
    assert lines[1] == "    | line 1"


# -- check, doctor -------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_check(server, tmp_path):
    env = {"FNBOX_PROFILES_DIR": server.profiles_dir, "FNBOX_FUNCTIONS_DIR": server.functions_dir}
    out = ok(fnbox("check", extra_env=env))
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["function", "profile", "timeout_s"]
    rows = {r.split()[0]: r.split() for r in lines[1:-1]}
    assert rows["counted"][1:3] == ["strict", "1.5"]
    assert rows["hello"][1:3] == ["default", "10"]
    assert re.fullmatch(r"ok: \d+ profiles, 1 function overrides, \d+ functions checked", lines[-1]), lines[-1]

    bad = tmp_path / "badprofiles"
    write(str(bad / "default.toml"), 'timeout_s = "soon"\n')
    p = fnbox("check", "--profiles", str(bad), "--functions", server.functions_dir)
    line = one_line_error(p, "default.toml", "timeout_s")
    assert p.returncode == 1, line


@pytest.mark.timeout(60)
def test_doctor(server):
    assert os.path.isfile(os.path.join(REPO, "runner", "doctor.py")), "runner/doctor.py is missing"
    env = {"FNBOX_PROFILES_DIR": server.profiles_dir, "FNBOX_FUNCTIONS_DIR": server.functions_dir}
    lines = ok(fnbox("doctor", extra_env=env)).splitlines()
    assert lines[0].startswith("fnbox sandbox layers")
    assert lines[1].split()[:2] == ["layer", "status"]
    table = {line.split()[0]: line.split()[1] for line in lines[2:-1]}
    expected = {"uid_pool", "memory_cgroup", "network_namespace", "rlimits", "psutil_watchdog", "runtime_readable",
                "venv_readable", "functions_readable", "profiles_private"}
    assert expected <= set(table), table
    assert set(table.values()) <= {"active", "DEGRADED"}
    degraded = sum(v == "DEGRADED" for v in table.values())
    assert lines[-1] == (f"{degraded} degraded" if degraded else "every layer is active")
    # The test server's folders: the functions readable by a sandbox uid, the profiles not.
    assert table["functions_readable"] == "active" and table["profiles_private"] == "active"

    doc = json.loads(ok(fnbox("doctor", "--json", extra_env=env)))
    assert {k: v["status"] for k, v in doc.items()} == table
    assert all(v["detail"] for v in doc.values())
    p = fnbox("doctor", "--strict", extra_env=env)
    assert p.returncode == (1 if degraded else 0)


# -- run -----------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_run_a_file_without_a_server(tmp_path):
    path = write(str(tmp_path / "snippet.py"), """
        def main(request):
            print('captured line')
            return {'ok': True, 'q': request.args.get('q'), 'body': request.get_data(as_text=True)}, 201, \\
                {'X-Snip': 'yes'}
    """)
    p = fnbox("run", path, "--profile", "strict", "-q", "q=1", "-d", "payload", url="http://127.0.0.1:9",
              token=None)
    out = ok(p)
    assert "outcome:  ok" in out
    assert re.search(r"^status:   201\b", out, re.M), out
    assert re.search(r"^header:   X-Snip: yes$", out, re.M), out
    assert re.search(r"^duration: \d+(\.\d+)? ms", out, re.M), out
    assert re.search(r"^memory:   peak \d+ KiB \(limit 64 MiB\)$", out, re.M), out
    assert re.search(r"^profile:  strict$", out, re.M), out
    assert re.search(r"^output:\ncaptured line$", out, re.M), out
    body = out.split("body:\n", 1)[1]
    assert json.loads(body) == {"ok": True, "q": "1", "body": "payload"}


@pytest.mark.timeout(60)
def test_run_an_endless_loop_ends_with_timeout(tmp_path):
    path = write(str(tmp_path / "forever.py"), """
        def main(request):
            while True:
                pass
    """)
    t0 = time.monotonic()
    p = fnbox("run", path, "--profile", "strict", token=None, timeout=30)
    assert time.monotonic() - t0 < 15
    assert p.returncode != 0
    assert re.search(r"^outcome:  timeout\b", p.stdout, re.M), (p.stdout, p.stderr)


# -- errors: one line, non-zero exit -------------------------------------------------------------------------
REMOTE = [["ls"], ["ls", "--json"], ["limits", "hello"], ["rollback", "hello"], ["rm", "hello"],
          ["logs", "hello", "-n", "1"], ["deploy", "__FILE__"]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", REMOTE, ids=lambda a: " ".join(a))
def test_wrong_token_is_one_line(server, tmp_path, args):
    path = write(str(tmp_path / "hello.py"), "def main(request):\n    return 'pwned'\n")
    args = [path if a == "__FILE__" else a for a in args]
    p = fnbox(*args, url=server.url, token="not-the-token")
    one_line_error(p, "unauthorized")
    assert p.stdout == ""
    assert server.get("/function/hello").text == "hello"
    one_line_error(fnbox(*args, url=server.url, token=None), "FNBOX_ADMIN_TOKEN")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [*REMOTE, ["invoke", "hello"]], ids=lambda a: " ".join(a))
def test_unreachable_url_is_one_line(tmp_path, args):
    path = write(str(tmp_path / "hello.py"), "def main(request):\n    return 'x'\n")
    args = [path if a == "__FILE__" else a for a in args]
    url = f"http://127.0.0.1:{free_port()}"
    p = fnbox(*args, url=url)
    one_line_error(p, "cannot reach", url)


@pytest.mark.timeout(60)
def test_syntax_error_deploy_is_one_line_with_the_line_number(server, tmp_path):
    path = write(str(tmp_path / "broken.py"), "x = 1\ndef main(request)\n    return x\n")
    line = one_line_error(fnbox("deploy", path, url=server.url), "syntax_error", "(line 2)")
    assert line.startswith("fnbox: ")
    assert server.get("/function/broken").status_code == 404


@pytest.mark.timeout(60)
def test_local_mistakes_are_one_line(server, tmp_path):
    one_line_error(fnbox("deploy", str(tmp_path / "missing.py"), url=server.url), "missing.py")
    one_line_error(fnbox("invoke", "echo", "-d", f"@{tmp_path / 'nobody.json'}", url=server.url), "nobody.json")
    one_line_error(fnbox("invoke", "echo", "-q", "novalue", url=server.url), "novalue")
    one_line_error(fnbox("run", str(tmp_path / "missing.py"), token=None), "missing.py")
    snippet = write(str(tmp_path / "s.py"), "def main(request):\n    return 1\n")
    one_line_error(fnbox("run", snippet, "--profile", "nosuchprofile", token=None), "nosuchprofile")

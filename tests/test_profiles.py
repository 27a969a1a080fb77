"""Sandbox profiles: validation with file/key/reason, inheritance, overrides, the `check` command, and the limits
as a real server applies them (reload on edit, last good configuration, refusing to start, request size,
concurrency, environment)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from runner.profiles import Profile, ProfileError, ProfileStore, load_profiles
from tests.conftest import PYTHON, REPO, Server, assert_nothing_left, dedent

MiB = 1024 * 1024


@pytest.fixture
def pdir(tmp_path) -> str:
    """A copy of the repo's profiles folder."""
    d = tmp_path / "profiles"
    shutil.copytree(os.path.join(REPO, "sandbox_profiles"), d)
    return str(d)


def write(pdir: str, name: str, text: str) -> str:
    path = os.path.join(pdir, name)
    with open(path, "w") as f:
        f.write(dedent(text))
    return path


def error_of(pdir: str) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        load_profiles(pdir)
    return info.value


# -- validation: every error names the file, the key and the reason ----------------------------------------------
@pytest.mark.timeout(10)
@pytest.mark.parametrize("fname", ["default.toml", "strict.toml", "functions.toml"])
def test_unknown_key(pdir, fname):
    text = "[hello]\ntimeout = 5\n" if fname == "functions.toml" else "timeout = 5\n"
    path = write(pdir, fname, text)
    e = error_of(pdir)
    assert (e.path, e.key) == (path, "timeout")
    assert "unknown key" in e.reason and "timeout_s" in e.reason  # says what the known keys are
    assert str(e).startswith(f"{path}: timeout: unknown key")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("key, value, reason", [
    ("memory_mb", "true", "must be an integer, not True"),  # a bool is an int in Python: still refused
    ("max_processes", "false", "must be an integer, not False"),
    ("memory_mb", '"128"', "must be an integer, not '128'"),
    ("memory_mb", "128.5", "must be an integer, not 128.5"),
    ("timeout_s", "true", "must be a number, not True"),
    ("timeout_s", '"10"', "must be a number, not '10'"),
    ("timeout_s", "inf", "must be finite"),
    ("timeout_s", "nan", "must be finite"),
    ("network", "1", "must be true or false, not 1"),
    ("traceback", '"yes"', "must be true or false, not 'yes'"),
    ("env", '"A=1"', "must be a table of strings"),
])
def test_wrong_type(pdir, key, value, reason):
    path = write(pdir, "strict.toml", f"{key} = {value}\n")
    e = error_of(pdir)
    assert (e.path, e.key, e.reason) == (path, key, reason)
    assert str(e) == f"{path}: {key}: {reason}"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("key, value, reason", [
    ("timeout_s", "-1", "must be at least 0.001, not -1"),
    ("cpu_s", "0", "must be at least 0.001, not 0"),
    ("memory_mb", "-128", "must be at least 16, not -128"),
    ("memory_mb", "8", "must be at least 16, not 8"),
    ("max_processes", "0", "must be at least 1, not 0"),
    ("max_file_mb", "-1", "must be at least 0, not -1"),
    ("max_request_kb", "-1", "must be at least 0, not -1"),
    ("max_response_kb", "-5", "must be at least 0, not -5"),
    ("max_log_kb", "-1", "must be at least 0, not -1"),
    ("max_concurrency", "0", "must be at least 1, not 0"),
])
def test_negative_or_too_small_limit(pdir, key, value, reason):
    path = write(pdir, "functions.toml", f"[hello]\n{key} = {value}\n")
    e = error_of(pdir)
    assert (e.path, e.key, e.reason) == (path, key, reason)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("env, key, reason", [
    ('{ PATH = "/evil" }', "env.PATH", "is reserved or not a valid variable name"),
    ('{ HOME = "/root" }', "env.HOME", "is reserved or not a valid variable name"),
    ('{ TOKEN = 3 }', "env.TOKEN", "must be a string, not int"),
])
def test_bad_env(pdir, env, key, reason):
    path = write(pdir, "functions.toml", f"[hello]\nenv = {env}\n")
    e = error_of(pdir)
    assert (e.path, e.key, e.reason) == (path, key, reason)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", ['"nope"', "3"])
def test_unknown_profile(pdir, value):
    path = write(pdir, "functions.toml", f"[hello]\nprofile = {value}\n")
    e = error_of(pdir)
    assert (e.path, e.key) == (path, "hello.profile")
    assert e.reason.startswith("unknown profile") and value.strip('"') in e.reason


@pytest.mark.timeout(10)
def test_function_entry_must_be_a_table(pdir):
    path = write(pdir, "functions.toml", "hello = 3\n")
    e = error_of(pdir)
    assert (e.path, e.key) == (path, "hello") and "must be a table" in e.reason


@pytest.mark.timeout(10)
@pytest.mark.parametrize("fname", ["default.toml", "trusted.toml", "functions.toml"])
def test_toml_syntax_error(pdir, fname):
    path = write(pdir, fname, "timeout_s = 5\nmemory_mb = = 3\n")
    e = error_of(pdir)
    assert e.path == path and e.key is None
    assert "TOML syntax error" in e.reason and "line 2" in e.reason, e.reason
    assert str(e).startswith(f"{path}: TOML syntax error")


@pytest.mark.timeout(10)
def test_missing_default_is_an_error(pdir):
    os.unlink(os.path.join(pdir, "default.toml"))
    e = error_of(pdir)
    assert e.path == os.path.join(pdir, "default.toml") and "cannot read" in e.reason


# -- inheritance and overrides ------------------------------------------------------------------------------------
@pytest.mark.timeout(10)
def test_named_profiles_inherit_from_default(pdir):
    write(pdir, "default.toml", """
        timeout_s = 7
        memory_mb = 100
        max_log_kb = 33
        traceback = true
        [env]
        REGION = "eu"
    """)
    write(pdir, "functions.toml", "")
    write(pdir, "tiny.toml", "memory_mb = 32\n")
    pset = load_profiles(pdir)
    default, tiny, strict = pset.profiles["default"], pset.profiles["tiny"], pset.profiles["strict"]
    assert (default.timeout_s, default.memory_mb, default.max_log_kb, default.traceback) == (7, 100, 33, True)
    assert default.max_processes == Profile().max_processes  # left out of default.toml: the built-in default
    # tiny names memory_mb only: everything else comes from default.toml
    assert tiny.memory_mb == 32 and tiny.profile == "tiny"
    assert (tiny.timeout_s, tiny.max_log_kb, tiny.traceback, dict(tiny.env)) == (7, 33, True, {"REGION": "eu"})
    # strict.toml (shipped) sets max_log_kb = 16 but not traceback
    assert strict.max_log_kb == 16 and strict.traceback is True and strict.timeout_s == 2
    # a function without an entry gets default
    assert pset.for_function("unlisted") == default


@pytest.mark.timeout(10)
def test_functions_toml_overrides(pdir):
    write(pdir, "functions.toml", """
        [hello]
        profile = "strict"
        timeout_s = 3
        [hello.env]
        GREETING = "hi"

        [worker]
        memory_mb = 256
    """)
    pset = load_profiles(pdir)
    hello, worker = pset.for_function("hello"), pset.for_function("worker")
    strict = pset.profiles["strict"]
    assert hello.profile == "strict" and hello.timeout_s == 3 and dict(hello.env) == {"GREETING": "hi"}
    assert (hello.memory_mb, hello.max_processes, hello.cpu_s) == (strict.memory_mb, strict.max_processes,
                                                                   strict.cpu_s)
    assert worker.profile == "default" and worker.memory_mb == 256
    assert worker.timeout_s == pset.profiles["default"].timeout_s
    # the override is per function: the named profile itself is unchanged
    assert pset.profiles["strict"].timeout_s == 2


@pytest.mark.timeout(10)
def test_profile_round_trips_through_the_spawn_message(pdir):
    write(pdir, "functions.toml", '[hello]\nprofile = "trusted"\n[hello.env]\nA = "1"\n')
    p = load_profiles(pdir).for_function("hello")
    assert Profile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


@pytest.mark.timeout(10)
def test_store_keeps_last_good_and_reports(pdir):
    store = ProfileStore(pdir)
    assert store.for_function("hello").timeout_s == 10 and store.error is None
    path = write(pdir, "functions.toml", "[hello]\ntimeout_s = 4\n")
    assert store.for_function("hello").timeout_s == 4
    write(pdir, "functions.toml", "[hello]\ntimeout_s = -4\n")
    assert store.for_function("hello").timeout_s == 4  # the last good configuration
    assert store.error == f"{path}: timeout_s: must be at least 0.001, not -4"
    write(pdir, "functions.toml", "[hello]\ntimeout_s = 5\n")
    assert store.for_function("hello").timeout_s == 5 and store.error is None


# -- python -m runner.profiles check ------------------------------------------------------------------------------
def run_check(pdir: str, fdir: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "runner.profiles", "check", "--profiles", pdir, "--functions", fdir],
                          cwd=REPO, capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(30)
def test_check_prints_the_effective_table(pdir, tmp_path):
    fdir = tmp_path / "functions"
    fdir.mkdir()
    (fdir / "hello.py").write_text("def main(r):\n    return 'hi'\n")
    (fdir / "_private.py").write_text("")
    write(pdir, "functions.toml", '[hello]\nprofile = "strict"\ntimeout_s = 3\n[hello.env]\nB = "2"\n'
                                  '[ghost]\nmemory_mb = 64\n')
    out = run_check(pdir, str(fdir))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["function", "profile", "timeout_s"] and header[-1] == "env"
    rows = {line.split()[0]: dict(zip(header, line.split(), strict=True)) for line in lines[1:-1]}
    assert set(rows) == {"hello", "ghost"}  # functions on disk and functions with an entry; never _private
    assert rows["hello"]["profile"] == "strict" and rows["hello"]["timeout_s"] == "3"
    assert rows["hello"]["max_processes"] == "1" and rows["hello"]["network"] == "false"
    assert rows["hello"]["env"] == "B"  # names only: values may be secrets
    assert rows["ghost"]["profile"] == "default" and rows["ghost"]["memory_mb"] == "64"
    assert lines[-1].startswith("ok: 3 profiles, 2 function overrides")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fname, text, key", [
    ("functions.toml", "[hello]\nmemory_mb = true\n", "memory_mb"),
    ("strict.toml", "max_processes = -1\n", "max_processes"),
    ("functions.toml", "[hello]\nprofile = \"nope\"\n", "hello.profile"),
    ("default.toml", "[[[\n", None),
])
def test_check_fails_on_invalid(pdir, tmp_path, fname, text, key):
    path = write(pdir, fname, text)
    out = run_check(pdir, str(tmp_path))
    assert out.returncode != 0
    assert out.stdout == ""
    assert out.stderr.startswith(f"invalid: {path}: " + (f"{key}: " if key else "")), out.stderr


@pytest.mark.timeout(30)
def test_repo_profiles_are_valid(tmp_path):
    out = run_check(os.path.join(REPO, "sandbox_profiles"), os.path.join(REPO, "functions"))
    assert out.returncode == 0, out.stderr
    assert "hello" in out.stdout


# -- the limits, as a real server applies them --------------------------------------------------------------------
ECHO_LIMITS = """
import os, resource, time
def main(request):
    if request.args.get("sleep"):
        time.sleep(float(request.args["sleep"]))
    return {"timeout_env": os.environ.get("WHICH"), "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0], "len": len(request.get_data())}
"""


@pytest.mark.timeout(60)
def test_edit_takes_effect_on_the_next_call_and_bad_edit_keeps_last_good(make_server):
    srv = make_server(functions={"limits": ECHO_LIMITS},
                      profiles={"functions.toml": '[limits]\nmax_file_mb = 3\n[limits.env]\nWHICH = "first"\n'})
    srv.start()
    r = srv.get("/function/limits")
    assert r.json()["fsize"] == 3 * MiB and r.json()["timeout_env"] == "first"
    srv.write_profile("functions.toml", '[limits]\nmax_file_mb = 5\nmax_processes = 7\n'
                                        '[limits.env]\nWHICH = "second"\n')
    r = srv.get("/function/limits")  # the very next call: no restart, no delay
    assert (r.json()["fsize"], r.json()["nproc"], r.json()["timeout_env"]) == (5 * MiB, 7, "second")
    assert srv.get("/healthz").json()["profiles_error"] is None
    # A bad edit while running: the last good configuration stays, /healthz says what is wrong.
    path = os.path.join(srv.profiles_dir, "functions.toml")
    srv.write_profile("functions.toml", '[limits]\nmax_file_mb = "lots"\n')
    r = srv.get("/function/limits")
    assert r.status_code == 200 and r.json()["fsize"] == 5 * MiB and r.json()["timeout_env"] == "second"
    health = srv.get("/healthz").json()
    assert health["profiles_error"] == f"{path}: max_file_mb: must be an integer, not 'lots'", health
    assert health["status"] == "ok"
    assert "keeping the last good configuration" in srv.read_log()
    # A bad edit of a named profile is seen too, even with no call.
    srv.write_profile("functions.toml", '[limits]\nmax_file_mb = 6\n')
    srv.write_profile("strict.toml", "max_processes = 0\n")
    health = srv.get("/healthz").json()
    assert health["profiles_error"].startswith(os.path.join(srv.profiles_dir, "strict.toml") + ": max_processes:")
    # Fixed: the error clears and the fixed files apply.
    srv.write_profile("strict.toml", "max_processes = 1\n")
    assert srv.get("/function/limits").json()["fsize"] == 6 * MiB
    assert srv.get("/healthz").json()["profiles_error"] is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fname, text, key", [
    ("functions.toml", "[hello]\nmemory_mb = -5\n", "memory_mb"),
    ("strict.toml", "timeout = 3\n", "timeout"),
    ("default.toml", "network = 'no'\n", "network"),
    ("functions.toml", "[hello\n", None),
])
def test_server_refuses_to_start_with_invalid_profiles(make_server, fname, text, key):
    srv = make_server(functions={"hello": "def main(r):\n    return 'hi'\n"}, profiles={fname: text})
    srv.start(wait=False)
    code = srv.proc.wait(30)
    assert code != 0
    log = srv.read_log()
    path = os.path.join(srv.profiles_dir, fname)
    assert "refusing to start" in log and path in log, log
    if key:
        assert f"{path}: {key}: " in log, log
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.url + "/healthz", timeout=2)


@pytest.mark.timeout(60)
def test_a_function_cannot_raise_its_own_limits(make_server):
    """Limits come from the gateway's profiles folder, which the sandbox cannot read or write; the limits the
    kernel holds can only be lowered. The next call has exactly the configured limits again."""
    srv = make_server(functions={"greedy": """
        import os, resource, time
        def main(request):
            tried = {}
            pdir = request.args["pdir"]
            for what, op in (
                ("read functions.toml", lambda: open(os.path.join(pdir, "functions.toml")).read()),
                ("write functions.toml", lambda: open(os.path.join(pdir, "functions.toml"), "a").write(
                    "\\n[greedy]\\ntimeout_s = 3600\\n")),
                ("create a profile", lambda: open(os.path.join(pdir, "mine.toml"), "w").write("timeout_s = 3600\\n")),
                ("raise RLIMIT_CPU", lambda: resource.setrlimit(resource.RLIMIT_CPU, (3600, 3600))),
                ("raise RLIMIT_FSIZE", lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (-1, -1))),
                ("raise RLIMIT_NPROC", lambda: resource.setrlimit(resource.RLIMIT_NPROC, (-1, -1))),
                ("raise RLIMIT_DATA", lambda: resource.setrlimit(resource.RLIMIT_DATA, (-1, -1))),
            ):
                try:
                    op()
                    tried[what] = "done"
                except (OSError, ValueError) as e:
                    tried[what] = type(e).__name__
            print("TRIED", tried, flush=True)
            limits = {n: resource.getrlimit(getattr(resource, "RLIMIT_" + n)) for n in ("CPU", "FSIZE", "NPROC")}
            if request.args.get("sleep"):
                time.sleep(5)
            return {"tried": tried, "limits": limits}
    """}, profiles={"functions.toml": "[greedy]\ntimeout_s = 1\ncpu_s = 1\nmax_file_mb = 2\nmax_processes = 4\n"})
    srv.start()
    r = srv.get("/function/greedy", params={"pdir": srv.profiles_dir})
    assert r.status_code == 200, r.text
    tried = r.json()["tried"]
    # FileNotFoundError: with the file system view, the profiles folder is not even there.
    assert all(v in ("PermissionError", "ValueError", "FileNotFoundError") for v in tried.values()), tried
    expected = {"CPU": [1, 2], "FSIZE": [2 * MiB, 2 * MiB], "NPROC": [4, 4]}
    assert r.json()["limits"] == expected
    with open(os.path.join(srv.profiles_dir, "functions.toml")) as f:
        assert "3600" not in f.read()
    assert not os.path.exists(os.path.join(srv.profiles_dir, "mine.toml"))
    # The next call: the same limits, and the 1 s timeout still ends a 5 s sleep.
    t0 = time.monotonic()
    r = srv.get("/function/greedy", params={"pdir": srv.profiles_dir, "sleep": "1"})
    assert r.status_code == 504 and r.json()["error"] == "timeout", r.text
    assert time.monotonic() - t0 < 4
    assert_nothing_left(time.time())


@pytest.mark.timeout(60)
def test_max_request_kb(make_server):
    srv = make_server(functions={"limits": ECHO_LIMITS},
                      profiles={"functions.toml": "[limits]\nmax_request_kb = 1024\n"})
    srv.start()
    r = srv.request("POST", "/function/limits", data=b"x" * (2 * MiB))
    assert r.status_code == 413, r.text
    doc = r.json()
    assert doc["error"] == "request_too_large" and doc["function"] == "limits"
    assert "1024 KiB" in doc["message"]
    # chunked (no Content-Length): refused as well
    r = srv.request("POST", "/function/limits", data=iter([b"x" * MiB, b"x" * MiB]))
    assert r.status_code == 413 and r.json()["error"] == "request_too_large", r.text
    # exactly the limit is fine
    r = srv.request("POST", "/function/limits", data=b"x" * (1024 * 1024))
    assert r.status_code == 200 and r.json()["len"] == MiB, r.text
    assert_nothing_left(time.time())


def _concurrent(srv: Server, name: str, n: int, **params: Any) -> list[requests.Response]:
    barrier = threading.Barrier(n)

    def one(_: int) -> requests.Response:
        barrier.wait()
        return srv.get(f"/function/{name}", params=params, timeout=30)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.timeout(60)
def test_max_concurrency(make_server):
    srv = make_server(functions={"limits": ECHO_LIMITS},
                      profiles={"functions.toml": "[limits]\nmax_concurrency = 2\n"}, workers=2)
    srv.start()
    rs = _concurrent(srv, "limits", 5, sleep="1")
    ok = [r for r in rs if r.status_code == 200]
    busy = [r for r in rs if r.status_code == 503]
    assert len(ok) == 2 and len(busy) == 3, [(r.status_code, r.text) for r in rs]
    for r in busy:
        doc = r.json()
        assert doc["error"] == "busy" and doc["function"] == "limits" and "max_concurrency" in doc["message"]
        assert r.headers["Retry-After"] == "1"
    # the places are free again once the calls are over
    assert [r.status_code for r in _concurrent(srv, "limits", 2)] == [200, 200]
    assert_nothing_left(time.time())


@pytest.mark.timeout(60)
def test_max_concurrency_is_per_server_function(make_server):
    """Two servers with a same-named function (every deployment has a `hello`) do not share its places."""
    src = "import time\ndef main(request):\n    time.sleep(1)\n    return 'done'\n"
    toml = {"functions.toml": "[slow]\nmax_concurrency = 1\n"}
    a = make_server(functions={"slow": src}, profiles=toml).start()
    b = make_server(functions={"slow": src}, profiles=toml).start()
    with ThreadPoolExecutor(max_workers=2) as pool:
        ra, rb = pool.map(lambda s: s.get("/function/slow"), [a, b])
    assert (ra.status_code, rb.status_code) == (200, 200), (ra.text, rb.text)


@pytest.mark.timeout(60)
def test_env_reaches_the_function_and_nothing_of_the_server(make_server):
    srv = make_server(functions={"showenv": """
        import os
        def main(request):
            with open("/proc/self/environ", "rb") as f:
                raw = f.read()
            return {"environ": dict(os.environ), "raw": raw.decode()}
    """}, profiles={
        "default.toml": open(os.path.join(REPO, "sandbox_profiles", "default.toml")).read()
        + 'REGION = "eu-west"\n',
        "functions.toml": '[showenv]\nprofile = "default"\n[showenv.env]\nAPI_URL = "https://example.invalid"\n'
                          'REGION = "us-east"\n',
    }, env={"FNBOX_ADMIN_TOKEN": "secret-token", "AWS_SECRET_ACCESS_KEY": "server-secret"})
    srv.start()
    r = srv.get("/function/showenv")
    assert r.status_code == 200, r.text
    environ = r.json()["environ"]
    scratch = environ["HOME"]
    assert environ == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch,
                       "TMPDIR": scratch, "API_URL": "https://example.invalid", "REGION": "us-east"}
    # "/tmp": the call's own tmpfs in its file system view; else its scratch folder on the host.
    assert scratch == "/tmp" or scratch.startswith("/var/tmp/fnbox-scratch/") or scratch.startswith("/tmp/")
    # The process's initial environment block (inherited from the fork server, which was started with a scrubbed
    # environment), not only os.environ: no variable of the server's environment is in it.
    raw = r.json()["raw"]
    names = {item.split("=", 1)[0] for item in raw.split("\0") if item}
    assert names <= {"PATH", "LANG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE"}
    for key in ("FNBOX_ADMIN_TOKEN", "AWS_SECRET_ACCESS_KEY", "FNBOX_PROFILES_DIR", "FNBOX_FUNCTIONS_DIR",
                "FNBOX_BIND"):
        assert srv.env[key] not in raw, (key, raw)
    assert_nothing_left(time.time())

"""The cheaper fresh call (docs/performance.md, The fresh call (v3)), through a real server: children forked
without CPython's after-fork hooks still draw their own random numbers and can run threads and logging, and
the lighter Flask dispatch still runs whatever a function registers (after_this_request, a signal receiver
connected at import, a session read)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runner.config import ConfigError, Settings
from tests.conftest import REPO, server_fixture
from tests.helpers import assert_error

RANDOM = """
import logging, random, threading
def main(request):
    out = []
    t = threading.Thread(target=lambda: out.append(random.getrandbits(64)))
    t.start()
    t.join()
    logging.getLogger("fn").warning("logged from a fresh call")
    return {"r": random.getrandbits(64), "thread": out[0], "threads": threading.active_count(),
            "main": threading.current_thread() is threading.main_thread()}
"""

HOOKS = """
import flask

def _stamp(sender, response, **extra):
    response.headers["X-Finished"] = "yes"

flask.request_finished.connect(_stamp)  # connected at import: before the call's dispatch

def main(request):
    @flask.after_this_request
    def later(resp):
        resp.headers["X-After"] = "yes"
        return resp
    return {"session": dict(flask.session), "args": request.view_args}
"""

SESSION_WRITE = """
import flask
def main(request):
    flask.session["x"] = 1  # no secret key: Flask's null session refuses, as in any Flask app
    return "unreachable"
"""

# The function module as runner/child.py loads it (without importlib's search): everything a module imported by
# importlib.import_module("functions.modinfo") has, sibling imports both ways, and source-level tools.
MODINFO = """# -*- coding: latin-1 -*-
import importlib, inspect, sys
import _shared
from . import _shared as rel
import functions

CAFE = "caf\xe9"  # written as one latin-1 byte, so only a decoder that reads the cookie gets it right
me = sys.modules[__name__]

def main(request):
    spec = __spec__
    return {"name": __name__, "file": __file__, "package": __package__,
            "spec": [spec.name, spec.origin, spec.parent, spec.has_location, type(spec.loader).__name__],
            "loader_is_spec_loader": __loader__ is spec.loader, "in_sys_modules": sys.modules[__name__] is me,
            "attribute_of_package": getattr(functions, "modinfo", None) is me, "shared": _shared.X,
            "relative": [rel.__name__, rel.X], "cafe": CAFE, "source_has_main": "def main" in inspect.getsource(main),
            "reloaded": importlib.reload(me) is me}
"""
MODINFO_SHARED = "X = 'helper'\n"

RAISES_AT_IMPORT = """
import sys
raise LookupError("from the module body")
def main(request):
    return "unreachable"
"""

REPLACES_ITSELF = """
import sys, types
stand_in = types.SimpleNamespace(main=lambda request: "the stand-in answered")
sys.modules[__name__] = stand_in
"""

server = server_fixture(functions={"rand": RANDOM, "hooks": HOOKS, "session_write": SESSION_WRITE,
                                   "_shared": MODINFO_SHARED, "raises": RAISES_AT_IMPORT,
                                   "stand_in": REPLACES_ITSELF},
                        profiles={"functions.toml": "[raises]\ntraceback = true\n"})


def test_each_fresh_call_draws_its_own_random_numbers_and_runs_threads(server) -> None:
    seen = set()
    for _ in range(6):
        r = server.get("/function/rand")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["threads"] == 1 and body["main"] is True
        seen.update((body["r"], body["thread"]))
    assert len(seen) == 12  # siblings forked from one fork server never share a generator state


def test_after_this_request_and_signals_connected_at_import_still_run(server) -> None:
    r = server.get("/function/hooks/a/b")
    assert r.status_code == 200, r.text
    assert r.json() == {"session": {}, "args": {"func_name": "hooks", "subpath": "a/b"}}
    assert r.headers.get("X-After") == "yes"
    assert r.headers.get("X-Finished") == "yes"


def test_writing_the_null_session_is_a_function_error(server) -> None:
    body = assert_error(server.get("/function/session_write"), 500, "function_error", "session_write")
    assert "secret key" in body["message"]


def test_raw_fork_setting() -> None:
    assert Settings.from_env({}).raw_fork is True
    assert Settings.from_env({"FNBOX_RAW_FORK": "0"}).raw_fork is False
    with pytest.raises(ConfigError, match="FNBOX_RAW_FORK"):
        Settings.from_env({"FNBOX_RAW_FORK": "no"})


PROBE = """
import os, threading, time
from runner import rawfork
rawfork.install()
print(rawfork.usable())
pid = rawfork.fork()
if pid == 0:
    os._exit(7)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()
print(rawfork.usable())  # a second thread: os.fork() from now on
stop.set()
t.join()
# join() returns when the thread's Python work is over; the kernel drops its task a moment later.
deadline = time.monotonic() + 10
while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
    time.sleep(0.001)
print(rawfork.usable())
os.register_at_fork(after_in_child=lambda: None)  # a library's own hook: raw fork would skip it
print(rawfork.usable())
"""


def test_raw_fork_steps_aside_for_threads_and_foreign_at_fork_hooks() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "7", "False", "True", "False"]


def test_the_function_module_has_what_importlib_would_give_it(server) -> None:
    path = os.path.join(server.functions_dir, "modinfo.py")
    with open(path + ".tmp", "wb") as f:
        f.write(MODINFO.encode("latin-1"))
    os.chmod(path + ".tmp", 0o644)
    os.rename(path + ".tmp", path)
    r = server.get("/function/modinfo")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "name": "functions.modinfo", "file": path, "package": "functions",
        "spec": ["functions.modinfo", path, "functions", True, "SourceFileLoader"],
        "loader_is_spec_loader": True, "in_sys_modules": True, "attribute_of_package": True, "shared": "helper",
        "relative": ["functions._shared", "helper"], "cafe": "caf\u00e9", "source_has_main": True, "reloaded": True}


def test_an_error_in_the_module_body_names_the_functions_own_line(server) -> None:
    doc = assert_error(server.get("/function/raises"), 500, "function_error", "raises")
    assert (doc["type"], doc["message"]) == ("LookupError", "from the module body")
    tb = doc["traceback"]
    first = f'Traceback (most recent call last):\n  File "{server.functions_dir}/raises.py", line 2, in <module>\n'
    assert tb.startswith(first), tb
    assert "runner/child.py" not in tb and "importlib" not in tb, tb


def test_a_module_that_replaces_itself_in_sys_modules_answers_through_its_stand_in(server) -> None:
    r = server.get("/function/stand_in")
    assert (r.status_code, r.text) == (200, "the stand-in answered")

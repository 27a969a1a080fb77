"""Preloaded modules (`preload = [...]`): imported by the fork server before it forks, visible to calls, a failure
reported in /healthz and the log, an invalid name a profile error. Semantics only; the speed is in bench/."""

from __future__ import annotations

import os
import time

import pytest

from runner.profiles import ProfileError, load_profiles
from tests.conftest import dedent

# At import time, before it imports anything itself, the function records which of the modules were already in
# its process: only the fork server (forking it) can have put them there. (It imports nothing it was not given:
# where the interpreter lives in an unreadable home, e.g. pyenv under /root, a sandbox uid cannot read the
# standard library and only what the fork server imported is importable.)
INHERITS = """
import sys
BEFORE = {m: m in sys.modules for m in ("fractions", "colorsys", "wave", "statistics")}

def main(request):
    out = {"before": BEFORE}
    if BEFORE["fractions"]:
        from fractions import Fraction
        out["sum"] = str(Fraction(1, 3) + Fraction(1, 6))
    if request.args.get("try"):
        try:
            __import__(request.args["try"])
        except ImportError as e:
            out["import_error"] = type(e).__name__
    return out
"""


def _healthz_preload(srv, module: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    state = "missing"
    while time.monotonic() < deadline:
        state = srv.get("/healthz").json().get("preload", {}).get(module, "missing")
        if state not in ("missing", "pending"):
            return state
        time.sleep(0.05)
    return state


def test_preloaded_modules_are_imported_by_the_parent_and_usable(make_server):
    srv = make_server(functions={"inherits": INHERITS, "plain": INHERITS},
                      profiles={"fast.toml": 'preload = ["fractions", "colorsys"]\n',
                                "functions.toml": '[inherits]\nprofile = "fast"\n'}).start()
    assert _healthz_preload(srv, "fractions") == "ok"
    r = srv.get("/function/inherits")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["sum"] == "1/2"
    assert doc["before"]["fractions"] and doc["before"]["colorsys"], doc
    # Never imported by anyone: it was not there before the function's own import (the control).
    assert not doc["before"]["wave"], doc
    assert "fnbox: preloaded 'fractions'" in srv.read_log()


def test_a_profile_edit_adding_a_module_preloads_it_for_the_next_call(make_server):
    srv = make_server(functions={"inherits": INHERITS}).start()
    r = srv.get("/function/inherits")
    assert r.status_code == 200 and not r.json()["before"]["statistics"], r.text
    srv.write_profile("functions.toml", '[inherits]\npreload = ["statistics"]\n')
    r = srv.get("/function/inherits")
    assert r.status_code == 200 and r.json()["before"]["statistics"], r.text
    assert _healthz_preload(srv, "statistics") == "ok"


def test_a_failing_preload_is_reported_and_calls_import_it_themselves(make_server):
    srv = make_server(functions={"inherits": INHERITS},
                      profiles={"default.toml": open_default() + '\npreload = ["fnbox_no_such_module", "fractions"]\n'}
                      ).start()
    state = _healthz_preload(srv, "fnbox_no_such_module")
    assert state.startswith("failed: ModuleNotFoundError"), state
    assert _healthz_preload(srv, "fractions") == "ok"  # one failure does not stop the others
    deadline = time.monotonic() + 5
    while "fnbox: preload 'fnbox_no_such_module' failed" not in srv.read_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "fnbox: preload 'fnbox_no_such_module' failed" in srv.read_log()
    r = srv.get("/function/inherits", params={"try": "fnbox_no_such_module"})  # the call tries it itself
    assert r.status_code == 200 and r.json() == {
        "before": {"fractions": True, "colorsys": False, "wave": False, "statistics": False}, "sum": "1/2",
        "import_error": "ModuleNotFoundError"}, r.text
    assert srv.get("/healthz").status_code == 200


def open_default() -> str:
    from tests.conftest import REPO

    with open(os.path.join(REPO, "sandbox_profiles", "default.toml")) as f:
        text = f.read()
    keys = text.split("\n[env]")[0]  # keys only: the [env] table must stay last
    return "\n".join(line for line in keys.splitlines() if not line.startswith("preload"))  # the test sets it


@pytest.mark.parametrize("value, reason", [
    ('"requests"', "must be a list of module names"),
    ('["not a module"]', "is not a module name"),
    ('["os..path"]', "is not a module name"),
    ('[3]', "is not a string"),
    ('["functions.hello"]', "only installed libraries can be preloaded"),
    ('["runner.child"]', "only installed libraries can be preloaded"),
])
def test_an_invalid_preload_is_a_profile_error_with_file_key_and_reason(tmp_path, value, reason):
    (tmp_path / "default.toml").write_text("timeout_s = 5\n")
    (tmp_path / "functions.toml").write_text(dedent(f"""
        [hook]
        preload = {value}
    """))
    with pytest.raises(ProfileError) as e:
        load_profiles(str(tmp_path))
    assert e.value.path.endswith("functions.toml") and e.value.key == "preload" and reason in e.value.reason, e.value


@pytest.mark.parametrize("src, reason", [
    ("X = 1\n", "not an installed library"),  # the project's or a function's code: only libraries are preloaded
    ("import threading, time\nthreading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n",
     "starts 1 thread(s) while importing"),
    ("import time\ntime.sleep(30)\n", "importing took longer than"),
    ("import os\nos._exit(3)\n", "the import crashed its process (exit code 3)"),
    ("raise RuntimeError('no config')\n", "RuntimeError: no config"),
])
def test_the_trial_import_refuses_what_would_hurt_the_fork_server(tmp_path, monkeypatch, src, reason):
    from runner import preload

    name = f"fnbox_trial_{abs(hash(src))}"
    (tmp_path / f"{name}.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(preload, "TRIAL_TIMEOUT", 1.0)
    assert reason in preload._trial(name)
    assert name not in __import__("sys").modules  # only the throwaway child imported it


def test_a_library_that_imports_multiprocessing_may_be_preloaded(tmp_path):
    """multiprocessing aliases the running program as `__mp_main__` (boto3 imports it): that alias is the fork
    server itself, not foreign code, and must not make the trial refuse the library."""
    import subprocess
    import sys

    from tests.conftest import REPO

    main = tmp_path / "main.py"  # a __main__ outside site-packages, like the fork server's
    main.write_text("from runner import preload\nprint(repr(preload._trial('multiprocessing')))\n")
    out = subprocess.run([sys.executable, str(main)], cwd=REPO, capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "''"

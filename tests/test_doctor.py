"""`python -m runner.doctor`: the sandbox layers of this machine, and what a sandbox uid can read."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import PYTHON, REPO

LAYERS = ["uid_pool", "memory_cgroup", "pids_cgroup", "network_namespace", "ipc_namespace", "litter_sweep",
          "rlimits", "psutil_watchdog", "scratch_dir", "file_system_view", "own_processes", "disk_quota",
          "syscall_filter", "network_egress", "cpu_cgroup"]
ACCESS = ["runtime_readable", "venv_readable", "functions_readable", "profiles_private"]


@pytest.fixture
def dirs():
    """A functions folder a sandbox uid can read and a profiles folder it cannot (as deployed). Not in pytest's
    tmp_path: that is below a 0700 folder, which no sandbox uid can traverse."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="fnbox-test-doctor-", dir="/tmp"))
    os.chmod(base, 0o755)
    functions = base / "functions"
    functions.mkdir(mode=0o755)
    (functions / "__init__.py").write_text("")
    (functions / "hello.py").write_text("def main(request):\n    return 'hi'\n")
    pkg = functions / "pkg"
    pkg.mkdir(mode=0o755)
    (pkg / "__init__.py").write_text("def main(request):\n    return 'pkg'\n")
    for f in (functions / "__init__.py", functions / "hello.py", pkg / "__init__.py"):
        os.chmod(f, 0o644)
    profiles = base / "profiles"
    shutil.copytree(os.path.join(REPO, "sandbox_profiles"), profiles)
    os.chmod(profiles, 0o700)
    yield functions, profiles
    shutil.rmtree(base, ignore_errors=True)


def doctor(functions, profiles, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FNBOX_FUNCTIONS_DIR=str(functions), FNBOX_PROFILES_DIR=str(profiles))
    return subprocess.run([PYTHON, "-m", "runner.doctor", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def rows(out: str) -> dict[str, tuple[str, str]]:
    lines = out.splitlines()
    assert lines[1].split() == ["layer", "status", "detail"], out
    found = {}
    for line in lines[2:-1]:
        name, status, detail = line.split(None, 2)
        found[name] = (status, detail)
    return found


@pytest.mark.timeout(60)
def test_table_of_layers(dirs):
    out = doctor(*dirs)
    assert out.returncode == 0, out.stderr
    table = rows(out.stdout)
    assert list(table) == LAYERS + ACCESS
    for name, (status, detail) in table.items():
        assert status in ("active", "DEGRADED") and detail, (name, status, detail)
    degraded = [n for n, (st, _) in table.items() if st == "DEGRADED"]
    last = out.stdout.splitlines()[-1]
    assert last == (f"{len(degraded)} degraded" if degraded else "every layer is active")
    if os.geteuid() == 0:
        # As root (here and in CI) every layer is on, and a sandbox uid reads the runtime, venv and functions.
        assert not degraded, out.stdout
        assert "uid 61000" in table["functions_readable"][1] and "(3 files)" in table["functions_readable"][1]
        assert "not readable by uid 61000" in table["profiles_private"][1]
    else:
        assert table["uid_pool"][0] == "DEGRADED" and table["profiles_private"][0] == "DEGRADED"


@pytest.mark.timeout(60)
def test_strict_and_json(dirs):
    plain, strict, js = doctor(*dirs), doctor(*dirs, "--strict"), doctor(*dirs, "--json")
    assert plain.returncode == 0 and js.returncode == 0
    doc = json.loads(js.stdout)
    assert list(doc) == LAYERS + ACCESS
    table = rows(plain.stdout)
    assert {k: (v["status"], v["detail"]) for k, v in doc.items()} == table
    any_degraded = any(v["status"] == "DEGRADED" for v in doc.values())
    assert strict.returncode == (1 if any_degraded else 0)


@pytest.mark.timeout(60)
def test_unreadable_function_is_degraded(dirs):
    if os.geteuid() != 0:
        pytest.fail("runs as root, like CI: the check forks a child that becomes a sandbox uid", pytrace=False)
    functions, profiles = dirs
    os.chmod(functions / "hello.py", 0o600)
    plain, strict = doctor(*dirs), doctor(*dirs, "--strict")
    status, detail = rows(plain.stdout)["functions_readable"]
    assert status == "DEGRADED" and f"cannot read {functions / 'hello.py'}: Permission denied" in detail
    assert plain.returncode == 0 and strict.returncode == 1


@pytest.mark.timeout(60)
def test_private_parent_folder_is_degraded(dirs):
    """A functions folder below a 0700 folder (a private home) cannot be reached, whatever its own mode."""
    if os.geteuid() != 0:
        pytest.fail("runs as root, like CI: the check forks a child that becomes a sandbox uid", pytrace=False)
    functions, profiles = dirs
    os.chmod(functions.parent, 0o700)
    try:
        status, detail = rows(doctor(*dirs).stdout)["functions_readable"]
        assert status == "DEGRADED" and f"cannot read {functions}: Permission denied" in detail, detail
    finally:
        os.chmod(functions.parent, 0o755)


@pytest.mark.timeout(60)
def test_readable_profiles_folder_is_degraded(dirs):
    if os.geteuid() != 0:
        pytest.fail("runs as root, like CI: the check forks a child that becomes a sandbox uid", pytrace=False)
    functions, profiles = dirs
    os.chmod(profiles, 0o755)
    out = doctor(*dirs, "--strict")
    status, detail = rows(out.stdout)["profiles_private"]
    assert status == "DEGRADED" and f"chmod 0700 {profiles}" in detail, detail
    assert out.returncode == 1


@pytest.mark.timeout(60)
def test_doctor_agrees_with_the_server(make_server, dirs):
    srv = make_server(functions={"hello": "def main(r):\n    return 'hi'\n"}).start()
    sandbox = srv.get("/healthz").json()["sandbox"]
    table = rows(doctor(*dirs).stdout)
    assert set(sandbox) == set(LAYERS)
    for name, text in sandbox.items():
        status, _, detail = text.partition(": ")
        assert table[name] == ("active" if status == "active" else "DEGRADED", detail), name

"""ops/fnbox.service, ops/install and ops/render_nginx.py, checked without touching this host's system config.

The install script runs for real only into a temporary --prefix / --etc-dir, with --no-systemd --no-nginx and an
existing --user (no account is created here); the system-wide parts are checked through --dry-run.
"""

from __future__ import annotations

import configparser
import os
import pwd
import re
import runpy
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import psutil
import pytest
import requests

from tests.conftest import REPO, free_port

INSTALL = os.path.join(REPO, "ops", "install")
UNIT = os.path.join(REPO, "ops", "fnbox.service")
ROOT = os.geteuid() == 0


def unit_service() -> dict[str, list[str]]:
    """The [Service] section, every key with all its values (systemd allows repeated keys)."""
    values: dict[str, list[str]] = {}
    section = None
    with open(UNIT) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            if section == "Service":
                values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_install_script_syntax():
    assert os.access(INSTALL, os.X_OK), "ops/install must be executable"
    r = subprocess.run(["bash", "-n", INSTALL], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([INSTALL, "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "--dry-run" in r.stdout


def test_unit_file_contents():
    svc = unit_service()
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Restart"] == "always"
    assert one["KillMode"] == "mixed"
    assert "-/etc/fnbox/fnbox.env" in svc["EnvironmentFile"]
    assert one["WorkingDirectory"] == "/opt/fnbox"
    assert one["ExecStart"] == "/opt/fnbox/.venv/bin/gunicorn -c ops/gunicorn.conf.py"
    # The graceful stop must fit before systemd's SIGKILL.
    graceful = runpy.run_path(os.path.join(REPO, "ops", "gunicorn.conf.py"))["graceful_timeout"]
    assert int(one["TimeoutStopSec"]) > graceful
    assert one["Delegate"] == "yes"
    assert one["NoNewPrivileges"] == "yes"
    assert int(one["LimitNOFILE"]) >= 4096
    # Must run as root (per-call uids, cgroups, netns) and must not lose loopback or cgroup writes.
    assert "User" not in svc and "DynamicUser" not in svc
    for key in ("PrivateNetwork", "PrivateUsers", "ProtectControlGroups"):
        assert one.get(key, "no") == "no", key
    caps = set(one["CapabilityBoundingSet"].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_SYS_ADMIN", "CAP_KILL", "CAP_CHOWN"} <= caps
    assert "net" in one["RestrictNamespaces"].split()
    # A standard INI reader can parse it too (what most config tooling does).
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(UNIT)
    assert cp.get("Install", "WantedBy") == "multi-user.target"


@pytest.mark.timeout(60)
def test_unit_file_systemd_analyze(tmp_path):
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze is not installed")
    # Point the unit at this checkout so ExecStart= names an existing executable, as it will after install.
    unit = tmp_path / "fnbox.service"
    unit.write_text(open(UNIT).read().replace("/opt/fnbox", REPO))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=50)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "fnbox" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


@pytest.mark.timeout(30)
def test_install_dry_run_changes_nothing(tmp_path):
    prefix, etc = tmp_path / "opt" / "fnbox", tmp_path / "etc"
    user = "fnbox-dryrun-test"
    try:
        pwd.getpwnam(user)
        pytest.skip(f"user {user} exists on this machine")
    except KeyError:
        pass
    r = subprocess.run([INSTALL, "--dry-run", "--prefix", str(prefix), "--etc-dir", str(etc), "--user", user,
                        "--listen", "8080"], capture_output=True, text=True, timeout=25)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "[dry-run] useradd --system" in out and user in out
    assert "-m venv" in out and "pip install" in out
    assert "FNBOX_ADMIN_TOKEN" in out
    assert "render_nginx.py --listen 8080" in out or "nginx: skipped" in out
    assert "systemd" in out
    # Nothing was created: no directories, no account.
    assert not prefix.exists() and not etc.exists()
    with pytest.raises(KeyError):
        pwd.getpwnam(user)


def test_install_refuses_bad_prefix(tmp_path):
    r = subprocess.run([INSTALL, "--dry-run", "--prefix", "relative/dir"], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0 and "absolute path" in r.stderr


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _check_layout(prefix: str, etc: str, owner: str) -> str:
    uid = pwd.getpwnam(owner).pw_uid
    functions, profiles = os.path.join(prefix, "functions"), os.path.join(prefix, "sandbox_profiles")
    assert _mode(functions) == 0o755 and os.stat(functions).st_uid == uid
    for name in os.listdir(functions):
        p = os.path.join(functions, name)
        if os.path.isfile(p):
            assert _mode(p) == 0o644 and os.stat(p).st_uid == uid, p
    assert os.path.isfile(os.path.join(functions, "__init__.py"))
    assert _mode(profiles) == 0o700 and os.stat(profiles).st_uid == 0
    for name in os.listdir(profiles):
        assert _mode(os.path.join(profiles, name)) == 0o600, name
    env = os.path.join(etc, "fnbox.env")
    assert _mode(env) == 0o600 and os.stat(env).st_uid == 0
    assert _mode(etc) == 0o700
    tokens = re.findall(r"^FNBOX_ADMIN_TOKEN=(\S+)$", open(env).read(), re.M)
    assert len(tokens) == 1 and len(tokens[0]) >= 32
    # Code: root-owned, not writable by group/others; no checkout state copied over.
    for rel in ("gateway/app.py", "runner/child.py", "ops/gunicorn.conf.py", "ops/render_nginx.py"):
        st = os.stat(os.path.join(prefix, rel))
        assert st.st_uid == 0 and not st.st_mode & 0o022, rel
    assert not os.path.exists(os.path.join(prefix, ".git"))
    # The venv comes from the system python, not from a version manager in a home directory.
    cfg = open(os.path.join(prefix, ".venv", "pyvenv.cfg")).read()
    assert "/.pyenv/" not in cfg
    assert os.access(os.path.join(prefix, ".venv", "bin", "gunicorn"), os.X_OK)
    return tokens[0]


def _serve_installed(prefix: str, fnbox_cmd: str | None = None) -> None:
    """Starts the installed copy as its unit would (cwd = prefix, its venv's gunicorn) and calls hello."""
    port = free_port()
    env = dict(os.environ, FNBOX_BIND=f"127.0.0.1:{port}", FNBOX_FUNCTIONS_DIR=os.path.join(prefix, "functions"),
               FNBOX_PROFILES_DIR=os.path.join(prefix, "sandbox_profiles"), FNBOX_WORKERS="1", FNBOX_THREADS="4")
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([os.path.join(prefix, ".venv", "bin", "gunicorn"), "-c", "ops/gunicorn.conf.py"],
                            cwd=prefix, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    known: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "installed server exited"
            try:
                r = requests.get(f"http://127.0.0.1:{port}/function/hello/Ann", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "installed server did not answer within 30 s"
                time.sleep(0.1)
        assert r.status_code == 200 and r.text == "Hello Ann!", r.text
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
        assert health["status"] == "ok"
        if fnbox_cmd:
            r = subprocess.run([fnbox_cmd, "invoke", "hello", "Ann", "--url", f"http://127.0.0.1:{port}"],
                               capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
            assert r.returncode == 0 and r.stdout == "Hello Ann!\n", r.stdout + r.stderr
    except BaseException:
        log.seek(0)
        print(log.read().decode("utf-8", "replace")[-4000:])
        raise
    finally:
        try:
            known = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        except psutil.Error:
            known = [proc.pid]
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        for pid in known[1:]:  # a fork server runs in its own session: end any straggler by its pid
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    os.kill(pid, signal.SIGKILL)
            except (psutil.Error, ProcessLookupError):
                pass
        log.close()


@pytest.mark.timeout(240)
@pytest.mark.skipif(not ROOT, reason="ops/install runs as root (chown, system user); its dry run is tested above")
def test_install_into_temp_prefix_twice():
    # Under /tmp, not pytest's 0700 tmp_path: the installed server's sandbox uids must reach the functions
    # (the script grants o+x on the prefix's ancestors, here the mkdtemp dir only).
    base = tempfile.mkdtemp(prefix="fnbox-install-test-", dir="/tmp")
    prefix, etc = os.path.join(base, "fnbox"), os.path.join(base, "etc", "fnbox")
    bin_dir = os.path.join(base, "bin")
    owner = "nobody"  # an existing unprivileged account: no user is created on this machine
    # A checkout whose functions/ holds a developer's experiment besides the example: it is not installed.
    checkout = os.path.join(base, "checkout")
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(".git", ".venv", "var", "__pycache__",
                                                                  ".pytest_cache", ".ruff_cache"))
    with open(os.path.join(checkout, "functions", "tour_experiment.py"), "w") as f:
        f.write("def main(request):\n    return 'experiment'\n")
    cmd = [os.path.join(checkout, "ops", "install"), "--prefix", prefix, "--etc-dir", etc, "--user", owner,
           "--bin-dir", bin_dir, "--no-systemd", "--no-nginx"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "systemd: skipped" in r.stdout and "nginx: skipped" in r.stdout
        token = _check_layout(prefix, etc, owner)
        assert sorted(os.listdir(os.path.join(prefix, "functions"))) == ["__init__.py", "hello.py"]
        # The fnbox command is installed, runs this install's CLI, and knows the server's address.
        fnbox_cmd = os.path.join(bin_dir, "fnbox")
        r = subprocess.run([fnbox_cmd, "--help"], capture_output=True, text=True, timeout=30,
                           env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0 and "usage: fnbox" in r.stdout, r.stdout + r.stderr
        assert "http://127.0.0.1:8000" in open(fnbox_cmd).read()

        # The operator's own files, and sloppy modes, between two runs.
        custom = os.path.join(prefix, "functions", "custom.py")
        with open(custom, "w") as f:
            f.write("def main(request):\n    return 'mine'\n")
        os.chmod(custom, 0o600)
        with open(os.path.join(prefix, "sandbox_profiles", "default.toml"), "a") as f:
            f.write("# edited by the operator\n")
        os.chmod(os.path.join(prefix, "sandbox_profiles"), 0o755)
        data = os.path.join(prefix, "var", "history.sqlite3")  # the server's data (FNBOX_DATA_DIR)
        os.makedirs(os.path.dirname(data), mode=0o711)
        with open(data, "w") as f:
            f.write("calls")
        os.chmod(data, 0o600)

        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert time.monotonic() - t0 < 30, "a second run must not reinstall the requirements"
        assert "requirements up to date" in r.stdout and "FNBOX_ADMIN_TOKEN: kept" in r.stdout
        assert _check_layout(prefix, etc, owner) == token
        assert open(custom).read() == "def main(request):\n    return 'mine'\n"
        assert "# edited by the operator" in open(os.path.join(prefix, "sandbox_profiles", "default.toml")).read()
        assert open(data).read() == "calls" and _mode(data) == 0o600  # data is neither replaced nor opened up

        _serve_installed(prefix, fnbox_cmd)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(30)
def test_install_dry_run_in_place(tmp_path):
    # A checkout that already is the install dir is used as it is: nothing is copied over it.
    r = subprocess.run([INSTALL, "--dry-run", "--prefix", REPO, "--etc-dir", str(tmp_path / "etc"), "--no-systemd",
                        "--no-nginx"], capture_output=True, text=True, timeout=25)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"using the checkout in place: {REPO}" in r.stdout and "tar -C" not in r.stdout
    assert not (tmp_path / "etc").exists()

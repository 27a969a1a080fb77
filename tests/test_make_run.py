"""`make run` / `make wait` / `make stop` as a user runs them: a busy address says which variable moves it and
leaves no metrics folder behind; a backgrounded `make run` is stopped by `make stop` through its pidfile."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile

import pytest
import requests

from tests.conftest import REPO, free_port


def _env(tmp: str, port: int) -> dict[str, str]:
    fdir = tempfile.mkdtemp(prefix="fnbox-make-fn-", dir="/tmp")
    os.chmod(fdir, 0o755)
    with open(os.path.join(fdir, "__init__.py"), "w"):
        pass
    with open(os.path.join(fdir, "hello.py"), "w") as f:
        f.write("def main(request):\n    return 'hello from make run'\n")
    for p in (fdir, os.path.join(fdir, "__init__.py"), os.path.join(fdir, "hello.py")):
        os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
    data = tempfile.mkdtemp(prefix="fnbox-make-data-", dir="/tmp")
    os.chmod(data, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FNBOX_", "PROMETHEUS_", "MAKE"))}
    env.update(FNBOX_BIND=f"127.0.0.1:{port}", FNBOX_FUNCTIONS_DIR=fdir, FNBOX_DATA_DIR=data, FNBOX_WORKERS="1",
               FNBOX_THREADS="4", TMPDIR=tmp, FNBOX_WAIT_S="60")
    return env


@pytest.mark.timeout(60)
def test_make_run_on_a_busy_port_says_which_variable_and_leaves_no_metrics_folder(tmp_path):
    tmp = tempfile.mkdtemp(prefix="fnbox-make-tmp-", dir="/tmp")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run(["make", "-s", "run", f"PIDFILE={tmp_path}/fnbox.pid"], cwd=REPO, env=_env(tmp, port),
                           capture_output=True, text=True, timeout=50)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert out.count(f"fnbox: cannot listen on 127.0.0.1:{port}") == 1, out
    assert "FNBOX_BIND=" in out and "make stop" in out
    assert "Retrying in 1 second" not in out  # Gunicorn's five retries are not reached
    assert os.listdir(tmp) == [], "the failed start left its metrics folder behind"
    os.rmdir(tmp)


@pytest.mark.timeout(90)
def test_make_run_in_the_background_then_make_wait_and_make_stop(tmp_path):
    tmp = tempfile.mkdtemp(prefix="fnbox-make-tmp-", dir="/tmp")
    port = free_port()
    env = _env(tmp, port)
    pidfile = f"{tmp_path}/fnbox.pid"
    run = subprocess.Popen(["make", "-s", "run", f"PIDFILE={pidfile}"], cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        w = subprocess.run(["make", "-s", "wait"], cwd=REPO, env=env, capture_output=True, text=True, timeout=70)
        assert w.returncode == 0 and w.stdout == f"fnbox: up at http://127.0.0.1:{port}/\n", w.stdout + w.stderr
        assert requests.get(f"http://127.0.0.1:{port}/function/hello", timeout=10).text == "hello from make run"
        pid = int(open(pidfile).read())
        assert os.listdir(tmp)  # the running server's metrics folder
        s = subprocess.run(["make", "-s", "stop", f"PIDFILE={pidfile}"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=70)
        assert s.returncode == 0 and s.stdout == f"fnbox: stopped (pid {pid})\n", s.stdout + s.stderr
        assert run.wait(10) == 0  # make run ends with the server, successfully
        assert not os.path.exists(pidfile)
        assert os.listdir(tmp) == []
        s = subprocess.run(["make", "-s", "stop", f"PIDFILE={pidfile}"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=20)
        assert s.returncode == 0 and "not running" in s.stdout
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGTERM)
            run.wait(30)

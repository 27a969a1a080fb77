"""One slot registry per machine: two fnbox servers never take, sweep or kill each other's calls.

Two servers with their own state folders and cgroup parents but the same sandbox uids (the worst case: a
`fnbox run` or a second `make run` on a machine whose uid range overlaps) share the machine-wide slot registry:
a uid is one call's at a time, whatever server holds it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import CGROUP_PARENT, REPO, SHARED, remove_cgroups

FNBOX = os.path.join(REPO, ".venv", "bin", "fnbox")

SLOW = """
import os, time
def main(request):
    # Writes into its scratch dir (its cwd), tells the test it runs, waits, reads the file back: a sweep or a
    # kill by another server would end the process or make the folder root's.
    tag = request.args["tag"]
    with open("mine.txt", "w") as f:
        f.write(tag)
    open(os.path.join(request.args["marks"], tag), "w").close()
    time.sleep(float(request.args.get("s", "3")))
    with open("mine.txt") as f:
        return {"tag": f.read(), "uid": os.getuid()}
"""
QUICK = "import os\ndef main(request):\n    return {'uid': os.getuid()}\n"


@pytest.fixture
def marks():
    d = tempfile.mkdtemp(prefix="fnbox-test-marks-", dir=SHARED)  # calls see only SHARED of the host
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_a_second_server_on_the_same_uids_never_touches_the_first_ones_calls(make_server, marks):
    functions = {"slow": SLOW, "quick": QUICK}
    env = {"FNBOX_SANDBOX_SLOTS": "4", "FNBOX_SPARES": "1"}
    a = make_server(functions=functions, env=env).start()
    other_parent = CGROUP_PARENT + "-b"
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            slow = [pool.submit(a.get, "/function/slow", params={"tag": t, "marks": marks, "s": "8"}, timeout=30)
                    for t in ("one", "two")]
            wait_for(lambda: len(os.listdir(marks)) == 2, what="both slow calls to run")
            # Same uids, its own state folder (the harness gives each server one) and its own cgroup parent: it
            # starts (and sweeps the slots nobody holds) and serves calls while a's calls hold two slots.
            b = make_server(functions=functions, env=dict(env, FNBOX_CGROUP_PARENT=other_parent)).start()
            answers = [b.get("/function/quick") for _ in range(12)]
            results = [f.result() for f in slow]
        for r in answers:
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:  # the machine's 4 slots are shared: busy, never someone else's call killed
                assert r.json()["error"] == "busy", r.text
        ok = [r.json()["uid"] for r in answers if r.status_code == 200]
        assert ok, [r.text for r in answers]
        assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
        assert sorted(r.json()["tag"] for r in results) == ["one", "two"]
        if os.geteuid() == 0:
            a_uids = {r.json()["uid"] for r in results}
            assert len(a_uids) == 2 and not a_uids & set(ok), (a_uids, ok)  # one uid, one call, machine-wide
    finally:
        for s in (locals().get("b"), a):
            if s is not None:
                s.stop()
        remove_cgroups(other_parent)


@pytest.mark.timeout(90)
def test_fnbox_run_with_another_state_dir_never_kills_a_servers_call(make_server, marks, tmp_path):
    """The reported case: `fnbox run` (its own FNBOX_STATE_DIR, the server's uids) SIGKILLed a server's call."""
    env = {"FNBOX_SANDBOX_SLOTS": "4", "FNBOX_SPARES": "0"}
    srv = make_server(functions={"slow": SLOW}, env=env).start()
    snippet = tmp_path / "snippet.py"
    snippet.write_text("import os\ndef main(request):\n    return str(os.getuid())\n")
    cli_env = {k: v for k, v in srv.env.items() if k.startswith("FNBOX_") or k in ("PATH", "LANG", "HOME")}
    cli_env.update(FNBOX_STATE_DIR=str(tmp_path / "state"), FNBOX_CGROUP_PARENT=CGROUP_PARENT + "-cli")
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            slow = pool.submit(srv.get, "/function/slow", params={"tag": "server", "marks": marks, "s": "6"},
                               timeout=30)
            wait_for(lambda: len(os.listdir(marks)) == 1, what="the server's call to run")
            runs = [subprocess.run([FNBOX, "run", str(snippet)], env=cli_env, capture_output=True, text=True,
                                   timeout=60) for _ in range(3)]
            r = slow.result()
        for run in runs:
            assert run.returncode == 0 and "outcome:  ok" in run.stdout, run.stdout + run.stderr
        assert r.status_code == 200 and r.json()["tag"] == "server", r.text
    finally:
        remove_cgroups(CGROUP_PARENT + "-cli")

"""The soak's short form in the suite: tests/soak.py with 60 s of load, as its own process (the server's
footprint is measured from outside; this process's threads and memory are not part of it). The long form is run
by hand: `.venv/bin/python tests/soak.py --minutes 10`."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import PYTHON, REPO


@pytest.mark.timeout(360)
def test_soak_short():
    proc = subprocess.Popen([PYTHON, os.path.join(REPO, "tests", "soak.py"), "--seconds", "60"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the soak stops its server (by pid) and exits
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate(timeout=10)
        pytest.fail(f"the soak did not end within 280 s:\n{stdout}\n{stderr[-5000:]}")
    print(stdout)
    assert proc.returncode == 0, f"soak failed (exit {proc.returncode}):\n{stdout}\n{stderr[-5000:]}"

"""Who runs a claimed call (jobs.calls.owner_id / owner_alive): a live owner is never taken for a dead one when the
wall clock is stepped, a dead or reused pid is, and owners written by earlier versions are still understood."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import psutil
import pytest

from jobs.calls import owner_alive, owner_id, start_ticks
from tests.asynckit import wait_for

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


def test_own_owner_is_alive_and_names_the_board():
    me = owner_id("b1")
    board, pid, created, ticks = me.split("/")
    assert (board, int(pid)) == ("b1", os.getpid())
    assert int(ticks) == start_ticks(os.getpid())
    assert abs(float(created) - psutil.Process().create_time()) < 0.01
    assert owner_alive(me, "b1") is True
    assert owner_alive(me, "b2") is None  # another board's owner: this board cannot tell


def test_a_stepped_wall_clock_does_not_make_a_live_owner_look_dead(monkeypatch):
    """psutil's create_time is boot time (wall clock now minus uptime) plus the start ticks: stepping the clock by
    30 s moves it by 30 s. The owner check must not depend on it."""
    me = owner_id("b1")
    real = psutil.Process.create_time
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + 30.0)
    assert owner_alive(me, "b1") is True


def test_a_dead_or_reused_pid_is_not_the_owner():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = start_ticks(child.pid)
        assert ticks is not None
        owner = f"b1/{child.pid}/{psutil.Process(child.pid).create_time():.3f}/{ticks}"
        assert owner_alive(owner, "b1") is True
        # The same pid started at another time is another process (a pid reused after the owner died).
        assert owner_alive(f"b1/{child.pid}/0.000/{ticks + 1}", "b1") is False
        child.kill()
        # Dead but not yet reaped (a zombie) runs nothing any more: not the owner either.
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 10, "the child a zombie")
        assert owner_alive(owner, "b1") is False
    finally:
        child.kill()
        child.wait(10)
    assert owner_alive(owner, "b1") is False


def test_owners_written_by_earlier_versions_are_checked_by_create_time():
    """board/pid/create_time, as written before the start ticks were added: still compared as then."""
    me = psutil.Process()
    assert owner_alive(f"b1/{me.pid}/{me.create_time():.3f}", "b1") is True
    assert owner_alive(f"b1/{me.pid}/{me.create_time() - 5:.3f}", "b1") is False
    for garbage in ("", "b1", "b1/x/1.0", "b1/1/x/y", f"b1/{me.pid}/1.0/2/3"):
        assert owner_alive(garbage, "b1") is False, garbage


def test_start_ticks_reads_past_a_command_name_with_spaces_and_parentheses():
    """/proc/<pid>/stat's second field is the command name in parentheses, which may hold ') (': the fields are
    counted from the last ')'. Checked against psutil's own reading of the same process."""
    d = tempfile.mkdtemp(prefix="fnbox-test-comm-")
    try:
        odd = os.path.join(d, "x) (y z")
        os.symlink(shutil.which("sleep") or "/bin/sleep", odd)
        child = subprocess.Popen([odd, "60"])
        try:
            wait_for(lambda: psutil.Process(child.pid).name() == "x) (y z", 10, "the odd command name")
            ticks = start_ticks(child.pid)
            assert ticks is not None
            hz = os.sysconf("SC_CLK_TCK")
            assert abs(psutil.boot_time() + ticks / hz - psutil.Process(child.pid).create_time()) < 0.05
        finally:
            child.kill()
            child.wait(10)
    finally:
        shutil.rmtree(d, ignore_errors=True)

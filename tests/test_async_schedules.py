"""Schedules on the embedded queue: `every`/`schedule` in functions.toml; each tick runs exactly once however
many processes look at the clock (two Gunicorn workers and a `fnbox worker` here); missed ticks are skipped, or
the latest is caught up once; `fnbox schedules` lists the next runs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime

import pytest
import requests

from tests.asynckit import start_worker, stop_keeping_state, stop_worker, wait_for
from tests.conftest import REPO

TOKEN = "sched-test-token"
FNBOX = os.path.join(REPO, ".venv", "bin", "fnbox")
TICK = """
    def main(request):
        return {"method": request.method, "trigger": request.headers.get("X-Fnbox-Trigger"),
                "scheduled": request.headers.get("X-Fnbox-Scheduled-Time")}
"""


def _schedule_calls(server) -> list[dict]:
    r = server.request("GET", "/admin/queue?limit=1000", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text
    return [c for c in r.json()["calls"] if c["trigger"] == "schedule"]


def _ticks(server, function: str) -> list[float]:
    return sorted(c["scheduled_for"] for c in _schedule_calls(server) if c["function"] == function)


@pytest.mark.timeout(90)
def test_every_tick_runs_exactly_once_across_workers_and_a_worker_process(make_server):
    s = make_server(functions={"tick": TICK}, profiles={"functions.toml": '[tick]\nevery = "1s"\n'},
                    env={"FNBOX_ADMIN_TOKEN": TOKEN}, workers=2).start()
    worker = start_worker(s, "--concurrency", "1")
    try:
        wait_for(lambda: len(_ticks(s, "tick")) >= 6, 40, "six ticks")
    finally:
        stop_worker(worker)
    ticks = _ticks(s, "tick")
    assert len(ticks) == len(set(ticks)), f"a tick ran twice: {ticks}"
    assert all(t == int(t) for t in ticks)  # aligned on whole seconds, the same on every process
    # Three schedulers looked at the clock; each second between the first and the last tick ran once.
    assert ticks == [ticks[0] + i for i in range(len(ticks))], ticks
    done = [c for c in _schedule_calls(s) if c["status"] == "done"]
    assert done
    for c in done:
        seen = json.loads(c["result"]["body"])
        assert seen["method"] == "GET" and seen["trigger"] == "schedule"
        assert datetime.fromisoformat(seen["scheduled"]).timestamp() == c["scheduled_for"]
        assert c["caught_up"] is False
    # In the history with their trigger.
    hist = requests.get(f"{s.url}/admin/functions/tick/calls?limit=1000",
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()["calls"]
    assert {h["trigger"] for h in hist} == {"schedule"}
    assert len({h["request_id"] for h in hist}) == len(hist) >= len(done)


@pytest.mark.parametrize("catch_up", [False, True])
@pytest.mark.timeout(90)
def test_missed_ticks_are_skipped_or_caught_up_once(make_server, catch_up):
    toml = f'[tick]\nevery = "2s"\ncatch_up = {"true" if catch_up else "false"}\n'
    # A tick noticed more than 1 s late counts as missed (FNBOX_SCHEDULE_LATE_S): the test need not wait long.
    s = make_server(functions={"tick": TICK}, profiles={"functions.toml": toml},
                    env={"FNBOX_ADMIN_TOKEN": TOKEN, "FNBOX_SCHEDULE_LATE_S": "1"}).start()
    wait_for(lambda: _ticks(s, "tick"), 20, "a first tick")
    stop_keeping_state(s)
    stopped = time.time()
    wait_for(lambda: time.time() > stopped + 7, 10, "a downtime of three periods")
    restarted = time.time()
    s.start()
    wait_for(lambda: [t for t in _ticks(s, "tick") if t > restarted + 2], 30, "ticks after the restart")
    ticks = _ticks(s, "tick")
    assert len(ticks) == len(set(ticks)), ticks
    # Nothing ran between the stop and the restart: a tick of that window ran only if it was caught up.
    during = [t for t in ticks if stopped < t < restarted - 1]
    caught = [c for c in _schedule_calls(s) if c["caught_up"]]
    if catch_up:
        assert len(caught) == 1, caught
        assert stopped < caught[0]["scheduled_for"] < time.time()
        assert len(during) <= 1
    else:
        assert caught == [] and during == [], (caught, during)


def test_fnbox_schedules_lists_the_next_runs(make_server):
    toml = '[tick]\nevery = "30s"\n\n[morning]\nschedule = "0 7 * * *"\ntimezone = "Asia/Tokyo"\ncatch_up = true\n'
    s = make_server(functions={"tick": TICK, "morning": TICK}, profiles={"functions.toml": toml},
                    env={"FNBOX_ADMIN_TOKEN": TOKEN}).start()
    out = subprocess.run([FNBOX, "--url", s.url, "schedules"], env=dict(os.environ, FNBOX_ADMIN_TOKEN=TOKEN),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert set(lines) == {"morning", "tick"}
    assert "T07:00:00+09:00" in lines["morning"] and "Asia/Tokyo" in lines["morning"]
    assert "every 30s" in lines["tick"]


@pytest.mark.parametrize("table, reason", [
    ('every = "0.5s"', "every: must be a period"),
    ('schedule = "61 * * * *"', "schedule: must be a cron line"),
    ('schedule = "0 7 * * *"\ntimezone = "Mars/Olympus"', "timezone: must be an IANA time zone"),
    ('schedule = "0 7 * * *"\nevery = "1m"', "not both"),
    ("retries = -1", "retries: must be at least 0"),
    ('retry_backoff_s = "soon"', "retry_backoff_s: must be a number"),
])
def test_bad_schedule_keys_are_refused_with_file_key_and_reason(make_server, table, reason):
    s = make_server(functions={"tick": TICK}, profiles={"functions.toml": f"[tick]\n{table}\n"})
    s.start(wait=False)
    assert s.proc.wait(30) == 3
    log = s.read_log()
    assert "functions.toml" in log and reason in log, log

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

from jobs import scheduler
from runner.profiles import Profile
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


@pytest.mark.timeout(60)
def test_a_cron_schedule_with_seconds_fires_its_ticks(make_server):
    """A cron line (croniter, not `every`): six fields, the sixth the second, in a time zone. Each tick is a GET
    with X-Fnbox-Trigger: schedule and its time in that zone, recorded in the history as a schedule call."""
    toml = '[tick]\nschedule = "* * * * * */2"\ntimezone = "Asia/Tokyo"\n'
    s = make_server(functions={"tick": TICK}, profiles={"functions.toml": toml},
                    env={"FNBOX_ADMIN_TOKEN": TOKEN}).start()
    wait_for(lambda: len([c for c in _schedule_calls(s) if c["status"] == "done"]) >= 2, 30, "two ticks done")
    ticks = _ticks(s, "tick")
    assert len(ticks) == len(set(ticks)), ticks
    assert all(t == int(t) and int(t) % 2 == 0 for t in ticks), ticks  # the even seconds, as the line says
    assert ticks == [ticks[0] + 2 * i for i in range(len(ticks))], ticks
    done = [c for c in _schedule_calls(s) if c["status"] == "done"]
    for c in done:
        seen = json.loads(c["result"]["body"])
        assert seen["method"] == "GET" and seen["trigger"] == "schedule"
        assert seen["scheduled"].endswith("+09:00"), seen  # the schedule's time zone
        assert datetime.fromisoformat(seen["scheduled"]).timestamp() == c["scheduled_for"]
    hist = requests.get(f"{s.url}/admin/functions/tick/calls?limit=1000",
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()["calls"]
    assert {c["call_id"] for c in done} <= {h["request_id"] for h in hist}
    assert {h["trigger"] for h in hist} == {"schedule"}


def test_cron_ticks_due_are_the_latest_and_found_without_walking_the_gap():
    """due() of a cron line: the ticks in (last, now], at most MAX_TICKS of the latest even after a long outage
    (a day of a per-second line), as for `every`; a tick at exactly `now` is due, one at `last` is not."""
    p = Profile(schedule="* * * * * */2", timezone="Europe/Paris")
    now = 1_800_000_000.0  # an even second
    assert scheduler.due(p, now - 6, now) == [now - 4, now - 2, now]
    assert scheduler.due(p, now - 6, now + 1.5) == [now - 4, now - 2, now]
    assert scheduler.due(p, now, now + 1.9) == []
    day = scheduler.due(p, now - 86400, now)
    assert len(day) == scheduler.MAX_TICKS and day[-1] == now
    assert day == [now - 2 * (scheduler.MAX_TICKS - 1 - i) for i in range(scheduler.MAX_TICKS)]
    daily = Profile(schedule="0 7 * * *", timezone="Asia/Tokyo")  # 07:00 in Tokyo is 22:00 UTC
    start = datetime.fromisoformat("2027-01-01T00:00:00+09:00").timestamp()
    got = scheduler.due(daily, start, start + 3 * 86400)
    assert [datetime.fromtimestamp(t, scheduler._zone(daily)).isoformat() for t in got] == [
        "2027-01-01T07:00:00+09:00", "2027-01-02T07:00:00+09:00", "2027-01-03T07:00:00+09:00"]


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
    ('schedule = "0 7 * * * 0 2030"', "schedule: must be a cron line"),  # croniter's year field: not accepted
    ('schedule = "* * * * * 61"', "schedule: must be a cron line"),
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

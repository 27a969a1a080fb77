"""The sandbox attacks that apply to a warm instance, with `reuse_calls = 10` for every function: each must end the
same way as in a fresh process (tests/test_attacks.py), and leave nothing behind once the instance is over
(`idle_s` is short, so an instance that answered normally ends soon after)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from tests import test_attacks as attacks
from tests.conftest import Server
from tests.test_attacks import (
    ATTACK_LIMITS,
    ATTACKS,
    BY_NAME,
    HELLO_SRC,
    PROBE,
    SLEEPER,
    TOKEN,
    Attack,
    Ctx,
    run_attack,
)

# The attack suite's fixtures, around this module's own server (srv, below).
world, ctx, doctor = attacks.world, attacks.ctx, attacks.doctor

WHOAMI = "import os\ndef main(request):\n    return str(os.getpid())\n"
REUSE = {"reuse_calls": 10, "idle_s": 0.3}
# Time, memory, processes, daemons, threads left running, limits, signals, tracing, the environment.
APPLIES = ["busy_loop", "sleep_forever", "sigstop_self", "threads_after_return", "alloc_4g", "slow_leak",
           "grandchild_memory", "fork_bomb", "thread_bomb", "setsid_daemon", "environ_hunt", "raise_own_limits",
           "litter_outside_scratch", "kill_parent", "killpg_self", "signal_every_pid", "ptrace_parent",
           "clobber_every_fd"]


def _only_own_fds(ctx: Ctx, r: requests.Response) -> None:
    """A warm instance holds two fds of its own between calls: its control socket (4) and /dev/null (5). Nothing
    of the fork server, the gateway or another call."""
    doc = r.json()
    assert doc["fd3_is_pipe"] and set(doc["found"]) <= {4, 5}, doc


# The same attack, with the check that fits a warm instance.
INHERITED_FDS = Attack("inherited_fds", BY_NAME["inherited_fds"].src, 200, check=_only_own_fds)
ALL = {**{n: BY_NAME[n] for n in APPLIES}, "inherited_fds": INHERITED_FDS}


def functions_toml() -> str:
    def table(name: str, extra: dict[str, Any]) -> str:
        limits = {**ATTACK_LIMITS, **REUSE, **extra}
        return "\n".join([f"[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in limits.items())])

    tables = [table("probe", {}), table("whoami", {"idle_s": 60}), table("sleeper", {"timeout_s": 10}),
              *(table(a.name, a.limits) for a in ATTACKS)]
    tables.append('[environ_hunt.env]\nFNBOX_TEST_VAR = "visible"')
    return "\n\n".join(tables) + "\n"


@pytest.fixture(scope="module")
def srv(world: str) -> Any:
    functions = {"hello": HELLO_SRC, "probe": PROBE, "sleeper": SLEEPER, "whoami": WHOAMI,
                 **{a.name: a.src for a in ATTACKS}}
    s = Server(functions=functions, profiles={"functions.toml": functions_toml()},
               env={"FNBOX_ADMIN_TOKEN": TOKEN}, threads=32)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(ALL))
def test_attack_on_a_warm_instance(ctx, doctor, name):
    run_attack(ctx, doctor, ALL[name])
    if ALL[name].params is None:
        # Again: the second call runs in the instance the first left warm, if the attack left one. (Not the
        # attacks that leave a file in the test's world folder: the next call may have another uid.)
        run_attack(ctx, doctor, ALL[name])


def test_the_functions_of_this_server_run_warm(srv):
    """The attacks above really ran in warm instances: two calls answered from one process."""
    a, b = srv.get("/function/whoami").text, srv.get("/function/whoami").text
    assert a == b and a.isdigit(), (a, b)

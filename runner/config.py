"""Server settings: read from the environment once, validated in one place, frozen."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runner_env() -> dict[str, str]:
    """The whole environment of a process started to fork calls (a fork server, the zygote): no FNBOX_* variable
    and no secret; the settings follow over its socket."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": REPO_ROOT,
            "PYTHONDONTWRITEBYTECODE": "1"}
SLOT_REGISTRY = "/run/fnbox-slots"  # as root; see Settings.slot_registry
_CGROUP_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ConfigError(ValueError):
    """A bad FNBOX_* environment variable."""


def env_int(env: dict[str, str], key: str, default: int, minimum: int = 0) -> int:
    """An integer FNBOX_* variable (unset or empty: the default), or ConfigError saying which and why."""
    return _env_number(env, key, default, minimum, int, "an integer")


def env_float(env: dict[str, str], key: str, default: float, minimum: float = 0) -> float:
    """A number FNBOX_* variable (unset or empty: the default), or ConfigError saying which and why."""
    return _env_number(env, key, default, minimum, float, "a number")


def _env_number(env: dict[str, str], key: str, default: Any, minimum: Any, kind: type, what: str) -> Any:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: must be {what}") from None
    if value < minimum:
        raise ConfigError(f"{key}={raw!r}: must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class Settings:
    functions_dir: str
    profiles_dir: str
    # This server's own locks (max_concurrency, FNBOX_MAX_CALLS places) and runtime files.
    state_dir: str
    scratch_dir: str
    # The machine-wide sandbox slot registry: one lock file per slot uid, shared by every fnbox server of the
    # machine whatever its FNBOX_STATE_DIR, so two servers whose uid ranges overlap never run two calls as one
    # uid (nor kill each other's calls when they sweep or reuse a slot). Fixed on purpose: not configurable.
    slot_registry: str
    # The cgroup (relative to the server's own, in every controller) under which the slot cgroups
    # `slot-<uid>` are made. Two servers may use different parents; slots are still claimed by uid.
    cgroup_parent: str
    uid_base: int  # sandbox slot i runs as uid/gid uid_base + i (only when the server runs as root)
    slots: int  # size of the machine-wide sandbox slot pool (uids and cgroups)
    python: str  # the interpreter the fork server runs on: the venv's real binary, never a shim
    data_dir: str  # persistent: deployed versions and the call history database
    history_max_rows: int
    history_max_age_days: int
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (nginx on this host), as Gunicorn's own
    # forwarded_allow_ips: a function behind nginx sees the real client in request.remote_addr.
    forwarded_allow_ips: frozenset[str]
    workers: int
    threads: int
    max_calls: int  # 0: derived from memory and threads, see max_calls_for()
    spares: int  # children each fork server keeps forked ahead of demand (0: fork on demand only)
    # glibc malloc arenas a Gunicorn worker's threads share (FNBOX_MALLOC_ARENA_MAX; 0: glibc's default of 8 per
    # core). Each arena keeps what its threads freed, so fewer arenas hold less memory after load.
    malloc_arena_max: int = 2
    # Host folders every call sees read-write at their own path inside its file system view
    # (FNBOX_SANDBOX_SHARED_DIRS, colon-separated): a deliberate exchange folder; the test suite's markers.
    shared_dirs: tuple[str, ...] = ()
    # Sandbox v2 layers turned off on purpose (FNBOX_SANDBOX_OFF, comma-separated): only for the benchmark's
    # with/without comparison and for debugging; every layer named here is reported DEGRADED, never active.
    sandbox_off: frozenset[str] = frozenset()
    # The fork server forks call processes without CPython's after-fork hooks while it is single-threaded
    # (runner/rawfork.py; FNBOX_RAW_FORK=0: always os.fork()). Only a switch to compare or rule it out.
    raw_fork: bool = True
    # The Gunicorn master starts one zygote that forks every worker's fork server, so they share its warm
    # image (runner/zygote.py; FNBOX_ZYGOTE=0: each worker starts its own fork server from scratch).
    zygote: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        root = os.geteuid() == 0
        state_default = "/run/fnbox" if root else f"/tmp/fnbox-{os.geteuid()}"
        state = os.path.abspath(env.get("FNBOX_STATE_DIR") or state_default)
        scratch_default = "/var/tmp/fnbox-scratch" if root else f"/tmp/fnbox-scratch-{os.geteuid()}"
        return cls(
            functions_dir=os.path.abspath(env.get("FNBOX_FUNCTIONS_DIR") or os.path.join(REPO_ROOT, "functions")),
            profiles_dir=os.path.abspath(
                env.get("FNBOX_PROFILES_DIR") or os.path.join(REPO_ROOT, "sandbox_profiles")
            ),
            state_dir=state,
            scratch_dir=os.path.abspath(env.get("FNBOX_SCRATCH_DIR") or scratch_default),
            slot_registry=SLOT_REGISTRY if root else f"/tmp/fnbox-slots-{os.geteuid()}",
            cgroup_parent=_cgroup_parent(env.get("FNBOX_CGROUP_PARENT") or "fnbox"),
            uid_base=env_int(env, "FNBOX_UID_BASE", 61000, minimum=1000),
            slots=env_int(env, "FNBOX_SANDBOX_SLOTS", 256, minimum=1),
            python=env.get("FNBOX_PYTHON") or _real_python(),
            data_dir=os.path.abspath(env.get("FNBOX_DATA_DIR") or os.path.join(REPO_ROOT, "var")),
            history_max_rows=env_int(env, "FNBOX_HISTORY_MAX_ROWS", 100_000, minimum=1),
            history_max_age_days=env_int(env, "FNBOX_HISTORY_MAX_AGE_DAYS", 30, minimum=1),
            workers=env_int(env, "FNBOX_WORKERS", 2, minimum=1),
            threads=env_int(env, "FNBOX_THREADS", 32, minimum=1),
            max_calls=env_int(env, "FNBOX_MAX_CALLS", 0, minimum=0),
            spares=env_int(env, "FNBOX_SPARES", 1, minimum=0),
            malloc_arena_max=env_int(env, "FNBOX_MALLOC_ARENA_MAX", 2, minimum=0),
            shared_dirs=_dirs(env, "FNBOX_SANDBOX_SHARED_DIRS"),
            sandbox_off=_layers_off(env.get("FNBOX_SANDBOX_OFF") or ""),
            raw_fork=env_int(env, "FNBOX_RAW_FORK", 1, minimum=0) != 0,
            zygote=env_int(env, "FNBOX_ZYGOTE", 1, minimum=0) != 0,
            forwarded_allow_ips=frozenset(
                ip.strip() for ip in env.get("FNBOX_FORWARDED_ALLOW_IPS", "127.0.0.1,::1").split(",") if ip.strip()
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """For the fork server, which gets its settings from its worker over the control socket and never
        reads the environment itself (one source of truth: what the worker validated)."""
        d = dataclasses.asdict(self)
        d["forwarded_allow_ips"] = sorted(self.forwarded_allow_ips)
        d["sandbox_off"] = sorted(self.sandbox_off)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        return cls(**dict(d, forwarded_allow_ips=frozenset(d["forwarded_allow_ips"]),
                          shared_dirs=tuple(d.get("shared_dirs", ())),
                          sandbox_off=frozenset(d.get("sandbox_off", ()))))


# The layers FNBOX_SANDBOX_OFF may name: the ones added by the second sandbox (the benchmark compares with them
# off); uids, cgroup memory/pids and the network namespace are never optional.
OPTIONAL_LAYERS = frozenset({"file_system_view", "syscall_filter", "cpu_cgroup", "network_egress"})


def _layers_off(raw: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    if names - OPTIONAL_LAYERS:
        raise ConfigError(f"FNBOX_SANDBOX_OFF={raw!r}: unknown layer(s) {sorted(names - OPTIONAL_LAYERS)}; "
                          f"choose from {sorted(OPTIONAL_LAYERS)}")
    return names


def _cgroup_parent(raw: str) -> str:
    parts = raw.strip("/").split("/")
    if not all(p and p not in (".", "..") and _CGROUP_NAME.match(p) for p in parts):
        raise ConfigError(f"FNBOX_CGROUP_PARENT={raw!r}: must be a relative cgroup path of names made of "
                          "letters, digits, '.', '_' and '-'")
    return "/".join(parts)


def _dirs(env: dict[str, str], key: str) -> tuple[str, ...]:
    raw = env.get(key) or ""
    out = []
    for d in filter(None, raw.split(":")):
        if not os.path.isabs(d) or not os.path.isdir(d) or os.path.realpath(d) in ("/", "/tmp"):
            raise ConfigError(f"{key}: {d!r} must be an existing absolute folder (not / or /tmp)")
        out.append(os.path.realpath(d))
    return tuple(out)


def _real_python() -> str:
    """The venv's interpreter path: sys.executable inside the venv resolves the venv (site-packages) and is a
    symlink to the real binary, so starting it costs no shim."""
    import sys

    return sys.executable


def max_calls_for(settings: Settings, default_memory_mb: int) -> int:
    """The global cap on calls in flight (all workers). FNBOX_MAX_CALLS wins; otherwise the smaller of:
    - what memory allows: three quarters of RAM divided by the default profile's memory_mb;
    - what threads allow: every call holds a request thread, so the cap stays below workers x threads, leaving
      threads free to answer /healthz and fast 503s instead of letting requests queue behind slow calls.
    """
    if settings.max_calls:
        return settings.max_calls
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    by_memory = int(ram * 0.75 // (default_memory_mb * 1024 * 1024))
    threads = settings.workers * settings.threads
    by_threads = threads - max(settings.workers, threads // 8)
    return max(1, min(by_memory, by_threads))

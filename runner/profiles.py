"""Sandbox profiles: per-function limits, loaded from TOML, validated in one place, reloaded on change.

Layout of the profiles folder:
  default.toml     every key (the base of every other profile)
  <name>.toml      a named profile; keys it leaves out come from default.toml
  functions.toml   one table per function: `profile = "<name>"` plus keys overriding it for that function

`python -m runner.profiles check [--profiles DIR] [--functions DIR]` validates and prints the effective limits.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from runner.preload import preload_names

DEFAULT_FILE = "default.toml"
FUNCTIONS_FILE = "functions.toml"


class ProfileError(ValueError):
    """An invalid profile file: says which file, which key and why."""

    def __init__(self, path: str, key: str | None, reason: str) -> None:
        self.path, self.key, self.reason = path, key, reason
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)


@dataclass(frozen=True)
class Profile:
    """The effective limits of one call. Field docs are the operator's reference (docs/operators.md)."""

    timeout_s: float = 10.0  # wall clock for the whole call
    cpu_s: float = 10.0  # CPU seconds of the call's main process (RLIMIT_CPU)
    memory_mb: int = 128  # peak RSS of the call's process tree; also the kernel cgroup limit
    max_processes: int = 16  # processes and threads of the call at once
    max_file_mb: int = 16  # largest file the call may write (RLIMIT_FSIZE)
    max_disk_mb: int = 64  # everything the call writes (its /tmp tmpfs, RAM charged to memory_mb); ENOSPC past it
    max_request_kb: int = 1024  # request body; more is 413 request_too_large
    max_response_kb: int = 4096  # response body; more is 502 output_limit
    max_log_kb: int = 64  # captured stdout/stderr kept; the rest is dropped and counted
    network: bool = False  # False: an empty network namespace (no route anywhere, not even loopback)
    max_concurrency: int = 8  # calls of this function in flight; more is 503 busy
    traceback: bool = False  # include the (user-frames) traceback in function_error bodies
    entry_point: str = "main"  # the module's function a call runs, as Cloud Functions' --entry-point
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Performance (runner/preload.py, runner/instances.py; docs/operators.md and docs/functions.md).
    preload: tuple[str, ...] = ()  # installed modules the fork server imports before forking this profile's calls
    reuse_calls: int = 1  # calls one warm process may serve (1: a fresh process per call)
    idle_s: float = 60.0  # a warm process with no call for this long is ended
    profile: str = "default"  # which named profile this came from (informational)
    # Queued calls (async and scheduled, see docs/cluster.md): attempts after the first, for calls ending in
    # timeout/crashed/memory_limit/unavailable, the n-th retry waiting retry_backoff_s * 2**(n-1) seconds.
    retries: int = 0
    retry_backoff_s: float = 2.0
    # A schedule (functions.toml tables only): a cron line in `timezone`, or a period in seconds ("30s" there).
    schedule: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    catch_up: bool = False  # a tick missed while every board was down runs once when one is back

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["env"] = dict(self.env)
        d["preload"] = list(self.preload)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        d = dict(d)
        d["env"] = MappingProxyType(dict(d.get("env", {})))
        d["preload"] = tuple(d.get("preload", ()))
        return cls(**d)


# key -> (accepted types, minimum). bool is checked before int because bool is an int in Python.
_NUMERIC: dict[str, tuple[tuple[type, ...], float]] = {
    "timeout_s": ((int, float), 0.001),
    "cpu_s": ((int, float), 0.001),
    "memory_mb": ((int,), 16),
    "max_processes": ((int,), 1),
    "max_file_mb": ((int,), 0),
    "max_disk_mb": ((int,), 1),
    "max_request_kb": ((int,), 0),
    "max_response_kb": ((int,), 0),
    "max_log_kb": ((int,), 0),
    "max_concurrency": ((int,), 1),
    "retries": ((int,), 0),
    "retry_backoff_s": ((int, float), 0),
    "reuse_calls": ((int,), 1),
    "idle_s": ((int, float), 0.001),
}
_BOOLS = ("network", "traceback", "catch_up")
# Keys that describe when a function runs, not how: only in a function's own table of functions.toml.
SCHEDULE_KEYS = frozenset({"schedule", "every", "timezone", "catch_up"})
PROFILE_KEYS = (frozenset(_NUMERIC) | frozenset(_BOOLS) | {"env", "entry_point", "preload"}) - SCHEDULE_KEYS
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_EVERY_S = 1.0


def parse_every(value: Any) -> float:
    """ "30s", "5m", "2h", "1d" (or a number of seconds) -> seconds; ValueError if it is none of these."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and len(value) > 1 and value[-1] in _UNITS:
        seconds = float(value[:-1]) * _UNITS[value[-1]]
    else:
        raise ValueError(value)
    if not math.isfinite(seconds) or seconds < MIN_EVERY_S:
        raise ValueError(value)
    return seconds


def _check_schedule_value(path: str, key: str, value: Any) -> Any:
    if key == "every":
        try:
            return parse_every(value)
        except ValueError:
            raise ProfileError(path, key, f'must be a period such as "30s", "5m", "2h" or "1d" (at least '
                                          f'{MIN_EVERY_S:g} s), not {value!r}') from None
    if key == "schedule":
        from croniter import croniter

        # Five fields (minute hour day month weekday), or six with the second last ("* * * * * */15": every 15 s,
        # croniter's order); croniter's seventh field (the year) is not accepted. Keywords such as "@daily" are.
        fields = value.split() if isinstance(value, str) else []
        if not (len(fields) in (5, 6) or (len(fields) == 1 and fields[0].startswith("@"))) \
                or not croniter.is_valid(value):
            raise ProfileError(path, key, f'must be a cron line such as "0 7 * * *" (five fields, or six with the '
                                          f'seconds last: "* * * * * */15"), not {value!r}')
        return value
    if key == "timezone":
        import zoneinfo

        try:
            if not isinstance(value, str) or not value:
                raise ValueError(value)
            zoneinfo.ZoneInfo(value)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            raise ProfileError(path, key, f'must be an IANA time zone such as "Europe/Paris", not {value!r}') \
                from None
        return value
    if not isinstance(value, bool):
        raise ProfileError(path, key, f"must be true or false, not {value!r}")
    return value
# Environment variables the sandbox always sets itself; a profile may not override them.
RESERVED_ENV = frozenset({"PATH", "HOME", "TMPDIR", "LANG", "PWD"})


def _check_value(path: str, key: str, value: Any) -> Any:
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise ProfileError(path, key, f"must be true or false, not {value!r}")
        return value
    if key == "entry_point":
        if not isinstance(value, str) or not value.isidentifier():
            raise ProfileError(path, key, f"must be the name of a function in the module, not {value!r}")
        return value
    if key == "env":
        if not isinstance(value, dict):
            raise ProfileError(path, key, "must be a table of strings")
        for k, v in value.items():
            if not isinstance(v, str):
                raise ProfileError(path, f"env.{k}", f"must be a string, not {type(v).__name__}")
            if k in RESERVED_ENV or "=" in k or not k:
                raise ProfileError(path, f"env.{k}", "is reserved or not a valid variable name")
        return MappingProxyType(dict(value))
    if key == "preload":
        try:
            return preload_names(value)
        except ValueError as e:
            raise ProfileError(path, key, str(e)) from None
    types, minimum = _NUMERIC[key]
    if isinstance(value, bool) or not isinstance(value, types):
        kind = "an integer" if types == (int,) else "a number"
        raise ProfileError(path, key, f"must be {kind}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(path, key, "must be finite")
    if value < minimum:
        raise ProfileError(path, key, f"must be at least {minimum}, not {value!r}")
    return value


def _check_table(path: str, table: Mapping[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if key not in allowed:
            raise ProfileError(path, key, f"unknown key (known: {', '.join(sorted(allowed))})")
        if key == "profile":
            out[key] = value
        elif key in SCHEDULE_KEYS:
            out[key] = _check_schedule_value(path, key, value)
        else:
            out[key] = _check_value(path, key, value)
    if "schedule" in out and "every" in out:
        raise ProfileError(path, "every", "a function has either `schedule` or `every`, not both")
    return out


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(path, None, f"TOML syntax error: {e}") from None
    except OSError as e:
        raise ProfileError(path, None, f"cannot read: {e.strerror}") from None


@dataclass(frozen=True)
class ProfileSet:
    """One validated, consistent snapshot of the whole profiles folder."""

    profiles: Mapping[str, Profile]
    overrides: Mapping[str, Mapping[str, Any]]
    # The snapshot never changes: each function's Profile is built once (the gateway asks on every call).
    _resolved: dict[str, Profile] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def for_function(self, name: str) -> Profile:
        done = self._resolved.get(name)
        if done is not None:
            return done
        over = self.overrides.get(name, {})
        base = self.profiles[over.get("profile", "default")]
        extra = {k: v for k, v in over.items() if k != "profile"}
        profile = dataclasses.replace(base, **extra) if extra else base
        if len(self._resolved) < 4096:  # names that are not functions are asked too (a 404 each)
            self._resolved[name] = profile
        return profile

    def scheduled(self) -> dict[str, Profile]:
        """Every function whose table in functions.toml has a `schedule` or an `every`."""
        return {name: self.for_function(name) for name, over in self.overrides.items()
                if "schedule" in over or "every" in over}


def load_profiles(directory: str) -> ProfileSet:
    """Reads and validates every file of the folder; raises ProfileError on the first problem."""
    default_path = os.path.join(directory, DEFAULT_FILE)
    raw_default = _check_table(default_path, _read_toml(default_path), PROFILE_KEYS)
    default = dataclasses.replace(Profile(), **raw_default)
    profiles: dict[str, Profile] = {"default": default}
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise ProfileError(directory, None, f"cannot list: {e.strerror}") from None
    for fname in names:
        if not fname.endswith(".toml") or fname in (DEFAULT_FILE, FUNCTIONS_FILE):
            continue
        path = os.path.join(directory, fname)
        pname = fname[: -len(".toml")]
        raw = _check_table(path, _read_toml(path), PROFILE_KEYS)
        profiles[pname] = dataclasses.replace(default, profile=pname, **raw)
    overrides: dict[str, Mapping[str, Any]] = {}
    fpath = os.path.join(directory, FUNCTIONS_FILE)
    if os.path.exists(fpath):
        for fname, table in _read_toml(fpath).items():
            if not isinstance(table, dict):
                raise ProfileError(fpath, fname, "must be a table, e.g. [hello]")
            checked = _check_table(fpath, table, PROFILE_KEYS | SCHEDULE_KEYS | {"profile"})
            pname = checked.get("profile", "default")
            if not isinstance(pname, str) or pname not in profiles:
                raise ProfileError(fpath, f"{fname}.profile", f"unknown profile {pname!r}")
            overrides[fname] = MappingProxyType(checked)
    return ProfileSet(MappingProxyType(profiles), MappingProxyType(overrides))


class ProfileStore:
    """Serves the last good ProfileSet, reloading when any file of the folder changes.

    A change is seen by stat()ing the folder and the files it had (a handful of syscalls per call), so an
    edit takes effect on the next call. A bad edit keeps the last good set and is reported in `error`.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self._lock = threading.Lock()
        self._listed: tuple[tuple, list[str]] | None = None
        self._stamp = self._fingerprint()
        self._current = load_profiles(self.directory)  # raises: the server refuses to start
        self.error: str | None = None

    def _fingerprint(self) -> tuple:
        """The folder's and its .toml files' identities. The names are listed again only when the folder's
        mtime changes (adding, removing or renaming a file changes it; an in-place edit changes the file's)."""
        stamps = []
        try:
            st = os.stat(self.directory)
            dir_stamp = (self.directory, st.st_mtime_ns, st.st_ino)
            stamps.append(dir_stamp)
            listed = self._listed
            if listed is None or listed[0] != dir_stamp:
                listed = self._listed = (dir_stamp, [n for n in sorted(os.listdir(self.directory))
                                                     if n.endswith(".toml")])
            for name in listed[1]:
                st = os.stat(os.path.join(self.directory, name))
                stamps.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            self._listed = None
            stamps.append(("error",))
        return tuple(stamps)

    def current(self) -> ProfileSet:
        stamp = self._fingerprint()
        if stamp == self._stamp:
            return self._current
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._current = load_profiles(self.directory)
                    self.error = None
                except ProfileError as e:
                    if self.error != str(e):
                        print(f"fnbox: profiles: keeping the last good configuration: {e}", file=sys.stderr)
                    self.error = str(e)
                self._stamp = stamp
        return self._current

    def for_function(self, name: str) -> Profile:
        return self.current().for_function(name)


def function_names(functions_dir: str) -> list[str]:
    names = set()
    try:
        entries = os.listdir(functions_dir)
    except OSError:
        return []
    for entry in entries:
        base = entry[:-3] if entry.endswith(".py") else entry
        if base.isidentifier() and not base.startswith("_"):
            if entry.endswith(".py") or os.path.isfile(os.path.join(functions_dir, entry, "__init__.py")):
                names.add(base)
    return sorted(names)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def effective_table(pset: ProfileSet, names: list[str]) -> str:
    cols = ["timeout_s", "cpu_s", "memory_mb", "max_processes", "max_file_mb", "max_disk_mb", "max_request_kb",
            "max_response_kb", "max_log_kb", "network", "max_concurrency", "traceback", "entry_point"]
    rows = [["function", "profile", *cols, "env"]]
    for name in names:
        p = pset.for_function(name)
        rows.append([name, p.profile, *(str(getattr(p, c)).lower() if isinstance(getattr(p, c), bool)
                                        else str(getattr(p, c)) for c in cols), ",".join(sorted(p.env)) or "-"])
    return _table(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m runner.profiles")
    ap.add_argument("command", choices=["check"])
    ap.add_argument("--profiles", default=os.environ.get("FNBOX_PROFILES_DIR", "sandbox_profiles"))
    ap.add_argument("--functions", default=os.environ.get("FNBOX_FUNCTIONS_DIR", "functions"))
    args = ap.parse_args(argv)
    try:
        pset = load_profiles(args.profiles)
    except ProfileError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    names = sorted(set(function_names(args.functions)) | set(pset.overrides))
    print(effective_table(pset, names or ["(default)"]))
    print(f"ok: {len(pset.profiles)} profiles, {len(pset.overrides)} function overrides")
    return 0


if __name__ == "__main__":
    sys.exit(main())

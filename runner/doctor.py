"""`python -m runner.doctor [--strict] [--json]`: which sandbox layers are active on this machine, and whether a
sandbox uid can read what a call needs (the Python runtime, the venv, the functions folder) and cannot read
what it must not (the profiles folder, whose [env] tables may hold secrets).

The readability checks are real: a forked child drops to the first slot's uid (as the fork server's children
do) and tries to list and open the files. Exit status 0; with --strict, 1 when anything is DEGRADED.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from runner.config import ConfigError, Settings
from runner.sandbox import probe_layers

ACTIVE, DEGRADED = "active", "DEGRADED"
MAX_FILES = 200  # of the functions folder; enough to find a permission problem, bounded on a huge folder


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ACTIVE or DEGRADED
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == ACTIVE


def layer_checks(settings: Settings) -> list[Check]:
    out = []
    for name, text in probe_layers(settings).describe().items():
        status, _, detail = text.partition(": ")
        out.append(Check(name, ACTIVE if status == "active" else DEGRADED, detail))
    return out


def runtime_paths(python: str) -> dict[str, str]:
    """The stdlib, extension-module and site-packages folders of the interpreter the fork server runs on."""
    code = ("import json, sys, sysconfig; p = sysconfig.get_paths(); print(json.dumps({'stdlib': p['stdlib'], "
            "'platstdlib': p['platstdlib'], 'purelib': p['purelib'], 'prefix': sys.prefix, "
            "'base_prefix': sys.base_prefix, 'executable': sys.executable}))")
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def _files(directory: str, suffixes: tuple[str, ...], limit: int) -> list[str]:
    """A few files of a folder (top level first, then one level down), for the open() test."""
    found: list[str] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return found
    for e in entries:
        if e.is_file() and e.name.endswith(suffixes):
            found.append(e.path)
    for e in entries:
        if len(found) >= limit:
            break
        if e.is_dir(follow_symlinks=False) and not e.name.startswith((".", "__pycache__")):
            init = os.path.join(e.path, "__init__.py")
            if os.path.isfile(init):
                found.append(init)
    return found[:limit]


def _targets(settings: Settings, paths: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """(kind, path) lists per check; kind is "dir" (listed), "file" (opened and read) or "exec" (X_OK)."""
    stdlib, dynload, purelib = paths["stdlib"], os.path.join(paths["platstdlib"], "lib-dynload"), paths["purelib"]
    runtime = [("exec", os.path.realpath(paths["executable"])), ("dir", stdlib),
               ("file", os.path.join(stdlib, "os.py")),
               *(("file", f) for f in _files(stdlib, (".py",), 3)),
               *(("file", f) for f in _files(dynload, (".so",), 3))]
    if os.path.isdir(dynload):
        runtime.append(("dir", dynload))
    venv = [("dir", purelib), *(("file", f) for f in _files(os.path.join(purelib, "flask"), (".py",), 3))]
    functions = [("dir", settings.functions_dir),
                 *(("file", f) for f in _files(settings.functions_dir, (".py",), MAX_FILES))]
    profiles = [("dir", settings.profiles_dir),
                *(("file", os.path.join(settings.profiles_dir, n)) for n in ("default.toml", "functions.toml")
                  if os.path.exists(os.path.join(settings.profiles_dir, n)))]
    return {"runtime": runtime, "venv": venv, "functions": functions, "profiles": profiles}


def _try(kind: str, path: str) -> str | None:
    """None when the access works, else the reason."""
    try:
        if kind == "dir":
            os.listdir(path)
        elif kind == "exec":
            if not os.access(path, os.X_OK):
                return "not executable"
        else:
            with open(path, "rb") as f:
                f.read(1)
        return None
    except OSError as e:
        return e.strerror or type(e).__name__


def access_as(uid: int | None, targets: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
    """Failures per check ([(path, reason)]), tried as `uid` in a forked child (None: as this process)."""
    if uid is None:
        return {name: [(p, r) for k, p in items if (r := _try(k, p))] for name, items in targets.items()}
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            result = {name: [(p, r) for k, p in items if (r := _try(k, p))] for name, items in targets.items()}
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(wfd, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 65536):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the access check as uid {uid} failed")
    return {k: [tuple(x) for x in v] for k, v in json.loads(b"".join(chunks)).items()}


def access_checks(settings: Settings) -> list[Check]:
    root = os.geteuid() == 0
    uid = settings.uid_base if root else None
    who = f"uid {uid}" if root else f"uid {os.geteuid()} (not root: calls run as the server's uid)"
    try:
        paths = runtime_paths(settings.python)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return [Check("runtime_readable", DEGRADED, f"cannot start {settings.python}: {e}")]
    targets = _targets(settings, paths)
    failed = access_as(uid, targets)

    def reading(name: str, what: str) -> Check:
        bad = failed[name]
        if not bad:
            return Check(f"{name}_readable", ACTIVE, f"{what} readable by {who}")
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return Check(f"{name}_readable", DEGRADED, f"{who} cannot read {path}: {reason}{more}; calls will fail "
                     "(as root, ops/setup-system.sh grants traverse permission on private parent folders)")

    checks = [reading("runtime", paths["base_prefix"]), reading("venv", paths["purelib"]),
              reading("functions", f"{settings.functions_dir} ({len(targets['functions']) - 1} files)")]
    # Inverted: here a path the sandbox uid CAN open is the problem.
    denied = {p for p, _ in failed["profiles"]}
    readable = [p for _, p in targets["profiles"] if p not in denied]
    if readable:
        checks.append(Check("profiles_private", DEGRADED, f"{who} can read {readable[0]} ([env] tables may hold "
                                                          f"secrets): chmod 0700 {settings.profiles_dir}"))
    else:
        checks.append(Check("profiles_private", ACTIVE, f"{settings.profiles_dir} is not readable by {who}"))
    return checks


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runner.doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--strict", action="store_true", help="exit 1 when any layer or check is DEGRADED")
    ap.add_argument("--json", action="store_true", help="print {name: {status, detail}} as JSON")
    args = ap.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        print(f"doctor: {e}", file=sys.stderr)
        return 2
    checks = layer_checks(settings) + access_checks(settings)
    degraded = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps({c.name: {"status": c.status, "detail": c.detail} for c in checks}, indent=2))
    else:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}, not root"
        last = settings.uid_base + settings.slots - 1
        print(f"fnbox sandbox layers ({who}; sandbox uids {settings.uid_base}..{last})")
        print(_table([["layer", "status", "detail"], *([c.name, c.status, c.detail] for c in checks)]))
        print(f"{len(degraded)} degraded" if degraded else "every layer is active")
    return 1 if args.strict and degraded else 0


if __name__ == "__main__":
    sys.exit(main())

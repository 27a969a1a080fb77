"""Preloaded modules: the fork server imports installed libraries once, so calls inherit them already imported.

This is the SOCK paper's zygote package cache, in fnbox's shape: one fork server per Gunicorn worker forks
every call, so *it* imports the modules that profiles name in `preload = [...]`; a call's `import requests`
then finds `requests` in `sys.modules` and costs nothing (its pages are shared copy-on-write).

- At start, the worker's Supervisor sends the union of every profile's list; when a profile is edited to add a
  module (hot reload), the first call of that profile sends the new names just before its spawn message, so
  that call is already forked with them. A module dropped from every list stays imported until the fork server
  restarts (restart the server to drop it).
- Only installed libraries: a module whose file is not in the interpreter's standard library or the venv's
  site-packages (the project's own packages, anything under the functions folder) is refused, and so is a module
  that starts a thread while importing (a process that forks must stay single-threaded). Each name is first
  imported in a throwaway child, with a time bound, so a failing, hanging or crashing import never hurts the
  fork server; only then is it imported for real.
- A module that fails is reported in the log and in /healthz (`preload`), and calls import it themselves.
"""

from __future__ import annotations

import gc
import importlib
import keyword
import os
import select
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

TRIAL_TIMEOUT = 30.0  # seconds a trial import may take before the module is refused
# Names that resolve to this project's own code on the fork server's sys.path (the repo root), never a library.
PROJECT_PACKAGES = frozenset({"functions", "runner", "gateway", "cli", "tests", "bench", "ops", "__main__"})
MAX_MODULES = 64

OK = "ok"
PENDING = "pending"


def preload_names(value: Any) -> tuple[str, ...]:
    """Validates a profile's `preload` value; raises ValueError with the reason (the caller adds file and key)."""
    if not isinstance(value, list):
        raise ValueError(f"must be a list of module names, e.g. [\"requests\"], not {value!r}")
    if len(value) > MAX_MODULES:
        raise ValueError(f"at most {MAX_MODULES} modules")
    out: list[str] = []
    for name in value:
        if not isinstance(name, str):
            raise ValueError(f"{name!r} is not a string")
        parts = name.split(".")
        if not name or not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
            raise ValueError(f"{name!r} is not a module name (dotted identifiers, e.g. \"requests\" or "
                             "\"email.mime.text\")")
        if parts[0] in PROJECT_PACKAGES:
            raise ValueError(f"{name!r} is fnbox's or the functions' own code: only installed libraries can be "
                             "preloaded, never a function")
        if name not in out:
            out.append(name)
    return tuple(out)


def union(pset: Any) -> tuple[str, ...]:
    """Every module any profile or function override of a ProfileSet preloads, in a stable order."""
    seen: dict[str, None] = {}
    for p in pset.profiles.values():
        seen.update(dict.fromkeys(p.preload))
    for over in pset.overrides.values():
        seen.update(dict.fromkeys(over.get("preload", ())))
    return tuple(seen)


# -- in the fork server ------------------------------------------------------------------------------------------
_results: dict[str, str] = {}  # module -> OK or "failed: ..."; this fork server's imports, never retried


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(r + os.sep for r in roots)


def _foreign_modules(before: set[str], roots: tuple[str, ...]) -> Iterator[str]:
    """Modules imported since `before` whose file lies outside the standard library and site-packages."""
    main = sys.modules.get("__main__")
    for name in set(sys.modules) - before:
        module = sys.modules.get(name)
        if module is main:  # an alias of the fork server itself (multiprocessing's __mp_main__, which boto3 loads)
            continue
        path = getattr(module, "__file__", None)
        if path and not os.path.realpath(path).startswith(roots):
            yield f"{name} ({path})"


def _trial(name: str) -> str:
    """Imports `name` in a throwaway child and returns "" if the fork server may import it, else why not."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the trial child: never returns
        code = 0
        try:
            os.close(r)
            signal.set_wakeup_fd(-1)
            before = set(sys.modules)
            reason = ""
            try:
                importlib.import_module(name)
            except BaseException as e:
                reason = f"{type(e).__name__}: {e}"
            if not reason:
                foreign = sorted(_foreign_modules(before, _library_roots()))
                threads = len(os.listdir("/proc/self/task"))
                if threads > 1:
                    reason = f"it starts {threads - 1} thread(s) while importing; a forking parent must not"
                elif foreign:
                    reason = ("not an installed library: " + ", ".join(foreign[:3]) + " is outside the standard "
                              "library and site-packages")
            os.write(w, (reason or "-").encode()[:4000])
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    reason, deadline = b"", time.monotonic() + TRIAL_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                reason = f"importing took longer than {TRIAL_TIMEOUT:g} s".encode()
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break
            reason += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if not reason:
        return f"the import crashed its process ({_status(status)})"
    return "" if reason == b"-" else reason.decode(errors="replace")


def _status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def import_modules(names: Iterable[str]) -> tuple[dict[str, str], bool]:
    """Imports each name not tried yet into this process. Returns every asked name's result and whether
    anything new was imported."""
    imported = False
    for name in names:
        if name in _results:
            continue
        t0 = time.monotonic()
        reason = _trial(name)
        if not reason:
            try:
                importlib.import_module(name)
            except BaseException as e:  # the trial passed: only a nondeterministic import gets here
                reason = f"{type(e).__name__}: {e}"
        if reason:
            _results[name] = f"failed: {reason}"
            print(f"fnbox: preload {name!r} failed ({reason}); calls import it themselves", file=sys.stderr)
        else:
            _results[name] = OK
            imported = True
            print(f"fnbox: preloaded {name!r} in {(time.monotonic() - t0) * 1000:.0f} ms", file=sys.stderr)
    return {n: _results.get(n, PENDING) for n in names}, imported


def handle(server: Any, msg: dict[str, Any]) -> None:
    """The fork server's "preload" control message: import, then make every later fork inherit the modules."""
    names = [n for n in msg.get("modules", []) if isinstance(n, str)]
    try:
        names = list(preload_names(names))
    except ValueError as e:  # the gateway validated them already; never import an unchecked name
        server._send({"op": "preloaded", "id": msg.get("id"), "results": {n: f"failed: {e}" for n in names}})
        return
    results, imported = import_modules(names)
    if imported:
        gc.collect()
        gc.freeze()  # as at start: children never copy the new objects' GC headers
        from runner.sandbox import data_usage

        server.data_base = data_usage()  # a call's RLIMIT_DATA is what it inherits plus memory_mb
        while server.spares:  # forked before the import: they would not have the modules
            server._drop_spare(server.spares.pop())
    server._send({"op": "preloaded", "id": msg.get("id"), "results": results})


# -- in the gateway worker ---------------------------------------------------------------------------------------
class PreloadTracker:
    """The Supervisor's side: which modules its current fork server was asked to import, and how that went."""

    def __init__(self, modules: Callable[[], Iterable[str]] | None = None) -> None:
        self._modules = modules
        self._lock = threading.Lock()
        self._fs: Any = None
        self._sent: set[str] = set()
        self.status: dict[str, str] = {}

    def started(self, fs: Any, ids: Iterator[int]) -> None:
        """A new fork server: it imports the union of every profile's modules before its first call."""
        with self._lock:
            self._fs, self._sent = fs, set()
        try:
            names = tuple(self._modules()) if self._modules else ()
        except Exception as e:  # a profile error must never keep the runner from starting
            print(f"fnbox: preload: cannot read the profiles' lists: {e}", file=sys.stderr)
            names = ()
        self.ensure(fs, names, ids)

    def ensure(self, fs: Any, names: Iterable[str], ids: Iterator[int]) -> None:
        """Before a spawn on `fs`: asks it to import whatever of `names` it was not asked for yet. The control
        socket is ordered, so the fork server imports them before it forks that spawn's child."""
        if not names:
            return
        with self._lock:
            if fs is not self._fs:
                self._fs, self._sent = fs, set()
            missing = [n for n in names if n not in self._sent]
            if not missing:
                return
            self._sent.update(missing)
            for n in missing:
                self.status[n] = PENDING
        call_id = next(ids)
        waiter = fs.register(call_id)

        def done(msg: dict[str, Any]) -> None:
            if msg.get("runner_died"):
                return
            with self._lock:
                for n, result in (msg.get("results") or {}).items():
                    self.status[str(n)] = str(result)

        waiter.then(done)
        try:
            fs.send({"op": "preload", "id": call_id, "modules": missing})
        except OSError:
            fs.unregister(call_id)

    def report(self) -> dict[str, str]:
        with self._lock:
            return dict(self.status)

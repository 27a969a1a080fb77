"""Function dependencies: one folder of packages, installed by pip, that every call imports from.

`pip install --target <FNBOX_DATA_DIR>/deps/site-packages -r <functions_dir>/requirements.txt` installs them
(`fnbox deps install`, the deploy API when a requirements.txt is deployed, and ops/install all run install()).
The folder is put on a call's sys.path right after the functions folder; it is owned by the server's user and
world-readable, so a call (an unprivileged uid of its own) can import from it and never write to it.

`functions_framework` comes from runner/compat unless the requirements install the real package, which wins.
A call's file system view does not show the project tree, so the compat modules are read into memory in the
fork server and served by an import finder placed after every other one (an installed package is found first).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import types

REQUIREMENTS = "requirements.txt"
COMPAT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compat")


class DepsError(Exception):
    """pip failed: `output` is what it said."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


def site_packages(data_dir: str) -> str:
    return os.path.join(data_dir, "deps", "site-packages")


def _default_dir() -> str:
    from runner.config import ConfigError, Settings

    try:
        return site_packages(Settings.from_env().data_dir)
    except ConfigError:  # another FNBOX_* variable is bad: the server refuses to start and says which
        return site_packages(os.path.abspath(os.environ.get("FNBOX_DATA_DIR") or "var"))


# Read once in the fork server (whose environment has FNBOX_DATA_DIR), before a call's environment is scrubbed.
SITE_PACKAGES = _default_dir()


class CompatFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the compat modules (top-level packages of runner/compat) from sources read at start-up."""

    def __init__(self, root: str = COMPAT_DIR) -> None:
        self.sources: dict[str, tuple[str, str]] = {}  # module name -> (file name, source)
        for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            init = os.path.join(root, entry, "__init__.py")
            if entry.isidentifier() and os.path.isfile(init):
                with open(init, encoding="utf-8") as f:
                    self.sources[entry] = (init, f.read())

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.sources:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, origin=self.sources[fullname][0], is_package=True)
        if spec is not None:
            spec.submodule_search_locations = []
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        filename, source = self.sources[module.__name__]
        module.__file__ = filename
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)


COMPAT = CompatFinder()  # read in the fork server: calls inherit it


def activate(path: str | None = None) -> None:
    """In a call's process: the deps folder after the functions folder (which _load() puts first), and the
    compat finder after every other finder, so that an installed functions-framework wins over ours."""
    path = path or SITE_PACKAGES
    if os.path.isdir(path) and path not in sys.path:
        sys.path.insert(1 if sys.path else 0, path)
    if COMPAT not in sys.meta_path:
        sys.meta_path.append(COMPAT)


def install(requirements: str, data_dir: str, python: str | None = None, timeout: float = 900) -> str:
    """Installs requirements into a fresh folder, then swaps it in with two renames, so a call never imports
    from a half-installed folder. Returns pip's output; raises DepsError when pip fails, leaving the installed
    packages as they were."""
    target = site_packages(data_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    os.chmod(parent, 0o755)
    tmp = tempfile.mkdtemp(prefix=".new-", dir=parent)
    cmd = [python or sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "--target", tmp, "-r", requirements]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env={**os.environ, "PIP_NO_INPUT": "1"})
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DepsError(f"pip install took more than {timeout:g} s") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DepsError(f"pip install -r {requirements} failed (exit {proc.returncode})", output)
    for root, dirs, files in os.walk(tmp):  # readable by the sandbox uids, writable only by us
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
    os.chmod(tmp, 0o755)
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.rename(target, os.path.join(old, "site-packages"))
    os.rename(tmp, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return output


def installed(data_dir: str) -> list[str]:
    """The distributions in the deps folder, as `name==version`."""
    target = site_packages(data_dir)
    try:
        entries = sorted(os.listdir(target))
    except OSError:
        return []
    out = []
    for e in entries:
        if e.endswith(".dist-info"):
            stem = e[: -len(".dist-info")]
            name, _, version = stem.rpartition("-")
            out.append(f"{name}=={version}")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m runner.deps [--functions DIR] [--data DIR]`: installs DIR/requirements.txt (used by ops/install)."""
    import argparse

    from runner.config import Settings

    s = Settings.from_env()
    ap = argparse.ArgumentParser(prog="python -m runner.deps", description=main.__doc__)
    ap.add_argument("--functions", default=s.functions_dir, help="the functions folder (default $FNBOX_FUNCTIONS_DIR)")
    ap.add_argument("--data", default=s.data_dir, help="the data folder (default $FNBOX_DATA_DIR)")
    args = ap.parse_args(argv)
    req = os.path.join(args.functions, REQUIREMENTS)
    if not os.path.isfile(req):
        print(f"no {req}: nothing to install")
        return 0
    try:
        install(req, args.data)
    except DepsError as e:
        print(f"{e}\n{e.output}", file=sys.stderr)
        return 1
    print(f"installed into {site_packages(args.data)}: {', '.join(installed(args.data)) or '(nothing)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

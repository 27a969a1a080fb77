"""Deploying functions: validation, versions, and an atomic switch of what `/function/<name>` runs.

Every deploy is kept as an immutable version directory `<data>/versions/<name>/<N>/` (the last KEEP
versions). What is live is, in the functions folder, either `<name>.py` (a single module, replaced with
rename(2)) or `<name>` as a symlink to a version directory (a package, re-pointed with rename(2) of a new
symlink). Both switches are one atomic rename: a call starting during a deploy sees the old version or the
new one; the child resolves a package's symlink once, so a call in flight never mixes two versions.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from typing import Any

KEEP = 10
MAX_ARCHIVE_BYTES = 20 * 1024 * 1024  # unpacked size
MAX_ARCHIVE_FILES = 2000


class DeployError(Exception):
    """A deploy refused before anything changed. `code` is the API's stable error code."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


MAX_NAME = 64  # as Cloud Functions' 63; leaves room under NAME_MAX (255) for the deploy's temporary names


def valid_name(name: str) -> bool:
    return name.isidentifier() and not name.startswith("_") and len(name) <= MAX_NAME


def _compile(source: bytes, filename: str) -> None:
    try:
        compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as e:
        raise DeployError("syntax_error", f"{filename}: {e.msg}", line=e.lineno, file=filename) from None
    except ValueError as e:  # source with NUL bytes
        raise DeployError("syntax_error", f"{filename}: {e}", line=None, file=filename) from None


def _archive_members(data: bytes) -> dict[str, bytes]:
    """Reads a .zip or .tar.gz fully in memory after checking every member; returns {relative path: bytes}."""
    files: dict[str, bytes] = {}
    total = 0

    def check(name: str, size: int) -> str:
        nonlocal total
        if name.startswith("/") or "\\" in name or any(p in ("..",) for p in name.split("/")):
            raise DeployError("invalid_archive", f"unsafe path in archive: {name!r}")
        total += size
        if total > MAX_ARCHIVE_BYTES or len(files) >= MAX_ARCHIVE_FILES:
            raise DeployError("invalid_archive", "archive too large (at most 20 MiB and 2000 files unpacked)")
        while name.startswith("./"):  # `tar -C dir .` names; never strip a dotfile's own dot
            name = name[2:]
        return name

    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    mode = (info.external_attr >> 16) & 0o170000
                    if mode and mode not in (0o100000, 0o040000):
                        raise DeployError("invalid_archive", f"links and special files are refused: {info.filename!r}")
                    name = check(info.filename, info.file_size)
                    if info.is_dir():
                        continue
                    content = zf.read(info)
                    if len(content) != info.file_size:
                        raise DeployError("invalid_archive", "archive sizes do not match its contents")
                    files[name] = content
        except (zipfile.BadZipFile, EOFError) as e:
            raise DeployError("invalid_archive", f"not a readable zip: {e}") from None
    elif data[:2] == b"\x1f\x8b":
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
                for m in tf.getmembers():
                    if not (m.isfile() or m.isdir()):
                        raise DeployError("invalid_archive", f"links and special files are refused: {m.name!r}")
                    name = check(m.name, m.size)
                    if m.isfile():
                        f = tf.extractfile(m)
                        files[name] = f.read() if f else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DeployError("invalid_archive", f"not a readable .tar.gz: {e}") from None
    else:
        raise DeployError("invalid_archive", "not a .zip or .tar.gz archive")
    files = {k.rstrip("/"): v for k, v in files.items() if k.rstrip("/")}
    # Accept both a package's contents at the top and a single top-level folder holding them.
    if "__init__.py" not in files:
        tops = {k.split("/", 1)[0] for k in files}
        if len(tops) == 1 and f"{next(iter(tops))}/__init__.py" in files:
            top = next(iter(tops)) + "/"
            files = {k[len(top):]: v for k, v in files.items() if k.startswith(top)}
    if "__init__.py" not in files:
        raise DeployError("invalid_archive", "the archive has no __init__.py at its top")
    return files


def is_archive(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04" or data[:2] == b"\x1f\x8b"


def content_hash(files: dict[str, bytes]) -> str:
    """What a version is: the sha256 of its files' relative paths and contents."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return h.hexdigest()


def _read_tree(root: str) -> dict[str, bytes]:
    """A package folder's files (no __pycache__, no meta.json), by relative path."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for f in files:
            full = os.path.join(d, f)
            rel = os.path.relpath(full, root)
            if rel != "meta.json" and os.path.isfile(full):
                with open(full, "rb") as fh:
                    out[rel] = fh.read()
    return out


# Where a version came from: an API deploy, or the functions folder's own content found changed by hand (a
# hand edit after a deploy, or a hand-placed function kept before `rm` deletes it).
ORIGINS = ("deploy", "hand_edit")


@dataclass(frozen=True)
class Version:
    version: int
    kind: str  # "module" or "package"
    deployed_at: float
    size: int
    origin: str = "deploy"
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "kind": self.kind, "deployed_at": self.deployed_at,
                "deployed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.deployed_at)), "size": self.size,
                "origin": self.origin}


class FunctionStore:
    def __init__(self, functions_dir: str, data_dir: str) -> None:
        self.functions_dir = functions_dir
        self.versions_dir = os.path.join(data_dir, "versions")
        os.makedirs(self.versions_dir, mode=0o755, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------------------
    def _dir(self, name: str) -> str:
        return os.path.join(self.versions_dir, name)

    def versions(self, name: str) -> list[Version]:
        out = []
        try:
            entries = os.listdir(self._dir(name))
        except FileNotFoundError:
            return []
        for e in entries:
            if e.isdigit():
                try:
                    with open(os.path.join(self._dir(name), e, "meta.json")) as f:
                        meta = json.load(f)
                    out.append(Version(int(e), meta["kind"], meta["deployed_at"], meta["size"],
                                       meta.get("origin", "deploy"), meta.get("sha256")))
                except (OSError, ValueError, KeyError):
                    continue
        return sorted(out, key=lambda v: v.version)

    def current(self, name: str) -> int | None:
        try:
            with open(os.path.join(self._dir(name), "current")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    # -- changing ------------------------------------------------------------------------------------------
    def _lock(self, name: str) -> int:
        os.makedirs(self._dir(name), mode=0o755, exist_ok=True)
        fd = os.open(os.path.join(self._dir(name), ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # deploys of one function are serialised across workers
        return fd

    def deploy(self, name: str, data: bytes) -> Version:
        if not valid_name(name):
            raise DeployError("invalid_name", f"{name!r} is not a valid function name (a Python identifier "
                                              "not starting with _)")
        if is_archive(data):
            files = _archive_members(data)
            for path, content in files.items():
                if path.endswith(".py"):
                    _compile(content, path)
            kind = "package"
        else:
            _compile(data, f"{name}.py")
            files = {f"{name}.py": data}
            kind = "module"
        fd = self._lock(name)
        try:
            # What the folder serves now (a hand edit since the last deploy, or a function placed by hand and
            # never deployed) becomes a version first, unless it is what is being deployed: never lost.
            self._keep_hand_edit(name, unmanaged_too=True, unless=content_hash(files))
            number = self._store(name, kind, files, "deploy")
            self._activate(name, number)
            self._prune(name)
            return next(v for v in self.versions(name) if v.version == number)
        finally:
            os.close(fd)

    def _store(self, name: str, kind: str, files: dict[str, bytes], origin: str) -> int:
        """Writes files as the next immutable version directory (under the function's lock); returns its number."""
        existing = self.versions(name)
        number = (existing[-1].version if existing else 0) + 1
        vdir = os.path.join(self._dir(name), str(number))
        tmp = tempfile.mkdtemp(prefix=".new-", dir=self._dir(name))
        for path, content in files.items():
            dest = os.path.join(tmp, path)
            os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
            with open(dest, "wb") as f:
                f.write(content)
            os.chmod(dest, 0o644)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"kind": kind, "deployed_at": time.time(), "size": sum(map(len, files.values())),
                       "origin": origin, "sha256": content_hash(files)}, f)
        os.chmod(tmp, 0o755)
        os.rename(tmp, vdir)
        return number

    def _live(self, name: str) -> tuple[str, dict[str, bytes]] | None:
        """What the functions folder serves for name now: (kind, files as a version holds them), or None."""
        module = os.path.join(self.functions_dir, name + ".py")
        package = os.path.join(self.functions_dir, name)
        if os.path.isfile(os.path.join(package, "__init__.py")):
            return "package", _read_tree(os.path.realpath(package))
        if os.path.isfile(module):
            with open(module, "rb") as f:
                return "module", {f"{name}.py": f.read()}
        return None

    def _version_hash(self, name: str, v: Version) -> str:
        if v.sha256:
            return v.sha256
        return content_hash(_read_tree(os.path.join(self._dir(name), str(v.version))))  # a version of 0.1

    def _keep_hand_edit(self, name: str, unmanaged_too: bool = False, unless: str | None = None) -> int | None:
        """Under the lock: if the live files differ from the current version (edited by hand after a deploy),
        store them as a new version (origin hand_edit) and make it current. A function never deployed is only
        stored when unmanaged_too (before `rm` deletes it). Returns the new version's number, if any."""
        live = self._live(name)
        if live is None:
            return None
        kind, files = live
        versions = {v.version: v for v in self.versions(name)}
        cur = self.current(name)
        if cur is None and not unmanaged_too:
            return None
        live_hash = content_hash(files)
        if live_hash == unless or (cur in versions and self._version_hash(name, versions[cur]) == live_hash):
            return None
        number = self._store(name, kind, files, "hand_edit")
        if kind == "package" and os.path.islink(os.path.join(self.functions_dir, name)):
            self._activate(name, number)  # edited inside a version folder: serve the copy, same content
        else:
            self._set_current(name, number)
        return number

    def sync(self, name: str) -> None:
        """Records a hand edit of a deployed function as a new version (before reporting its versions)."""
        if not os.path.isdir(self._dir(name)):
            return
        fd = self._lock(name)
        try:
            self._keep_hand_edit(name)
        finally:
            os.close(fd)

    def rollback(self, name: str, version: int | None = None) -> Version:
        fd = self._lock(name)
        try:
            # A hand-placed file where a removed function was: kept before the rollback replaces it.
            self._keep_hand_edit(name, unmanaged_too=bool(self.versions(name)))
            versions = self.versions(name)
            cur = self.current(name)
            if not versions:
                raise DeployError("no_version", f"{name!r} has no deployed versions (a function placed in the "
                                                "functions folder by hand has none until `fnbox deploy`)")
            if version is None:
                older = [v for v in versions if cur is None or v.version < cur]
                if not older:
                    raise DeployError("no_version", f"{name!r} has no version before {cur} (the oldest kept)")
                target = older[-1]
            else:
                match = [v for v in versions if v.version == version]
                if not match:
                    raise DeployError("no_version", f"{name!r} has no version {version}")
                target = match[0]
            self._activate(name, target.version)
            return target
        finally:
            os.close(fd)

    def delete(self, name: str) -> tuple[bool, int | None]:
        """Removes the function from the functions folder. Its versions stay; content that was not a version yet
        (a hand-placed function, a hand edit) is stored as one first. Returns (found, that version's number)."""
        fd = self._lock(name)
        try:
            kept = self._keep_hand_edit(name, unmanaged_too=True)
            found = False
            for path in (os.path.join(self.functions_dir, name + ".py"), os.path.join(self.functions_dir, name)):
                if os.path.islink(path) or os.path.isfile(path):
                    os.unlink(path)
                    found = True
                elif os.path.isdir(path):
                    shutil.rmtree(path)
                    found = True
            try:
                os.unlink(os.path.join(self._dir(name), "current"))
            except FileNotFoundError:
                pass
            return found, kept
        finally:
            os.close(fd)

    def _activate(self, name: str, number: int) -> None:
        vdir = os.path.join(self._dir(name), str(number))
        with open(os.path.join(vdir, "meta.json")) as f:
            kind = json.load(f)["kind"]
        module = os.path.join(self.functions_dir, name + ".py")
        package = os.path.join(self.functions_dir, name)
        if kind == "module":
            tmp = os.path.join(self.functions_dir, f".{name}.py.deploy")
            shutil.copyfile(os.path.join(vdir, name + ".py"), tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, module)  # the switch
            # A package of the same name would win the import: removing it is the switch in that case.
            if os.path.islink(package):
                os.unlink(package)
            elif os.path.isdir(package):
                shutil.rmtree(package)
        else:
            if os.path.isdir(package) and not os.path.islink(package):
                shutil.rmtree(package)  # a hand-made package folder becomes a managed one
            tmp = os.path.join(self.functions_dir, f".{name}.deploy")
            if os.path.lexists(tmp):
                os.unlink(tmp)
            os.symlink(vdir, tmp)
            os.replace(tmp, package)  # the switch
            if os.path.exists(module):
                os.unlink(module)
        self._set_current(name, number)

    def _set_current(self, name: str, number: int) -> None:
        ptr = os.path.join(self._dir(name), ".current.tmp")
        with open(ptr, "w") as f:
            f.write(str(number))
        os.replace(ptr, os.path.join(self._dir(name), "current"))

    def _prune(self, name: str) -> None:
        versions = self.versions(name)
        cur = self.current(name)
        for v in versions[:-KEEP]:
            if v.version != cur:
                shutil.rmtree(os.path.join(self._dir(name), str(v.version)), ignore_errors=True)

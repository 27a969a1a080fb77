"""`fnbox`: the command line for operators and function authors.

Remote commands talk to a running server (`--url`, default $FNBOX_URL or http://127.0.0.1:8000) with the
admin token from $FNBOX_ADMIN_TOKEN. `fnbox run` and `fnbox check` need no server: `run` runs a file's or a
package folder's main() once in exactly the sandbox a server would use. Errors are one line on stderr and exit
status 1 (2 for a wrong command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import mimetypes
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any


class CliError(Exception):
    pass


# -- HTTP ------------------------------------------------------------------------------------------------------
def _http(args: argparse.Namespace, method: str, path: str, body: bytes | None = None,
          headers: dict[str, str] | None = None, admin: bool = True) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(headers or {})
    if admin:
        token = os.environ.get("FNBOX_ADMIN_TOKEN")
        if not token:
            raise CliError("FNBOX_ADMIN_TOKEN is not set: export the token the server was started with "
                           "(its FNBOX_ADMIN_TOKEN)")
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(args.url.rstrip("/") + path, data=body, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(f"cannot reach {args.url}: {reason}") from None


def _api(args: argparse.Namespace, method: str, path: str, body: bytes | None = None) -> Any:
    status, _, data = _http(args, method, path, body)
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        raise CliError(f"{method} {path}: HTTP {status}: {data[:200]!r} (is {args.url} an fnbox server?)") from None
    if status >= 400:
        where = f" (line {doc['line']})" if doc.get("line") else ""
        if doc.get("output"):
            print(doc["output"].rstrip("\n"), file=sys.stderr)
        raise CliError(f"{doc.get('error', status)}: {doc.get('message', '')}{where}")
    return doc


def _table(rows: list[list[Any]]) -> str:
    rows = [[("-" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _package_bytes(path: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                full = os.path.join(root, f)
                if os.path.isfile(full) and not os.path.islink(full):
                    tf.add(full, arcname=os.path.relpath(full, path), recursive=False)
    return buf.getvalue()


# -- commands --------------------------------------------------------------------------------------------------
def cmd_deploy(args: argparse.Namespace) -> int:
    path = args.file
    if os.path.isdir(path):
        data = _package_bytes(path)
        default = os.path.basename(os.path.normpath(path))
    else:
        with open(path, "rb") as f:
            data = f.read()
        default = os.path.basename(path).split(".", 1)[0]
    name = args.name or default
    if not args.name and not (name.isidentifier() and not name.startswith("_")):
        fixed = re.sub(r"\W", "_", name).lstrip("_") or "my_function"
        fixed = fixed if fixed.isidentifier() else "f_" + fixed
        raise CliError(f"invalid_name: {name!r} (from {os.path.basename(path)}) is not a valid function name: a "
                       f"Python identifier not starting with _; deploy it as `fnbox deploy {path} --name {fixed}`")
    doc = _api(args, "PUT", f"/admin/functions/{urllib.parse.quote(name)}", data)
    print(f"deployed {name} version {doc['version']} ({doc['kind']}, {doc['size']} bytes)")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    doc = _api(args, "GET", f"/admin/functions/{urllib.parse.quote(args.name)}/versions")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows: list[list[Any]] = [["", "VERSION", "KIND", "DEPLOYED", "SIZE", "ORIGIN"]]
    for v in doc["versions"]:
        rows.append(["*" if v["version"] == doc["current"] else "", v["version"], v["kind"], v["deployed"],
                     v["size"], v.get("origin", "deploy")])
    print(_table(rows))
    if doc["current"] is None:
        print(f"({args.name} is not in the functions folder: `fnbox rollback {args.name}` brings the newest back)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    q = f"?version={args.version}" if args.version else ""
    doc = _api(args, "POST", f"/admin/functions/{urllib.parse.quote(args.name)}/rollback{q}")
    print(f"{args.name} now runs version {doc['current']}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    doc = _api(args, "DELETE", f"/admin/functions/{urllib.parse.quote(args.name)}")
    if doc.get("kept_version"):
        print(f"removed {args.name} (kept as version {doc['kept_version']}: `fnbox rollback {args.name}` brings it "
              "back)")
    else:
        print(f"removed {args.name} (its versions are kept: `fnbox rollback {args.name}` brings the newest back)")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    doc = _api(args, "GET", "/admin/functions")
    if args.json:
        print(json.dumps(doc["functions"], indent=2))
        return 0
    rows: list[list[Any]] = [["NAME", "VERSION", "PROFILE", "TIMEOUT_S", "MEMORY_MB", "CALLS", "ERRORS"]]
    for f in doc["functions"]:
        lim = f["limits"]
        rows.append([f["name"], f["version"], lim["profile"], lim["timeout_s"], lim["memory_mb"], f["calls"],
                     f["errors"]])
    print(_table(rows))
    return 0


def cmd_limits(args: argparse.Namespace) -> int:
    doc = _api(args, "GET", "/admin/functions")
    match = [f for f in doc["functions"] if f["name"] == args.name]
    if not match:
        raise CliError(f"not_found: no function named {args.name!r}")
    limits = match[0]["limits"]
    limits["env"] = {k: "***" for k in limits.get("env", {})}  # a server of 0.1 sent the values
    if args.json:
        print(json.dumps(limits, indent=2))
    else:
        print(_table([["KEY", "VALUE"], *([k, json.dumps(v) if isinstance(v, dict | bool) else v]
                                          for k, v in limits.items())]))
    return 0


def _multipart(fields: list[str]) -> tuple[bytes, str]:
    """-F name=value / name=@file (as curl -F): a multipart/form-data body and its Content-Type."""
    boundary = "fnbox-" + uuid.uuid4().hex
    out = io.BytesIO()
    for item in fields:
        if "=" not in item:
            raise CliError(f"-F takes name=value or name=@file, not {item!r}")
        key, value = item.split("=", 1)
        out.write(f"--{boundary}\r\n".encode())
        if value.startswith("@"):
            path = value[1:]
            with open(path, "rb") as f:
                content = f.read()
            ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
            out.write(f'Content-Disposition: form-data; name="{key}"; filename="{os.path.basename(path)}"\r\n'
                      f"Content-Type: {ctype}\r\n\r\n".encode())
            out.write(content)
        else:
            out.write(f'Content-Disposition: form-data; name="{key}"\r\n\r\n'.encode() + value.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _looks_like_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return data.strip()[:1] in (b"{", b"[")


def _request_parts(args: argparse.Namespace) -> tuple[str, bytes | None, dict[str, str]]:
    query = []
    for item in args.query or []:
        if "=" not in item:
            raise CliError(f"-q takes k=v, not {item!r}")
        query.append(tuple(item.split("=", 1)))
    headers = {}
    for item in args.header or []:
        if ":" not in item:
            raise CliError(f"-H takes 'Name: value', not {item!r}")
        k, v = item.split(":", 1)
        headers[k.strip()] = v.strip()
    has_type = any(k.lower() == "content-type" for k in headers)
    data = None
    if args.data is not None and args.form:
        raise CliError("-d and -F cannot be used together (a body is either data or a form)")
    if args.data is not None:
        if args.data.startswith("@"):
            with open(args.data[1:], "rb") as f:
                data = f.read()
        else:
            data = args.data.encode()
        if not has_type and _looks_like_json(data):
            # curl would say application/x-www-form-urlencoded: JSON is what a function reading get_json() wants.
            headers["Content-Type"] = "application/json"
    elif args.form:
        data, ctype = _multipart(args.form)
        if not has_type:
            headers["Content-Type"] = ctype
    return urllib.parse.urlencode(query), data, headers


def cmd_invoke(args: argparse.Namespace) -> int:
    qs, data, headers = _request_parts(args)
    path = f"/function/{urllib.parse.quote(args.name)}"
    if args.path:
        path += "/" + urllib.parse.quote(args.path.lstrip("/"))
    if qs:
        path += "?" + qs
    method = args.method or ("POST" if data is not None else "GET")
    status, hdrs, body = _http(args, method, path, data, headers, admin=False)
    if args.include:
        print(f"HTTP {status}")
        for k, v in hdrs.items():
            print(f"{k}: {v}")
        print()
    sys.stdout.buffer.write(body)
    if body and not body.endswith(b"\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if status >= 400:
        try:
            doc = json.loads(body)
            print(f"error: {doc.get('error')}: {doc.get('message')}", file=sys.stderr)
        except ValueError:
            print(f"error: HTTP {status}", file=sys.stderr)
        return 1
    return 0


def _print_calls(calls: list[dict[str, Any]], boards: bool = False) -> None:
    """boards: each line says which board ran the call (a cluster's listing)."""
    for c in calls:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["time"]))
        where = f"{c.get('board') or '-'}  " if boards else ""
        print(f"{when}  {where}{c['request_id']}  v{c.get('version') or '-'}  {c['method']} {c['path']}  {c['status']} "
              f"{c['outcome']}  {c['duration_ms']} ms  cpu {c.get('cpu_ms')} ms  rss {c.get('max_rss_kb')} KiB"
              + (f"  [{c['trigger']}]" if boards and c.get("trigger") not in (None, "sync") else ""))
        if c.get("output"):
            for line in c["output"].rstrip("\n").splitlines():
                print(f"    | {line}")
        if c["outcome"] != "ok":
            if c.get("traceback"):
                for line in c["traceback"].rstrip("\n").splitlines():
                    print(f"    ! {line}")
            elif c.get("message"):
                what = c.get("error_type") or c["outcome"]
                print(f"    ! {what}: {c['message']}")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(value: str, now: float | None = None) -> float:
    """`30s`, `10m`, `2h`, `1d` ago, or a local date/time `2026-12-03` / `2026-12-03T08:00[:00]`: unix time."""
    now = time.time() if now is None else now
    m = _DURATION.match(value.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(value.strip(), fmt))
        except ValueError:
            continue
    raise CliError(f"--since takes a duration (30s, 10m, 2h, 1d) or a local time (2026-12-03T08:00), not {value!r}")


def cmd_logs(args: argparse.Namespace) -> int:
    """Every board's calls (GET /admin/calls; one board: its own), or with --this-board the answering board's
    alone (GET /admin/functions/NAME/calls, as fnbox 0.2 did)."""
    if args.this_board:
        return _logs_this_board(args)
    query = {"function": args.name, "limit": args.n}
    if args.errors:
        query["errors"] = "1"
    if args.since:
        query["since"] = repr(parse_since(args.since))
    if args.board:
        query["board"] = args.board
    doc = _api(args, "GET", "/admin/calls?" + urllib.parse.urlencode(query))
    # Lines say their board when there is more than one to tell apart (or one was asked for).
    labelled = bool(args.board) or len(doc.get("boards", [])) + len(doc.get("unreachable", [])) > 1
    calls = list(reversed(doc["calls"]))
    _print_calls(calls, labelled)
    _unreachable(doc)
    if not calls and not args.follow:
        print(f"(no {'failed ' if args.errors else ''}calls of {args.name}"
              f"{' on board ' + args.board if args.board else ''}"
              f"{' since ' + args.since if args.since else ''} in the history)", file=sys.stderr)
    seen = {(c.get("board"), c["id"]) for c in calls}
    query["limit"] = 1000
    while args.follow:
        time.sleep(1.0)
        doc = _api(args, "GET", "/admin/calls?" + urllib.parse.urlencode(query))
        rows = list(reversed(doc["calls"]))
        _print_calls([c for c in rows if (c.get("board"), c["id"]) not in seen], labelled)
        # Only the rows of the last answer can come again: older ones are pushed out by newer calls.
        seen = {(c.get("board"), c["id"]) for c in rows}
        sys.stdout.flush()
    return 0


def _unreachable(doc: dict[str, Any]) -> None:
    for u in doc.get("unreachable", []):
        print(f"fnbox: board {u['board']} ({u['url']}) did not answer, its calls are not shown: {u['error']}",
              file=sys.stderr)
    if doc.get("registry_error"):
        print(f"fnbox: only board {doc.get('board')}'s calls are shown: {doc['registry_error']}", file=sys.stderr)


def _logs_this_board(args: argparse.Namespace) -> int:
    name = urllib.parse.quote(args.name)
    query = {"errors": "1"} if args.errors else {}
    if args.since:
        query["since"] = repr(parse_since(args.since))
    doc = _api(args, "GET", f"/admin/functions/{name}/calls?" + urllib.parse.urlencode({**query, "limit": args.n}))
    calls = list(reversed(doc["calls"]))
    _print_calls(calls)
    if not calls and not args.follow:
        print(f"(no {'failed ' if args.errors else ''}calls of {args.name}"
              f"{' since ' + args.since if args.since else ''} in the history)", file=sys.stderr)
    last = calls[-1]["id"] if calls else 0
    while args.follow:
        time.sleep(1.0)
        doc = _api(args, "GET", f"/admin/functions/{name}/calls?" + urllib.parse.urlencode({**query, "limit": 1000}))
        new = [c for c in reversed(doc["calls"]) if c["id"] > last]
        _print_calls(new)
        if new:
            last = new[-1]["id"]
        sys.stdout.flush()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from runner import checks, profiles

    pset, problems = checks.check(args.profiles, args.functions)
    if pset is not None:
        names = sorted(set(profiles.function_names(args.functions)) | set(pset.overrides))
        print(profiles.effective_table(pset, names or ["(default)"]))
    for p in problems:  # one line each, file:line: reason, as a compiler says it
        print(p, file=sys.stderr)
    if problems:
        return 1
    n = len(profiles.function_names(args.functions))
    print(f"ok: {len(pset.profiles) if pset else 0} profiles, {len(pset.overrides) if pset else 0} function "
          f"overrides, {n} functions checked")
    return 0


def cmd_deps(args: argparse.Namespace) -> int:
    args.timeout = max(args.timeout, 900.0)  # pip may download and build for minutes
    if args.action == "install":
        if args.file:
            with open(args.file, "rb") as f:
                doc = _api(args, "PUT", "/admin/deps", f.read())
        else:
            doc = _api(args, "POST", "/admin/deps/install")
        print(f"installed: {', '.join(doc['installed']) or '(nothing)'}")
        return 0
    doc = _api(args, "GET", "/admin/deps")
    if doc["requirements"] is None:
        print("no requirements.txt in the functions folder (`fnbox deps install requirements.txt` deploys one)")
    else:
        print("requirements.txt:")
        print("\n".join("    " + line for line in doc["requirements"].rstrip("\n").splitlines()))
    print(f"installed in {doc['path']}: {', '.join(doc['installed']) or '(nothing)'}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from runner import doctor

    return doctor.main(["--strict"] * args.strict + ["--json"] * args.json)


def _result_doc(result: Any) -> dict[str, Any]:
    """A CallResult as JSON: its public fields (the private exit waiter is not data), bytes as text."""
    doc = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if not f.name.startswith("_")}
    doc["body"] = result.body.decode("utf-8", "replace")
    doc["output"] = result.output.decode("utf-8", "replace")
    return doc


def cmd_run(args: argparse.Namespace) -> int:
    """Runs FILE's (or a package FOLDER's) main() once in the same sandbox a server would use, and prints
    everything about the call."""
    from werkzeug.test import EnvironBuilder

    from runner.config import Settings
    from runner.profiles import ProfileError, load_profiles
    from runner.supervisor import Invocation, Supervisor, Unavailable

    package = os.path.isdir(args.file)
    if package and not os.path.isfile(os.path.join(args.file, "__init__.py")):
        raise CliError(f"{args.file} is a folder without __init__.py: a package function defines main() there")
    if not package and not os.path.isfile(args.file):
        raise CliError(f"no such file or folder: {args.file}")
    try:
        pset = load_profiles(args.profiles)
    except ProfileError as e:
        raise CliError(f"invalid profile: {e}") from None
    if args.profile not in pset.profiles:
        raise CliError(f"unknown profile {args.profile!r} (known: {', '.join(sorted(pset.profiles))})")
    profile = pset.profiles[args.profile]
    if args.entry_point:
        if not args.entry_point.isidentifier():
            raise CliError(f"--entry-point takes a function name, not {args.entry_point!r}")
        profile = dataclasses.replace(profile, entry_point=args.entry_point)
    base = os.path.basename(os.path.normpath(args.file))
    name = base if package else base.split(".", 1)[0]
    if not name.isidentifier() or name.startswith("_"):
        name = "snippet"
    qs, data, headers = _request_parts(args)
    if data is not None and len(data) > profile.max_request_kb * 1024:
        raise CliError(f"request_too_large: the body exceeds max_request_kb ({profile.max_request_kb} KiB)")
    path = f"/function/{name}" + ("/" + args.path.lstrip("/") if args.path else "")
    method = args.method or ("POST" if data is not None else "GET")
    environ = EnvironBuilder(path=path, method=method, query_string=qs, data=data, headers=headers,
                             base_url="http://localhost/").get_environ()
    environ["REMOTE_ADDR"] = "127.0.0.1"
    message = {k: v for k, v in environ.items() if isinstance(v, str)}
    # The sandbox uids must read the function: a world-readable private copy outside any 0700 home.
    fdir = tempfile.mkdtemp(prefix="fnbox-run-", dir="/tmp")
    os.chmod(fdir, 0o755)
    try:
        if package:
            shutil.copytree(args.file, os.path.join(fdir, name), symlinks=False,
                            ignore=shutil.ignore_patterns("__pycache__"))
            for root, dirs, files in os.walk(os.path.join(fdir, name)):
                for d in dirs:
                    os.chmod(os.path.join(root, d), 0o755)
                for f in files:
                    os.chmod(os.path.join(root, f), 0o644)
            os.chmod(os.path.join(fdir, name), 0o755)
        else:
            shutil.copyfile(args.file, os.path.join(fdir, name + ".py"))
            os.chmod(os.path.join(fdir, name + ".py"), 0o644)
        open(os.path.join(fdir, "__init__.py"), "w").close()
        sup = Supervisor(Settings.from_env())
        try:
            sup.start()
            result = sup.call(Invocation(name, fdir, profile, message, data or b"", "cli-run"))
            result.wait_complete(profile.timeout_s + 5)  # its CPU and peak memory come with its exit
        except Unavailable as e:
            raise CliError(f"unavailable: {e}") from None
        finally:
            sup.close()
    finally:
        shutil.rmtree(fdir, ignore_errors=True)
    if args.json:
        print(json.dumps(_result_doc(result), indent=2))
        return 0 if result.outcome == "ok" else 1
    print(f"outcome:  {result.outcome}" + (f" ({result.message})" if result.message else ""))
    if result.status:
        print(f"status:   {result.status}")
        for k, v in result.headers:
            print(f"header:   {k}: {v}")
    if result.error_type:
        print(f"error:    {result.error_type}")
    print(f"duration: {result.wall_ms:.1f} ms (cpu {result.cpu_ms} ms)")
    print(f"memory:   peak {result.max_rss_kb} KiB (limit {profile.memory_mb} MiB)")
    print(f"profile:  {profile.profile}")
    print("output:" + ("" if result.output else "   (none)"))
    if result.output:
        print(result.output.decode("utf-8", "replace").rstrip("\n"))
    if result.output_dropped:
        print(f"          ({result.output_dropped} more bytes dropped)")
    if result.traceback:
        print(result.traceback.rstrip("\n"))
    print("body:")
    sys.stdout.flush()
    sys.stdout.buffer.write(result.body)
    if result.body and not result.body.endswith(b"\n"):
        sys.stdout.write("\n")
    return 0 if result.outcome == "ok" else 1


# -- parser ----------------------------------------------------------------------------------------------------
def _request_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("request")
    g.add_argument("-X", "--method", help="HTTP method (default: GET, or POST when a body is given)")
    g.add_argument("-q", "--query", action="append", metavar="K=V",
                   help="a query string parameter; repeat for more (-q a=1 -q a=2)")
    g.add_argument("-d", "--data", metavar="DATA|@FILE",
                   help="the request body, or @FILE for a file's bytes; JSON data is sent as application/json "
                        "unless -H sets a Content-Type")
    g.add_argument("-F", "--form", action="append", metavar="NAME=VALUE|NAME=@FILE",
                   help="a multipart/form-data field, or a file upload with @FILE (as curl -F); repeat for more")
    g.add_argument("-H", "--header", action="append", metavar="'NAME: VALUE'", help="a request header; repeat for more")


def _remote(sub: argparse._SubParsersAction, name: str, **kw: Any) -> argparse.ArgumentParser:
    """A command that talks to a server: --url and --timeout are accepted after it too."""
    p = sub.add_parser(name, **kw)
    p.add_argument("--url", default=argparse.SUPPRESS,
                   help="the server's base URL (default: $FNBOX_URL, else http://127.0.0.1:8000)")
    p.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                   help="seconds to wait for the server's answer (default 60)")
    return p


EPILOG = """environment:
  FNBOX_URL           the server's base URL when --url is not given (default http://127.0.0.1:8000)
  FNBOX_ADMIN_TOKEN   the admin API's token: the same value the server was started with (deploy, versions,
                      rollback, rm, ls, limits, logs, deps); `invoke` does not need it
  FNBOX_PROFILES_DIR  the profiles folder for `run` and `check` (default ./sandbox_profiles of the checkout)
  FNBOX_FUNCTIONS_DIR the functions folder for `check` (default ./functions of the checkout)

`fnbox COMMAND --help` explains each command. From a laptop, reach a server's admin port through an ssh tunnel:
docs/operators.md, "Deploying from another machine"."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fnbox", description=__doc__.split("\n\n")[0].strip('"'), epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("FNBOX_URL", "http://127.0.0.1:8000"),
                    help="the server's base URL (default: $FNBOX_URL, else http://127.0.0.1:8000)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server's answer (default 60)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _remote(sub, "deploy", help="deploy a module file or a package folder (a new version)",
                description="Deploys FILE (one module) or FOLDER (a package with __init__.py) as a new version of "
                            "the function; calls switch to it atomically. `fnbox rollback NAME` goes back.")
    p.add_argument("file", metavar="FILE|FOLDER", help="my_func.py, or a folder holding __init__.py")
    p.add_argument("--name", help="the function's name in /function/NAME (default: the file or folder name "
                                  "without .py; must be a Python identifier)")
    p.set_defaults(fn=cmd_deploy)
    p = _remote(sub, "versions", help="a function's deployed versions (* marks the one serving)")
    p.add_argument("name", help="the function's name")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.set_defaults(fn=cmd_versions)
    p = _remote(sub, "rollback", help="serve the previous (or a given) version again")
    p.add_argument("name", help="the function's name")
    p.add_argument("--version", type=int, metavar="N", help="the version to serve (default: the one before "
                                                             "the current; see `fnbox versions NAME`)")
    p.set_defaults(fn=cmd_rollback)
    p = _remote(sub, "rm", help="remove a function (its versions are kept; rollback brings it back)")
    p.add_argument("name", help="the function's name")
    p.set_defaults(fn=cmd_rm)
    p = _remote(sub, "ls", help="list functions with their version, limits and call counts")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.set_defaults(fn=cmd_ls)
    p = _remote(sub, "limits", help="a function's effective limits ([env] values are masked)")
    p.add_argument("name", help="the function's name")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(fn=cmd_limits)
    p = _remote(sub, "invoke", help="call a function over HTTP, as curl would")
    p.add_argument("name", help="the function's name")
    p.add_argument("path", nargs="?", help="the sub-path after /function/NAME/ (request.view_args['subpath'])")
    p.add_argument("-i", "--include", action="store_true", help="print the status and headers")
    _request_options(p)
    p.set_defaults(fn=cmd_invoke)
    p = _remote(sub, "logs", help="a function's recent calls, with their output and errors (of every board)",
                description="A function's recent calls, oldest first, with their output and errors. On several "
                            "boards (FNBOX_REDIS_URL) the calls of every board, each line with its board; "
                            "--board NAME or --this-board narrows that to one.")
    p.add_argument("name", help="the function's name")
    p.add_argument("-n", type=int, default=20, metavar="N", help="how many of the newest calls (default 20)")
    p.add_argument("--errors", action="store_true", help="only calls that did not end ok")
    p.add_argument("--since", metavar="WHEN", help="only calls since a duration ago (30s, 10m, 2h, 1d) or a local "
                                                   "time (2026-12-03T08:00)")
    p.add_argument("--follow", action="store_true", help="keep printing new calls (Ctrl-C stops)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--board", metavar="NAME", help="several boards: only the calls of board NAME (its FNBOX_BOARD)")
    g.add_argument("--this-board", action="store_true",
                   help="several boards: only the calls of the board that answers (--url)")
    g.add_argument("--all-boards", action="store_true", help=argparse.SUPPRESS)  # the default since 0.3
    p.set_defaults(fn=cmd_logs)
    p = _remote(sub, "deps", help="the functions' packages: show them, or install a requirements.txt",
                description="`fnbox deps install requirements.txt` deploys it to the server's functions folder and "
                            "installs it with pip into the server's data folder (every function imports from it); "
                            "`fnbox deps install` reinstalls the deployed one; `fnbox deps` shows both.")
    p.add_argument("action", nargs="?", choices=["show", "install"], default="show", help="show (default) or install")
    p.add_argument("file", nargs="?", metavar="REQUIREMENTS", help="the requirements.txt to deploy and install")
    p.set_defaults(fn=cmd_deps)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    profiles_default = os.environ.get("FNBOX_PROFILES_DIR", os.path.join(here, "sandbox_profiles"))
    p = sub.add_parser("check", help="check the profiles and every function (syntax, entry point) without a server",
                       description="Validates the profiles folder and every function of the functions folder (syntax, "
                                   "entry point), prints each function's limits, and exits 1 with file:line reasons "
                                   "when anything would fail at call time. Runs no function code.")
    p.add_argument("--profiles", default=profiles_default, help="the profiles folder (default: $FNBOX_PROFILES_DIR, "
                                                                "else the checkout's sandbox_profiles)")
    p.add_argument("--functions", default=os.environ.get("FNBOX_FUNCTIONS_DIR", os.path.join(here, "functions")),
                   help="the functions folder (default: $FNBOX_FUNCTIONS_DIR, else the checkout's functions)")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("doctor", help="which sandbox layers are active on this machine")
    p.add_argument("--strict", action="store_true", help="exit 1 when any layer or check is DEGRADED")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("run", help="run a file's or a package folder's main() once in the sandbox, no server needed",
                       description="Runs FILE's (or a package FOLDER's) entry point once in exactly the sandbox a "
                                   "server would use, and prints the outcome, status, headers, output, time, memory "
                                   "and body. Exit 0 when the call ended ok.")
    p.add_argument("file", metavar="FILE|FOLDER", help="a .py file, or a folder holding __init__.py")
    p.add_argument("path", nargs="?", help="the sub-path after /function/NAME/ (request.view_args['subpath'])")
    p.add_argument("--profile", default="strict", help="the named profile whose limits apply (default strict)")
    p.add_argument("--profiles", default=profiles_default, help="the profiles folder (default: $FNBOX_PROFILES_DIR, "
                                                                "else the checkout's sandbox_profiles)")
    p.add_argument("--entry-point", metavar="NAME", help="the function to call (default: the profile's "
                                                         "entry_point, main)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    _request_options(p)
    p.set_defaults(fn=cmd_run)
    from cli import queue_cmds  # calls, schedules, worker: the queue side (docs/cluster.md)

    queue_cmds.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except CliError as e:
        print(f"fnbox: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a local file: FILE, -d @FILE
        print(f"fnbox: {e.filename}: {e.strerror}" if e.filename else f"fnbox: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

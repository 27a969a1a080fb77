"""`fnbox`: the command line for operators and function authors.

Remote commands talk to a running server (`--url`, default $FNBOX_URL or http://127.0.0.1:8000) with the
admin token from $FNBOX_ADMIN_TOKEN. `fnbox run` needs no server: it runs a file's main() once in exactly the
sandbox a server would use. Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
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
            raise CliError("FNBOX_ADMIN_TOKEN is not set (the admin API needs it)")
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
        raise CliError(f"{method} {path}: HTTP {status}: {data[:200]!r}") from None
    if status >= 400:
        where = f" (line {doc['line']})" if doc.get("line") else ""
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
    doc = _api(args, "PUT", f"/admin/functions/{urllib.parse.quote(name)}", data)
    print(f"deployed {name} version {doc['version']} ({doc['kind']}, {doc['size']} bytes)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    q = f"?version={args.version}" if args.version else ""
    doc = _api(args, "POST", f"/admin/functions/{urllib.parse.quote(args.name)}/rollback{q}")
    print(f"{args.name} now runs version {doc['current']}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    _api(args, "DELETE", f"/admin/functions/{urllib.parse.quote(args.name)}")
    print(f"removed {args.name}")
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
    if args.json:
        print(json.dumps(limits, indent=2))
    else:
        print(_table([["KEY", "VALUE"], *([k, json.dumps(v) if isinstance(v, dict | bool) else v]
                                          for k, v in limits.items())]))
    return 0


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
    data = None
    if args.data is not None:
        if args.data.startswith("@"):
            with open(args.data[1:], "rb") as f:
                data = f.read()
        else:
            data = args.data.encode()
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


def _print_calls(calls: list[dict[str, Any]]) -> None:
    for c in calls:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["time"]))
        print(f"{when}  {c['request_id']}  v{c.get('version') or '-'}  {c['method']} {c['path']}  {c['status']} "
              f"{c['outcome']}  {c['duration_ms']} ms  cpu {c.get('cpu_ms')} ms  rss {c.get('max_rss_kb')} KiB")
        if c.get("output"):
            for line in c["output"].rstrip("\n").splitlines():
                print(f"    | {line}")


def cmd_logs(args: argparse.Namespace) -> int:
    name = urllib.parse.quote(args.name)
    if args.all_boards:  # several boards: every board's calls, labelled (docs/cluster.md)
        from cli.queue_cmds import print_board_calls

        return print_board_calls(args, _api(args, "GET", f"/admin/cluster/calls?function={name}&limit={args.n}"))
    doc = _api(args, "GET", f"/admin/functions/{name}/calls?limit={args.n}")
    calls = list(reversed(doc["calls"]))
    _print_calls(calls)
    last = calls[-1]["id"] if calls else 0
    while args.follow:
        time.sleep(1.0)
        doc = _api(args, "GET", f"/admin/functions/{name}/calls?limit=1000")
        new = [c for c in reversed(doc["calls"]) if c["id"] > last]
        _print_calls(new)
        if new:
            last = new[-1]["id"]
        sys.stdout.flush()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from runner import profiles

    return profiles.main(["check", "--profiles", args.profiles, "--functions", args.functions])


def cmd_doctor(args: argparse.Namespace) -> int:
    from runner import doctor

    return doctor.main(["--strict"] * args.strict + ["--json"] * args.json)


def cmd_run(args: argparse.Namespace) -> int:
    """Runs FILE's main() once in the same sandbox a server would use, and prints everything about the call."""
    from werkzeug.test import EnvironBuilder

    from runner.config import Settings
    from runner.profiles import ProfileError, load_profiles
    from runner.supervisor import Invocation, Supervisor, Unavailable

    if not os.path.isfile(args.file):
        raise CliError(f"no such file: {args.file}")
    try:
        pset = load_profiles(args.profiles)
    except ProfileError as e:
        raise CliError(f"invalid profile: {e}") from None
    if args.profile not in pset.profiles:
        raise CliError(f"unknown profile {args.profile!r} (known: {', '.join(sorted(pset.profiles))})")
    profile = pset.profiles[args.profile]
    name = os.path.basename(args.file).split(".", 1)[0]
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
        doc = {k: v for k, v in vars(result).items() if k not in ("body", "output")}
        doc["body"] = result.body.decode("utf-8", "replace")
        doc["output"] = result.output.decode("utf-8", "replace")
        print(json.dumps(doc, indent=2))
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
    p.add_argument("-X", "--method")
    p.add_argument("-q", "--query", action="append", metavar="K=V")
    p.add_argument("-d", "--data", metavar="DATA|@FILE")
    p.add_argument("-H", "--header", action="append", metavar="NAME:VALUE")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fnbox", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("FNBOX_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--timeout", type=float, default=60.0)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("deploy", help="deploy a module file or a package folder")
    p.add_argument("file")
    p.add_argument("--name")
    p.set_defaults(fn=cmd_deploy)
    p = sub.add_parser("rollback", help="go back to the previous (or a given) version")
    p.add_argument("name")
    p.add_argument("--version", type=int)
    p.set_defaults(fn=cmd_rollback)
    p = sub.add_parser("rm", help="remove a function")
    p.add_argument("name")
    p.set_defaults(fn=cmd_rm)
    p = sub.add_parser("ls", help="list functions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("limits", help="a function's effective limits")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_limits)
    p = sub.add_parser("invoke", help="call a function over HTTP")
    p.add_argument("name")
    p.add_argument("path", nargs="?")
    p.add_argument("-i", "--include", action="store_true", help="print the status and headers")
    _request_options(p)
    p.set_defaults(fn=cmd_invoke)
    p = sub.add_parser("logs", help="a function's recent calls")
    p.add_argument("name")
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--follow", action="store_true")
    p.add_argument("--all-boards", action="store_true", help="the calls of every board (several boards)")
    p.set_defaults(fn=cmd_logs)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = sub.add_parser("check", help="validate the profiles folder and print every function's limits")
    p.add_argument("--profiles", default=os.environ.get("FNBOX_PROFILES_DIR", os.path.join(here, "sandbox_profiles")))
    p.add_argument("--functions", default=os.environ.get("FNBOX_FUNCTIONS_DIR", os.path.join(here, "functions")))
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("doctor", help="which sandbox layers are active on this machine")
    p.add_argument("--strict", action="store_true", help="exit 1 when any layer or check is DEGRADED")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_doctor)
    p = sub.add_parser("run", help="run FILE's main() once in the sandbox, no server needed")
    p.add_argument("file")
    p.add_argument("path", nargs="?")
    p.add_argument("--profile", default="strict")
    p.add_argument("--profiles", default=os.environ.get("FNBOX_PROFILES_DIR", os.path.join(here, "sandbox_profiles")))
    p.add_argument("--json", action="store_true")
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
        return 2
    except OSError as e:  # a local file: FILE, -d @FILE
        print(f"fnbox: {e.filename}: {e.strerror}" if e.filename else f"fnbox: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Renders ops/nginx/fnbox.conf: fills the placeholders, two of them computed from a profiles folder.

    python ops/render_nginx.py --listen 80 --upstream 127.0.0.1:8000 --profiles /opt/fnbox/sandbox_profiles -o OUT

Several boards (docs/cluster.md): --upstream once per board, or a comma list; each becomes one `server ADDR
max_fails=N fail_timeout=Ts;` line of the upstream (passive health checks: a board that fails is skipped for
fail_timeout). One board renders `server ADDR;` as it always did.

client_max_body_size is the largest max_request_kb of every profile and functions.toml override, and
proxy_read_timeout the largest timeout_s plus READ_TIMEOUT_MARGIN_S, so nginx never refuses or cuts off
something fnbox itself would accept (fnbox then answers with its own JSON error). Standard library only, plus
runner.profiles from this repository (the same validation as the server).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from runner.profiles import ProfileError, load_profiles  # noqa: E402

TEMPLATE = os.path.join(REPO, "ops", "nginx", "fnbox.conf")
READ_TIMEOUT_MARGIN_S = 30
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
# A value lands inside an nginx directive: refuse anything that could end it or start another one.
_SAFE = re.compile(r"^[^\s;{}'\"#$\\][^;{}'\"#$\\\r\n]*$")


def limits(profiles_dir: str) -> tuple[int, float]:
    """(largest max_request_kb, largest timeout_s) over the named profiles and the per-function overrides."""
    pset = load_profiles(profiles_dir)
    effective = list(pset.profiles.values()) + [pset.for_function(name) for name in pset.overrides]
    return max(p.max_request_kb for p in effective), max(p.timeout_s for p in effective)


def upstreams_of(items: Sequence[str]) -> list[str]:
    """Board addresses from --upstream values, each one address or a comma list: in order, without repeats."""
    out: list[str] = []
    for item in items:
        for addr in item.split(","):
            addr = addr.strip()
            if not addr or not _SAFE.match(addr) or any(c.isspace() for c in addr):
                raise ValueError(f"upstream: {addr!r} is not one address (host:port or unix:/path)")
            if addr in out:
                raise ValueError(f"upstream: {addr!r} given twice")
            out.append(addr)
    if not out:
        raise ValueError("upstream: no address given")
    return out


def render(template: str, listen: str, upstream: str | Sequence[str], server_name: str = "_",
           max_request_kb: int = 1024, max_timeout_s: float = 30, max_fails: int = 1,
           fail_timeout_s: int = 10) -> str:
    """The template filled in. `upstream`: one address, or a list of boards (one `server` line each, with
    max_fails and fail_timeout); a list of one renders as a single address does."""
    boards = upstreams_of([upstream] if isinstance(upstream, str) else list(upstream))
    if len(boards) > 1 and not (max_fails >= 1 and fail_timeout_s >= 1):
        raise ValueError("max_fails and fail_timeout must be at least 1 with several boards")
    servers = boards if len(boards) == 1 else [f"{b} max_fails={max_fails} fail_timeout={fail_timeout_s}s"
                                               for b in boards]
    values = {
        "LISTEN": listen,
        "SERVER_NAME": server_name,
        "UPSTREAM": servers[0],
        # 0 would mean "no limit" to nginx: a folder where no function accepts a body still gets a 1k cap.
        "CLIENT_MAX_BODY_SIZE": f"{max(1, max_request_kb)}k",
        "PROXY_READ_TIMEOUT": f"{math.ceil(max_timeout_s) + READ_TIMEOUT_MARGIN_S}s",
    }
    for key, value in values.items():
        if not _SAFE.match(value):
            raise ValueError(f"{key.lower()}: {value!r} is not a plain nginx value")
    lines = []
    for line in template.splitlines(keepends=True):
        if line.lstrip().startswith("#"):  # comments keep naming the placeholders they document
            lines.append(line)
            continue
        # The line naming @UPSTREAM@ (`server @UPSTREAM@;`) is written once per board.
        for server in servers if "@UPSTREAM@" in line else servers[:1]:
            out = line
            for key, value in dict(values, UPSTREAM=server).items():
                out = out.replace(f"@{key}@", value)
            left = _PLACEHOLDER.findall(out)
            if left:
                raise ValueError(f"placeholders left unfilled: {', '.join(left)}")
            lines.append(out)
    summary = ", ".join(f"{k.lower()}={','.join(boards) if k == 'UPSTREAM' else v}" for k, v in values.items())
    return f"# Rendered by ops/render_nginx.py: {summary}\n" + "".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="render_nginx.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--template", default=TEMPLATE)
    ap.add_argument("--listen", default="80")
    ap.add_argument("--server-name", default="_")
    ap.add_argument("--upstream", action="append",
                    help="a board's Gunicorn address (default: $FNBOX_BIND, else 127.0.0.1:8000); repeat it, or give "
                         "a comma list, for several boards")
    ap.add_argument("--max-fails", type=int, default=1,
                    help="several boards: failed attempts after which nginx skips a board (default 1)")
    ap.add_argument("--fail-timeout", type=int, default=10, metavar="SECONDS",
                    help="several boards: how long a failed board is skipped (default 10)")
    ap.add_argument("--profiles", default=os.environ.get("FNBOX_PROFILES_DIR", os.path.join(REPO, "sandbox_profiles")),
                    help="profiles folder the body size and read timeout are computed from")
    ap.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    args = ap.parse_args(argv)
    try:
        max_kb, max_timeout = limits(args.profiles)
    except ProfileError as e:
        print(f"render_nginx: invalid profiles: {e}", file=sys.stderr)
        return 1
    with open(args.template) as f:
        template = f.read()
    try:
        upstream = args.upstream or [os.environ.get("FNBOX_BIND", "127.0.0.1:8000")]
        text = render(template, args.listen, upstream, args.server_name, max_kb, max_timeout, args.max_fails,
                      args.fail_timeout)
    except ValueError as e:
        print(f"render_nginx: {e}", file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.write(text)
    else:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

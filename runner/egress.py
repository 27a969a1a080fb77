"""`network = true` is egress, not the host: a call's sockets may go out, never to the host itself.

A call with the network runs in the host's network namespace (the sandbox does not route or NAT a namespace
of its own: that needs ip_forward and MASQUERADE rules, global changes this project does not make on a shared
machine). What keeps it off the host is one nftables table per sandbox uid range, owned by fnbox:

    table inet fnbox_egress_<uid_base> {
        chain output { type filter hook output priority 0; policy accept;
            meta skuid <range> udp dport 53 accept              # the host's DNS resolver, if local
            meta skuid <range> tcp dport 53 accept
            meta skuid <range> oif "lo" reject                   # 127.0.0.0/8, ::1, and every local address
            meta skuid <range> fib daddr type local reject       #   (routed through lo)
            meta skuid <range> fib daddr type { broadcast, multicast } reject } }

It matches only packets of sockets owned by the sandbox uids, so nothing else of the machine is affected:
Gunicorn's port, the admin API, /metrics, Redis and every other local service refuse a call's connection
(ECONNREFUSED), while the rest of the network stays reachable. The table is created idempotently (replaced as
a whole, never touching other tables or rules) and deleted by remove().
"""

from __future__ import annotations

import shutil
import subprocess
import sys


class EgressError(RuntimeError):
    """nft is missing or refused the table: the egress layer is DEGRADED."""


def table_name(uid_base: int) -> str:
    return f"fnbox_egress_{uid_base}"


def ruleset(uid_base: int, slots: int) -> str:
    rng = f"{uid_base}-{uid_base + slots - 1}"
    name = table_name(uid_base)
    # "add" then "delete" then the full definition: idempotent in one atomic transaction.
    return f"""add table inet {name}
delete table inet {name}
table inet {name} {{
    chain output {{
        type filter hook output priority 0; policy accept;
        meta skuid {rng} udp dport 53 accept
        meta skuid {rng} tcp dport 53 accept
        meta skuid {rng} oif "lo" reject
        meta skuid {rng} fib daddr type local reject
        meta skuid {rng} fib daddr type {{ broadcast, multicast }} reject
    }}
}}
"""


def _nft(script: str, check_only: bool = False) -> None:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        out = subprocess.run([nft, *(["-c"] if check_only else []), "-f", "-"], input=script, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        raise EgressError(f"cannot run nft: {e}") from None
    if out.returncode != 0:
        raise EgressError(f"nft refused the egress table: {out.stderr.strip()[:500]}")


def install(uid_base: int, slots: int) -> None:
    _nft(ruleset(uid_base, slots))


def check(uid_base: int, slots: int) -> None:
    """Raises EgressError unless the kernel would accept the table (nft -c: nothing is changed)."""
    _nft(ruleset(uid_base, slots), check_only=True)


def install_or_warn(uid_base: int, slots: int) -> None:
    try:
        install(uid_base, slots)
    except EgressError as e:
        print(f"fnbox: WARNING: network=true calls can reach the host: {e}", file=sys.stderr)


def installed(uid_base: int) -> bool:
    nft = shutil.which("nft") or "/usr/sbin/nft"
    try:
        out = subprocess.run([nft, "list", "table", "inet", table_name(uid_base)], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def remove(uid_base: int) -> None:
    name = table_name(uid_base)
    try:
        _nft(f"add table inet {name}\ndelete table inet {name}\n")
    except EgressError:
        pass

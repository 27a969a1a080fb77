"""The console's settings: read from the environment once, validated here, frozen."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from runner.config import ConfigError, env_int

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(raw: str) -> tuple[Network, ...]:
    out = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"FNBOX_PLAYGROUND_ALLOW: {item!r} is not an address or a network") from None
    return tuple(out)


@dataclass(frozen=True)
class ConsoleConfig:
    admin_token: str | None  # signs in to the whole console (also the admin API's bearer token)
    password: str | None  # FNBOX_CONSOLE_PASSWORD: the whole console, for people who should not hold the token
    playground_token: str | None  # signs in to the playground alone
    playground_allow: tuple[Network, ...]  # clients that open the playground alone without any token
    playground_concurrency: int  # playground runs in flight at once, per server
    playground_rate: int  # playground runs per client per minute
    login_rate: int  # failed sign-ins per client per minute before 429
    session_hours: int  # a session ends after this long without use
    playground_profile: str = "strict"

    @property
    def enabled(self) -> bool:
        return bool(self.admin_token or self.password or self.playground_token or self.playground_allow)

    @property
    def admin_enabled(self) -> bool:
        return bool(self.admin_token or self.password)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ConsoleConfig:
        env = dict(os.environ if env is None else env)
        return cls(
            admin_token=env.get("FNBOX_ADMIN_TOKEN") or None,
            password=env.get("FNBOX_CONSOLE_PASSWORD") or None,
            playground_token=env.get("FNBOX_PLAYGROUND_TOKEN") or None,
            playground_allow=_networks(env.get("FNBOX_PLAYGROUND_ALLOW", "")),
            playground_concurrency=env_int(env, "FNBOX_PLAYGROUND_CONCURRENCY", 2, 1),
            playground_rate=env_int(env, "FNBOX_PLAYGROUND_RATE", 30, 1),
            login_rate=env_int(env, "FNBOX_CONSOLE_LOGIN_RATE", 5, 1),
            session_hours=env_int(env, "FNBOX_CONSOLE_SESSION_HOURS", 12, 1),
        )

    def status_line(self) -> str:
        """What the server says about the console at start."""
        if not self.enabled:
            return ("fnbox: web console off (set FNBOX_ADMIN_TOKEN, FNBOX_CONSOLE_PASSWORD or FNBOX_PLAYGROUND_TOKEN "
                    "to serve it at /console/)")
        parts = []
        if self.admin_enabled:
            parts.append("full console (" + " or ".join(
                n for n, v in (("admin token", self.admin_token), ("console password", self.password)) if v) + ")")
        if self.playground_token:
            parts.append("playground token")
        if self.playground_allow:
            parts.append("playground open to " + ", ".join(map(str, self.playground_allow)))
        return f"fnbox: web console on at /console/: {'; '.join(parts)}"

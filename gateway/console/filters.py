"""Small formatting helpers for the templates."""

from __future__ import annotations

import time

from gateway.console.blueprint import bp


@bp.app_template_filter("iso")
def iso(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


@bp.app_template_filter("utc")
def utc(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "—"


@bp.app_template_filter("ago")
def ago(t: float | None) -> str:
    if not t:
        return "never"
    s = max(0, time.time() - t)
    if s < 5:
        return "just now"
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{int(s // n)} {unit} ago"
    return f"{int(s)} s ago"


@bp.app_template_filter("ms")
def ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.1f} ms" if v >= 10 else f"{v:.2f} ms"


@bp.app_template_filter("kib")
def kib(v: int | None) -> str:
    if v is None:
        return "—"
    return f"{v / 1024:.1f} MiB"


@bp.app_template_filter("pct")
def pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:.0f} %" if v >= 0.1 or v == 0 else f"{v * 100:.1f} %"


def outcome_class(outcome: str | None) -> str:
    if outcome == "ok":
        return "ok"
    if outcome in ("busy", "unavailable", "not_found"):
        return "warn"
    return "bad"


bp.app_template_filter("oc")(outcome_class)

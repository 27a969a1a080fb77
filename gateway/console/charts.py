"""Charts as inline SVG markup, drawn on the server from history rows: no charting library, no script, and no
style attribute (colours come from classes in console.css, so dark mode recolours them)."""

from __future__ import annotations

import time

from markupsafe import Markup, escape


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** len(str(int(v)))  # a power of ten above v
    for step in (0.1, 0.2, 0.25, 0.5, 1.0):
        if v <= mag * step:
            return mag * step
    return float(mag)


def sparkline(values: list[float | None], label: str, width: int = 120, height: int = 28) -> Markup:
    """A small line of latencies; gaps where a bucket had no call."""
    present = [v for v in values if v is not None]
    if not present:
        return Markup(f'<svg class="spark empty" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
                      f'role="img" aria-label="{escape(label)}: no calls"><line x1="0" y1="{height - 1}" '
                      f'x2="{width}" y2="{height - 1}"/></svg>')
    top = max(present) or 1.0
    step = width / max(1, len(values) - 1)
    segments, cur = [], []
    for i, v in enumerate(values):
        if v is None:
            if cur:
                segments.append(cur)
            cur = []
            continue
        cur.append(f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}")
    if cur:
        segments.append(cur)
    lines = "".join(f'<polyline points="{" ".join(s)}"/>' if len(s) > 1 else
                    f'<circle cx="{s[0].split(",")[0]}" cy="{s[0].split(",")[1]}" r="1.5"/>' for s in segments)
    return Markup(f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
                  f'aria-label="{escape(label)}"><title>{escape(label)}</title>{lines}</svg>')


def line_chart(series: dict[str, list[float | None]], starts: list[float], unit: str, label: str,
               width: int = 420, height: int = 180, bars: bool = False) -> Markup:
    """One or more series over time buckets (`starts`: each bucket's start, epoch seconds). bars=True draws the
    first series as bars (counts), the others as lines on top."""
    left, right, top, bottom = 40, 8, 8, 20
    pw, ph = width - left - right, height - top - bottom
    n = max(1, len(starts))
    vmax = _nice_max(max([v for vs in series.values() for v in vs if v is not None] or [0]))
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
             f'<title>{escape(label)}</title>']
    for i in range(5):  # horizontal grid and y labels
        y = top + ph - ph * i / 4
        parts.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}"/>'
                     f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{_fmt(vmax * i / 4)}</text>')
    for i in range(0, n, max(1, n // 5)):  # x labels: local time of the bucket start
        x = left + pw * (i + 0.5) / n
        parts.append(f'<text class="axis" x="{x:.1f}" y="{height - 6}" text-anchor="middle">'
                     f'{time.strftime("%H:%M", time.localtime(starts[i]))}</text>')
    for k, (name, values) in enumerate(series.items()):
        cls = f"s{k % 8}"
        if bars and k == 0:
            bw = max(1.0, pw / n - 1)
            for i, v in enumerate(values):
                if v:
                    h = ph * v / vmax
                    parts.append(f'<rect class="bar {cls}" x="{left + pw * i / n:.1f}" y="{top + ph - h:.1f}" '
                                 f'width="{bw:.1f}" height="{h:.1f}"><title>{escape(name)}: {_fmt(v)} {unit}'
                                 f'</title></rect>')
            continue
        pts, segs = [], []
        for i, v in enumerate(values):
            if v is None:
                if pts:
                    segs.append(pts)
                pts = []
                continue
            pts.append(f"{left + pw * (i + 0.5) / n:.1f},{top + ph - ph * v / vmax:.1f}")
        if pts:
            segs.append(pts)
        for s in segs:
            if len(s) == 1:
                x, y = s[0].split(",")
                parts.append(f'<circle class="dot {cls}" cx="{x}" cy="{y}" r="2.5"/>')
            else:
                parts.append(f'<polyline class="line {cls}" points="{" ".join(s)}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))

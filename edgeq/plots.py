"""Inline SVG plots for the reports: a scatter and horizontal bars, drawn as plain markup (no script, no
network), so a page opens anywhere. Non-finite values are left out; every mark carries a ``<title>`` tooltip."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

WIDTH, HEIGHT, PAD = 640, 360, 56
BAR_HEIGHT, LABEL_WIDTH = 14, 220


@dataclass(frozen=True)
class Style:
    color: str
    radius: float
    legend: str


def _axis_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    return (lo - 1, hi + 1) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))


def scatter(points: list[tuple[float, float, str, str]], styles: dict[str, Style], x_label: str, y_label: str,
            line: str | None = None) -> str:
    """Points (x, y, style name, tooltip); ``line``: a style whose points are also joined in x order."""
    finite = [p for p in points if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not finite:
        return "<p>nothing to plot</p>"
    x0, x1 = _axis_range([p[0] for p in finite])
    y0, y1 = _axis_range([p[1] for p in finite])

    def sx(x):
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y):
        return HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-size="11">',
             (f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="none" '
              'stroke="#999"/>')]
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{sx(xv):.1f}" y="{HEIGHT - PAD + 14}" text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{PAD - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.1f}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">{html.escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{HEIGHT / 2}" transform="rotate(-90 14 {HEIGHT / 2})" text-anchor="middle">'
                 f'{html.escape(y_label)}</text>')
    joined = sorted((x, y) for x, y, style, _ in finite if style == line)
    if len(joined) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in joined)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{styles[line].color}" stroke-dasharray="4 3"/>')
    for x, y, style, label in finite:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{styles[style].radius}" '
                     f'fill="{styles[style].color}" fill-opacity="0.8"><title>{html.escape(label)}</title></circle>')
    for i, style in enumerate(styles.values()):
        parts.append(f'<circle cx="{PAD + 10 + 130 * i}" cy="{PAD - 16}" r="{style.radius}" fill="{style.color}"/>'
                     f'<text x="{PAD + 20 + 130 * i}" y="{PAD - 12}">{html.escape(style.legend)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bars(rows: list[tuple[str, dict[str, float]]], series: dict[str, str], x_label: str) -> str:
    """Horizontal bars, one group per row (label, {series name: value}); ``series``: name → color."""
    values = [v for _, figures in rows for v in figures.values() if math.isfinite(v)]
    if not values:
        return "<p>nothing to plot</p>"
    top = max(values) or 1.0
    step = BAR_HEIGHT * len(series) + 6
    height = PAD + step * len(rows) + 30
    span = WIDTH - LABEL_WIDTH - PAD
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-size="11">']
    for i, (name, color) in enumerate(series.items()):
        parts.append(f'<rect x="{LABEL_WIDTH + 130 * i}" y="{PAD - 26}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{LABEL_WIDTH + 14 + 130 * i}" y="{PAD - 17}">{html.escape(name)}</text>')
    for row, (label, figures) in enumerate(rows):
        y = PAD + row * step
        short = label if len(label) <= 34 else label[:15] + "…" + label[-18:]
        parts.append(f'<text x="{LABEL_WIDTH - 6}" y="{y + BAR_HEIGHT * len(series) / 2 + 4}" text-anchor="end">'
                     f'<title>{html.escape(label)}</title>{html.escape(short)}</text>')
        for i, (name, color) in enumerate(series.items()):
            value = figures.get(name, math.nan)
            if not math.isfinite(value):
                continue
            parts.append(f'<rect x="{LABEL_WIDTH}" y="{y + i * BAR_HEIGHT}" width="{max(value / top * span, 1):.1f}" '
                         f'height="{BAR_HEIGHT - 2}" fill="{color}"><title>{html.escape(label)} · {name}: '
                         f'{value:.4g}</title></rect>')
    parts.append(f'<text x="{LABEL_WIDTH + span / 2}" y="{height - 8}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text></svg>')
    return "".join(parts)

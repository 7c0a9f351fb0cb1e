"""``report.html``: the mixed-precision result on one page — the Pareto plot and the per-layer table.

The page is drawn from the manifest's ``mixed`` section (the same data in JSON) as plain HTML with an inline
SVG plot, so it opens anywhere without scripts or network. Plot: fidelity (SQNR of the worst output, dB) against
latency (ms; model bytes where latency was not measured) for the predicted frontier, every measured build,
uniform int8, and the delivered point marked.
"""

from __future__ import annotations

import html
import math

WIDTH, HEIGHT, PAD = 640, 360, 56


def _svg(points: list[tuple[float, float, str, str]], x_label: str) -> str:
    finite = [(x, y) for x, y, _, _ in points if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        return "<p>nothing to plot</p>"
    xs, ys = [p[0] for p in finite], [p[1] for p in finite]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 1, x1 + 1) if x1 == x0 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = (y0 - 1, y1 + 1) if y1 == y0 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))

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
                 'SQNR of the worst output (dB)</text>')
    frontier = sorted((x, y) for x, y, kind, _ in points if kind == "frontier" and math.isfinite(y))
    if len(frontier) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in frontier)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#89b" stroke-dasharray="4 3"/>')
    style = {"frontier": ("#89b", 3), "measured": ("#333", 4), "int8": ("#c60", 5), "chosen": ("#d00", 7)}
    for x, y, kind, label in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        color, radius = style[kind]
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{radius}" fill="{color}" fill-opacity="0.8">'
                     f'<title>{html.escape(label)}</title></circle>')
    legend = [("frontier", "predicted frontier"), ("measured", "measured build"), ("int8", "uniform int8"),
              ("chosen", "delivered")]
    for i, (kind, text) in enumerate(legend):
        color, radius = style[kind]
        parts.append(f'<circle cx="{PAD + 10 + 130 * i}" cy="{PAD - 16}" r="{radius}" fill="{color}"/>'
                     f'<text x="{PAD + 20 + 130 * i}" y="{PAD - 12}">{text}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _db(nsr: float) -> float:
    return -10 * math.log10(nsr) if nsr > 0 else math.inf


def render(mixed: dict, title: str) -> str:
    """The report page for a manifest's ``mixed`` section."""
    by_ms = mixed["x_axis"] == "ms"

    def unit(figures: dict) -> float:
        return figures["ms"] if by_ms else figures["bytes"] / 1e6

    points = [(unit(p["predicted"]), _db(p["predicted"]["nsr"]), "frontier", f"predicted: {p['precisions']}")
              for p in mixed["frontier"]]
    points += [(unit(it["measured"]), it["measured"]["sqnr_db"], "measured",
                f"iteration {it['iteration']}: {it['precisions']}") for it in mixed["iterations"]]
    points.append((unit(mixed["uniform_int8"]), mixed["uniform_int8"]["sqnr_db"], "int8", "uniform int8"))
    chosen = mixed["chosen"]
    points.append((unit(chosen), chosen["sqnr_db"], "chosen", f"delivered: {chosen['precisions']}"))
    rows = []
    total_ms = sum(g["ms"] or 0.0 for g in mixed["groups"]) or 1.0
    for g in mixed["groups"]:
        sens = ", ".join(f"{p} {_db(v):.1f}" for p, v in g["nsr"].items() if p != "float")
        share = f"{(g['ms'] or 0.0) / total_ms:.1%}" if g["ms"] is not None else "–"
        rows.append(f"<tr><td>{html.escape(g['name'])}</td><td>{html.escape(g['op_type'])}</td>"
                    f"<td><b>{g['precision']}</b></td><td>{sens}</td><td>{share}</td><td>{g['bytes']:,}</td></tr>")
    iterations = "".join(
        f"<tr><td>{it['iteration']}</td><td>{html.escape(str(it['precisions']))}</td>"
        f"<td>{it['predicted']['drop']:.4g} / {it['measured']['drop']:.4g}</td>"
        f"<td>{_fmt(it['predicted']['ms'])} / {_fmt(it['measured']['ms'])}</td>"
        f"<td>{it['predicted']['bytes']:,} / {it['measured']['bytes']:,}</td>"
        f"<td>{html.escape(str(it['met']))}</td></tr>" for it in mixed["iterations"])
    x_label = "latency, median (ms)" if by_ms else "model size (MB; latency not measured)"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:2px 8px;font-size:13px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Delivered: {html.escape(str(chosen['precisions']))} · drop {chosen['drop']:.4g} · SQNR {chosen['sqnr_db']:.1f} dB
· {_fmt(chosen['ms'])} ms (float {_fmt(mixed['float']['ms'])} ms, uniform int8 {_fmt(mixed['uniform_int8']['ms'])} ms)
· {chosen['bytes'] / 1e6:.2f} MB (float {mixed['float']['bytes'] / 1e6:.2f} MB).
The same data is in <code>manifest.json</code> under <code>mixed</code>.</p>
{_svg(points, x_label)}
<h2>Search iterations (predicted / measured)</h2>
<table><tr><th>#</th><th>precisions</th><th>drop</th><th>ms</th><th>bytes</th><th>budgets met</th></tr>
{iterations}</table>
<h2>Per layer group</h2>
<table><tr><th>group</th><th>op</th><th>precision</th><th>sensitivity (SQNR dB alone)</th><th>share of group
latency</th><th>bytes</th></tr>
{''.join(rows)}</table></body></html>
"""


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"

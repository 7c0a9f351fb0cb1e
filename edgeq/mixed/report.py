"""The mixed-precision section of ``report.html`` (:mod:`edgeq.report`): the Pareto plot and the per-layer table.

Drawn from the manifest's ``mixed`` part (the same data in JSON). Plot: fidelity (SQNR of the worst output, dB)
against latency (ms; model bytes where latency was not measured) for the predicted frontier, every measured
build, uniform int8, and the delivered point marked.
"""

from __future__ import annotations

import html
import math

from edgeq.plots import Style, scatter

STYLES = {"frontier": Style("#89b", 3, "predicted frontier"), "measured": Style("#333", 4, "measured build"),
          "int8": Style("#c60", 5, "uniform int8"), "chosen": Style("#d00", 7, "delivered")}


def _db(nsr: float) -> float:
    return -10 * math.log10(nsr) if nsr > 0 else math.inf


def section(mixed: dict) -> str:
    """The report's section for a manifest's ``mixed`` part: the plot, the iterations, the groups."""
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
    return f"""<h2>Mixed precision</h2>
<p>Delivered: {html.escape(str(chosen['precisions']))} · drop {chosen['drop']:.4g} · SQNR {chosen['sqnr_db']:.1f} dB
· {_fmt(chosen['ms'])} ms (float {_fmt(mixed['float']['ms'])} ms, uniform int8 {_fmt(mixed['uniform_int8']['ms'])} ms)
· {chosen['bytes'] / 1e6:.2f} MB (float {mixed['float']['bytes'] / 1e6:.2f} MB).</p>
{scatter(points, STYLES, x_label, "SQNR of the worst output (dB)", line="frontier")}
<h3>Search iterations (predicted / measured)</h3>
<table><tr><th>#</th><th>precisions</th><th>drop</th><th>ms</th><th>bytes</th><th>budgets met</th></tr>
{iterations}</table>
<h3>Per layer group</h3>
<table><tr><th>group</th><th>op</th><th>precision</th><th>sensitivity (SQNR dB alone)</th><th>share of group
latency</th><th>bytes</th></tr>
{''.join(rows)}</table>
"""


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"

"""``report.html``, written beside every artifact: what was delivered and why, on one self-contained page.

Rules:
- The page is drawn from the manifest alone (the same data in JSON), as HTML with inline SVG: no script, no
  stylesheet or font from elsewhere, so it opens anywhere, offline.
- Sections, each shown where the manifest has its data (a TVM build or a replay measured less):
  1. summary — delivered precision and why, latency float vs delivered, bytes, the fidelity guard's verdict;
  2. outputs — each output's kind, figures and the guard's checks;
  3. candidates — every build the search measured (:mod:`edgeq.search`): latency ratio against SQNR, by
     strategy, the chosen ones marked, and the list;
  4. time — float vs delivered kernel time of the costliest nodes, and the share of each op type;
  5. layers — each compute layer's precision, why, its float and int8 time, and its error contribution (its
     SQNR alone in int8, from the guard's sensitivity table);
  6. mixed precision (:mod:`edgeq.mixed.report`), for ``--scheme mixed``.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict

from edgeq.mixed import report as mixed_report
from edgeq.plots import Style, bars, scatter

TOP_NODES = 25
TOP_OP_TYPES = 12
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PALETTE = ("#36c", "#c60", "#393", "#939", "#c33", "#088", "#886")
_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}}.met,.ok{{color:#080}}
.missed,.flagged{{color:#c00}}
</style></head><body>
<h1>{title}</h1>
{body}
<p>The same data is in <code>{data}</code>.</p></body></html>
"""


def page(title: str, body: str, data: str) -> str:
    """A self-contained page (no script, no link) whose figures all come from the JSON file ``data``."""
    return _PAGE.format(title=escape(title), body=body, data=escape(data))


def escape(value) -> str:
    return html.escape(str(value))


def figure(value, digits: int = 4) -> str:
    """A figure as the manifest holds it (JSON writes infinities as the strings "inf", "-inf")."""
    if value is None:
        return "–"
    value = float(value)
    return f"{value:.{digits}g}" if math.isfinite(value) else ("∞" if value > 0 else "−∞")


def _verdict(met: bool) -> str:
    return f'<span class="{"met" if met else "missed"}">{"held" if met else "missed"}</span>'


def _summary(manifest: dict) -> str:
    delivered, latency = manifest["delivered"], manifest.get("latency") or {}
    items = [f"<b>{escape(delivered['precision'])}</b> for {escape(manifest['target']['name'])}"]
    if delivered.get("reason"):
        items.append(escape(delivered["reason"]))
    timed = {name: figures["median_ms"] for name, figures in latency.items()
             if isinstance(figures, dict) and "median_ms" in figures}
    items.append("latency (median): " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in timed.items())
                 + (f", ratio {latency['ratio']:.2f}" if isinstance(latency.get("ratio"), float) else "")
                 if timed else "latency not measured")
    items.append(f"{delivered['bytes'] / 1e6:.2f} MB (float {delivered['float_bytes'] / 1e6:.2f} MB)")
    guard = (manifest.get("fidelity") or {}).get("guard")
    if guard is not None:
        items.append(f"fidelity guard {_verdict(guard['met'])}")
    budget = manifest.get("budget")
    if budget:
        items.append(f"budget {_verdict(budget.get('met', False))}")
    return "<h2>Summary</h2><ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _outputs(manifest: dict) -> str:
    fidelity = manifest.get("fidelity")
    if not fidelity:
        return ""
    checks = (fidelity.get("guard") or {}).get("outputs", {})
    rows = []
    for name, out in fidelity["outputs"].items():
        guard = "; ".join(f"{c['figure']} {figure(c['value'])} ≥ {c['min']:g} {_verdict(c['met'])}"
                          for c in checks.get(name, {}).get("checks", []))
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(out.get('kind', ''))}</td><td>{figure(out.get('cosine'), 6)}</td>"
                    f"<td>{figure(out.get('sqnr_db'))}</td><td>{figure(out.get('decision_agreement'))}</td>"
                    f"<td>{figure(out.get('sequence_agreement'))}</td><td>{guard or '–'}</td></tr>")
    return (f"<h2>Outputs (on {fidelity.get('feeds', '?')} feeds)</h2><table><tr><th>output</th><th>kind</th>"
            "<th>cosine</th><th>SQNR dB</th><th>decision agreement</th><th>sequence agreement</th>"
            "<th>guard</th></tr>" + "".join(rows) + "</table>")


def _candidates(manifest: dict) -> str:
    trials = (manifest.get("search") or {}).get("trials") or []
    if not trials:
        return ""
    strategies = list(dict.fromkeys(t["strategy"] for t in trials))
    styles = {s: Style(_PALETTE[i % len(_PALETTE)], 4, s) for i, s in enumerate(strategies)}
    styles["chosen"] = Style("#d00", 7, "chosen")
    points = [(t["ratio"], float(t.get("sqnr_db", math.nan)), "chosen" if t["chosen"] else t["strategy"],
               f"{t['strategy']}: {t['label']}") for t in trials if t.get("ratio") is not None]
    rows = "".join(
        f"<tr><td>{i}</td><td>{escape(t['strategy'])}</td><td>{escape(t['label'])}</td><td>{figure(t.get('ratio'), 3)}</td>"
        f"<td>{figure(t.get('sqnr_db'))}</td><td>{escape(t.get('guard_met', '–'))}</td>"
        f"<td>{'✓' if t['chosen'] else ''}</td></tr>" for i, t in enumerate(trials, start=1))
    plot = scatter(points, styles, "latency vs float (median ratio)", "SQNR of the worst output (dB)") \
        if points else "<p>no candidate was timed</p>"
    return (f"<h2>Candidates ({len(trials)} measured builds)</h2>{plot}<table><tr><th>#</th><th>strategy</th>"
            "<th>candidate</th><th>latency ratio</th><th>SQNR dB</th><th>guard</th><th>chosen</th></tr>"
            + rows + "</table>")


def _time(manifest: dict) -> str:
    nodes = manifest.get("per_node") or []
    if not nodes:
        return ""
    delivered = "int8" if manifest["delivered"]["precision"] != "float" else "float"
    costly = sorted(nodes, key=lambda n: -max(n["float_ms"] or 0.0, n["int8_ms"] or 0.0))[:TOP_NODES]
    node_rows = [(n["node"], {"float": n["float_ms"] or 0.0, "int8": n["int8_ms"] or 0.0}) for n in costly]
    by_type: dict[str, dict[str, float]] = defaultdict(lambda: {"float": 0.0, "int8": 0.0})
    for n in nodes:
        op = n["op_type"] or "(fused by ONNX Runtime)"
        by_type[op]["float"] += n["float_ms"] or 0.0
        by_type[op]["int8"] += n["int8_ms"] or 0.0
    totals = {k: sum(t[k] for t in by_type.values()) or 1.0 for k in ("float", "int8")}
    shares = sorted(((op, {k: 100 * t[k] / totals[k] for k in t}) for op, t in by_type.items()),
                    key=lambda row: -max(row[1].values()))[:TOP_OP_TYPES]
    colors = {"float": "#89b", "int8": "#c60"}
    return (f"<h2>Time per node (float vs the int8 build; delivered: {delivered})</h2><p>Kernel time per run from "
            "ONNX Runtime's profiler, "
            "fused kernels mapped back to the nodes they were made from; the int8 build's Q/DQ count for the node "
            f"they serve. The {len(costly)} costliest of {len(nodes)} nodes:</p>"
            + bars(node_rows, colors, "ms per run") + "<h3>Share of time by op type</h3>"
            + bars(shares, colors, "% of the model's kernel time"))


def _layers(manifest: dict) -> str:
    decisions = (manifest.get("quantization") or {}).get("decisions") or {}
    layers = {name: d for name, d in decisions.items() if d["op_type"] in LAYER_OPS}
    if not layers:
        return ""
    times = {n["node"]: n for n in manifest.get("per_node") or []}
    nsr = (manifest.get("guard") or {}).get("sensitivity") or {}
    float_groups = set((manifest.get("guard") or {}).get("float_groups") or [])
    rows = []
    for name, d in layers.items():
        t = times.get(name, {})
        alone = nsr.get(name)
        error = "–" if alone is None else f"{-10 * math.log10(alone):.1f}" if alone > 0 else "∞"
        why = d.get("reason", "") + (" (returned to float by the fidelity guard)" if name in float_groups else "")
        rows.append(f"<tr><td>{escape(name)}</td><td>{escape(d['op_type'])}</td><td><b>{escape(d['precision'])}</b></td>"
                    f"<td>{escape(why)}</td><td>{figure(t.get('float_ms'), 3)}</td><td>{figure(t.get('int8_ms'), 3)}</td>"
                    f"<td>{error}</td></tr>")
    counts = defaultdict(int)
    for d in layers.values():
        counts[d["precision"]] += 1
    summary = ", ".join(f"{p} {n}" for p, n in sorted(counts.items()))
    return (f"<h2>Layers ({summary})</h2><table><tr><th>layer</th><th>op</th><th>precision</th><th>why</th>"
            "<th>float ms</th><th>int8 ms</th><th>SQNR dB alone in int8</th></tr>" + "".join(rows) + "</table>")


def render(manifest: dict, title: str) -> str:
    """The report page of one artifact's manifest."""
    parts = [_summary(manifest), _outputs(manifest), _candidates(manifest), _time(manifest), _layers(manifest)]
    if manifest.get("mixed"):
        parts.append(mixed_report.section(manifest["mixed"]))
    return page(title, "\n".join(p for p in parts if p), "manifest.json")

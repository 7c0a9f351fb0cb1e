"""``report.html`` of ``edgeq profile``: the profile as one self-contained page, drawn from ``profile.json``
alone, as HTML with inline SVG (:mod:`edgeq.plots`): no script, nothing fetched, so it opens anywhere, offline.

Sections: where (device, target, runtime, feeds); latency of each model with the conditions it was measured in
(flagged or not); the costliest nodes (both models side by side when comparing) and, when comparing, the table
joining them by name; the share of each op type.
"""

from __future__ import annotations

import html
import math

from edgeq.plots import bars

TOP_NODES = 25
TOP_OP_TYPES = 12
TABLE_ROWS = 60
_COLORS = ("#89b", "#c60")
_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}}.ok{{color:#080}}.flagged{{color:#c00}}
</style></head><body>
<h1>{title}</h1>
{body}
<p>The same data is in <code>profile.json</code>.</p></body></html>
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}g}"


def _where(profile: dict) -> str:
    device, feeds = profile["device"], profile["feeds"]
    items = [f"device <b>{_e(device['address'])}</b>: {_e(device.get('cpu_model') or '?')} "
             f"({_e(device['arch'])}, {_e(device.get('cores') or '?')} cores), ONNX Runtime "
             f"{_e(device.get('onnxruntime') or '–')}" + (f", TVM {_e(device['tvm'])}" if device.get("tvm") else ""),
             f"target <b>{_e(profile['target'])}</b>, runtime <b>{_e(profile['runtime'])}</b>",
             "feed: " + ("random inputs" if feeds["random"] else _e(feeds.get("path")))
             + " (" + ", ".join(f"{_e(name)} {_e(spec['dtype'])}[{','.join(map(str, spec['shape']))}]"
                                for name, spec in feeds["inputs"].items()) + ")",
             ("nodes are ONNX node names (ONNX Runtime's kernels mapped back through its fusions)"
              if profile["names"] == "onnx-nodes" else "nodes are TVM's fused kernels; op type is the fused pattern")
             + f"; profiled over up to {profile['runs']} runs"]
    if profile.get("tvm_database"):
        items.append(f"tuned schedules from {_e(profile['tvm_database'])}")
    return "<h2>Where</h2><ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _conditions(latency: dict) -> str:
    c = latency.get("conditions")
    if not c:
        return "not recorded"
    verdict = (f'<span class="flagged">flagged: {_e(", ".join(c.get("flags") or []))}</span>' if c.get("flagged")
               else '<span class="ok">not flagged</span>')
    after = c.get("after") or {}
    details = [f"foreign load {_num(c.get('foreign_load_cores'), 2)} cores",
               f"governor {_e(after.get('governor') or '–')}",
               f"{_num(after.get('temperature_c'), 3)} °C", f"tries {_e(c.get('tries', 1))}"]
    return verdict + " · " + ", ".join(details)


def _latency(profile: dict) -> str:
    base = profile["models"][profile["model"]]["latency"]["median_ms"]
    rows = []
    for label, model in profile["models"].items():
        lat = model["latency"]
        ratio = f"{lat['median_ms'] / base:.2f}" if base > 0 else "–"
        rows.append(f"<tr><td>{_e(label)}</td><td>{_num(lat['min_ms'])}</td><td>{_num(lat['median_ms'])}</td>"
                    f"<td>{_num(lat['p90_ms'])}</td><td>{lat['runs']}</td>"
                    f"<td>{ratio}</td>"
                    f"<td>{_num(model['total_ms'])}</td><td>{_conditions(lat)}</td></tr>")
    interleaved = " (interleaved in one run: the ratio is meaningful)" if len(rows) > 1 else ""
    return (f"<h2>Latency{interleaved}</h2><table><tr><th>model</th><th>min ms</th><th>median ms</th><th>p90 ms</th>"
            "<th>runs</th><th>ratio</th><th>kernel ms/run (profiled)</th><th>conditions</th></tr>" + "".join(rows)
            + "</table>")


def _nodes(profile: dict) -> str:
    labels = list(profile["models"])
    series = dict(zip(labels, _COLORS))
    times = {label: {n["name"]: n["ms"] for n in profile["models"][label]["nodes"]} for label in labels}
    names = sorted(dict.fromkeys(name for label in labels for name in times[label]),
                   key=lambda name: -max(times[label].get(name, 0.0) for label in labels))
    shown = names[:TOP_NODES]
    rows = [(name, {label: times[label][name] for label in labels if name in times[label]}) for name in shown]
    kind = "nodes" if profile["names"] == "onnx-nodes" else "TVM kernels"
    part = (f"<h2>Costliest {kind}</h2><p>Kernel time per run; the {len(shown)} costliest of {len(names)}:</p>"
            + bars(rows, series, "ms per run"))
    compare = profile.get("compare")
    if compare:
        first, second = compare["model"], compare["with"]
        lines = "".join(
            f"<tr><td>{_e(r['name'])}</td><td>{_e(r['op_types'].get(first, '–'))}</td>"
            f"<td>{_num(r['ms'][first])}</td><td>{_e(r['op_types'].get(second, '–'))}</td>"
            f"<td>{_num(r['ms'][second])}</td><td>{_num(r['ratio'], 3)}</td></tr>"
            for r in compare["nodes"][:TABLE_ROWS])
        more = f" (the {TABLE_ROWS} costliest of {len(compare['nodes'])})" if len(compare["nodes"]) > TABLE_ROWS else ""
        part += (f"<h3>{_e(second)} against {_e(first)}, node by node{more}</h3><p>latency ratio (median): "
                 f"{_num(compare['latency_ratio'], 3)}</p><table><tr><th>{kind[:-1]}</th>"
                 f"<th>op type in {_e(first)}</th><th>ms</th><th>op type in {_e(second)}</th><th>ms</th>"
                 "<th>ratio</th></tr>" + lines + "</table>")
    return part


def _op_types(profile: dict) -> str:
    labels = list(profile["models"])
    shares: dict[str, dict[str, float]] = {}
    for label in labels:
        model = profile["models"][label]
        total = model["total_ms"] or 1.0
        for op, ms in model["op_types"].items():
            shares.setdefault(op, {})[label] = 100 * ms / total
    rows = sorted(shares.items(), key=lambda row: -max(row[1].values()))[:TOP_OP_TYPES]
    return "<h2>Share of time by op type</h2>" + bars(rows, dict(zip(labels, _COLORS)), "% of the model's kernel time")


def render(profile: dict) -> str:
    """The page of one profile (as ``profile.json`` holds it)."""
    labels = list(profile["models"])
    title = f"edgeq profile: {' vs '.join(labels)} on {profile['target']} ({profile['runtime']})"
    body = "\n".join([_where(profile), _latency(profile), _nodes(profile), _op_types(profile)])
    return _PAGE.format(title=_e(title), body=body)

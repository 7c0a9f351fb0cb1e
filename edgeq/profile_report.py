"""``report.html`` of ``edgeq profile``: the profile as one self-contained page, drawn from ``profile.json``
alone, as HTML with inline SVG (:mod:`edgeq.plots`): no script, nothing fetched, so it opens anywhere, offline.

Sections: where (device, target, runtime, feeds); latency of each model with the conditions it was measured in
(flagged or not); the costliest nodes (both models side by side when comparing) and, when comparing, the table
joining them by name; the share of each op type.
"""

from __future__ import annotations


from edgeq.plots import bars
from edgeq.report import escape, figure, page

TOP_NODES = 25
TOP_OP_TYPES = 12
TABLE_ROWS = 60
_COLORS = ("#89b", "#c60")
def _where(profile: dict) -> str:
    device, feeds = profile["device"], profile["feeds"]
    items = [f"device <b>{escape(device['address'])}</b>: {escape(device.get('cpu_model') or '?')} "
             f"({escape(device['arch'])}, {escape(device.get('cores') or '?')} cores), ONNX Runtime "
             f"{escape(device.get('onnxruntime') or '–')}" + (f", TVM {escape(device['tvm'])}" if device.get("tvm") else ""),
             f"target <b>{escape(profile['target'])}</b>, runtime <b>{escape(profile['runtime'])}</b>",
             "feed: " + ("random inputs" if feeds["random"] else escape(feeds.get("path")))
             + " (" + ", ".join(f"{escape(name)} {escape(spec['dtype'])}[{','.join(map(str, spec['shape']))}]"
                                for name, spec in feeds["inputs"].items()) + ")",
             ("nodes are ONNX node names (ONNX Runtime's kernels mapped back through its fusions)"
              if profile["names"] == "onnx-nodes" else "nodes are TVM's fused kernels; op type is the fused pattern")
             + f"; profiled over up to {profile['runs']} runs"]
    if profile.get("tvm_database"):
        items.append(f"tuned schedules from {escape(profile['tvm_database'])}")
    return "<h2>Where</h2><ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _conditions(latency: dict) -> str:
    c = latency.get("conditions")
    if not c:
        return "not recorded"
    verdict = (f'<span class="flagged">flagged: {escape(", ".join(c.get("flags") or []))}</span>' if c.get("flagged")
               else '<span class="ok">not flagged</span>')
    after = c.get("after") or {}
    details = [f"foreign load {figure(c.get('foreign_load_cores'), 2)} cores",
               f"governor {escape(after.get('governor') or '–')}",
               f"{figure(after.get('temperature_c'), 3)} °C", f"tries {escape(c.get('tries', 1))}"]
    return verdict + " · " + ", ".join(details)


def _latency(profile: dict) -> str:
    base = profile["models"][profile["model"]]["latency"]["median_ms"]
    rows = []
    for label, model in profile["models"].items():
        lat = model["latency"]
        ratio = f"{lat['median_ms'] / base:.2f}" if base > 0 else "–"
        rows.append(f"<tr><td>{escape(label)}</td><td>{figure(lat['min_ms'])}</td><td>{figure(lat['median_ms'])}</td>"
                    f"<td>{figure(lat['p90_ms'])}</td><td>{lat['runs']}</td>"
                    f"<td>{ratio}</td>"
                    f"<td>{figure(model['total_ms'])}</td><td>{_conditions(lat)}</td></tr>")
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
            f"<tr><td>{escape(r['name'])}</td><td>{escape(r['op_types'].get(first, '–'))}</td>"
            f"<td>{figure(r['ms'][first])}</td><td>{escape(r['op_types'].get(second, '–'))}</td>"
            f"<td>{figure(r['ms'][second])}</td><td>{figure(r['ratio'], 3)}</td></tr>"
            for r in compare["nodes"][:TABLE_ROWS])
        more = f" (the {TABLE_ROWS} costliest of {len(compare['nodes'])})" if len(compare["nodes"]) > TABLE_ROWS else ""
        part += (f"<h3>{escape(second)} against {escape(first)}, node by node{more}</h3><p>latency ratio (median): "
                 f"{figure(compare['latency_ratio'], 3)}</p><table><tr><th>{kind[:-1]}</th>"
                 f"<th>op type in {escape(first)}</th><th>ms</th><th>op type in {escape(second)}</th><th>ms</th>"
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
    return page(title, body, "profile.json")

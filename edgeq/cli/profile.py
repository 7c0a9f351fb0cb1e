"""``edgeq profile``: per-node times of a model (and of a second one beside it) on the device, written to a
folder as ``profile.json`` and ``report.html`` (:mod:`edgeq.profile`)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from edgeq.cli.app import RichReporter, debug_option, default_cache_dir, err, main, out

TOP = 10


@main.command()
@debug_option
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", required=True)
@click.option("--device", help="local, ssh://[user@]host[:port][/python] or rpc://TRACKER_HOST:PORT/KEY "
              "(--runtime tvm: local only). Default: the target's.")
@click.option("--feeds", type=click.Path(path_type=Path), help="Feeds for the runs: the first is used "
              "(default: random inputs).")
@click.option("--compare", type=click.Path(path_type=Path),
              help="A second model (e.g. MODEL's int8 build) measured interleaved with MODEL and joined node by node.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "tvm"]), default="onnxruntime", show_default=True,
              help="tvm: build each model with TVM first (tuned schedules from the tuning database where it has "
                   "them) and profile its kernels.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Profiled runs per model (ONNX Runtime: at most this many, about a second of them).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("profile"), show_default=True,
              help="Folder for profile.json and report.html (new, empty, or an earlier profile).")
@click.option("--json", "as_json", is_flag=True, help="Print profile.json to stdout.")
def profile(model, target, device, feeds, compare, runtime, runs, output, as_json):
    """Per-node times of MODEL on TARGET's device (and of --compare beside it), as profile.json and report.html."""
    from edgeq import profile as profiling
    from edgeq.profile_report import render
    from edgeq.target import load_target

    inputs = tuple(Path(p) for p in (model, compare, feeds) if p)
    profiling.check_output(output, inputs)
    reporter = RichReporter(enabled=not as_json)
    record = profiling.profile_models(model, load_target(target).with_device(device), feeds, compare, runs, runtime,
                                      default_cache_dir(), reporter)
    with reporter.stage("write"):
        profiling.write(output, record, render(record))
    if as_json:
        click.echo(profiling.profile_text(record))
        return
    _print(record)
    err.print(f"profile written to {output}/ ({profiling.PROFILE}, {profiling.REPORT})")


def _print(record: dict) -> None:
    labels = list(record["models"])
    base = record["models"][record["model"]]["latency"]["median_ms"]
    table = Table("model", "min ms", "median ms", "p90 ms", "ratio", "conditions",
                  title=f"edgeq profile on {record['target']} ({record['runtime']}, {record['device']['address']})"
                  + (" (random inputs)" if record["feeds"]["random"] else ""))
    for label in labels:
        lat = record["models"][label]["latency"]
        conditions = lat.get("conditions") or {}
        flag = ("flagged: " + ", ".join(conditions.get("flags") or [])) if conditions.get("flagged") else \
            ("not flagged" if conditions else "")
        table.add_row(label, f"{lat['min_ms']:.3f}", f"{lat['median_ms']:.3f}", f"{lat['p90_ms']:.3f}",
                      f"{lat['median_ms'] / base:.2f}" if base > 0 else "–", flag)
    out.print(table)
    kind = "node" if record["names"] == "onnx-nodes" else "kernel"
    compare = record.get("compare")
    if compare:
        first, second = compare["model"], compare["with"]
        nodes = Table(kind, f"ms ({first})", f"ms ({second})", "ratio", title=f"costliest {kind}s, side by side")
        for row in compare["nodes"][:TOP]:
            nodes.add_row(row["name"], *(_ms(row["ms"][label]) for label in (first, second)),
                          "–" if row["ratio"] is None else f"{row['ratio']:.2f}")
    else:
        nodes = Table(kind, "op type", "ms/run", "share", title=f"costliest {kind}s of {labels[0]}")
        for node in record["models"][labels[0]]["nodes"][:TOP]:
            nodes.add_row(node["name"], node["op_type"], _ms(node["ms"]), f"{100 * node['share']:.1f}%")
    out.print(nodes)


def _ms(value) -> str:
    return "–" if value is None else f"{value:.4f}"

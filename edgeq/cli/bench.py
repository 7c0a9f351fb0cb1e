"""``edgeq bench``: latency of one model (or two, interleaved) and its costliest nodes."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from edgeq.cli.app import debug_option, default_cache_dir, main, out


@main.command()
@debug_option
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", required=True)
@click.option("--feeds", type=click.Path(path_type=Path), help="Feeds for the run (default: random inputs).")
@click.option("--compare", type=click.Path(path_type=Path), help="A second model measured interleaved with MODEL.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "tvm"]), default="onnxruntime", show_default=True,
              help="tvm: build each model with TVM first (tuned schedules from the tuning database where it has them) "
                   "and measure ONNX Runtime beside it.")
@click.option("--device", help="local, ssh://[user@]host[:port][/python] or rpc://TRACKER_HOST:PORT/KEY. "
                               "Default: the target's.")
@click.option("--repeats", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="Rows of the per-node profile.")
@click.option("--json", "as_json", is_flag=True)
def bench(model, target, feeds, compare, runtime, device, repeats, top, as_json):
    """Measure MODEL's latency on TARGET (min/median/p90) and its costliest nodes (kernels, with TVM)."""
    from edgeq.bench import bench_models
    from edgeq.target import load_target

    report = bench_models(model, load_target(target).with_device(device), feeds, compare, repeats, runtime,
                          default_cache_dir())
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table("model", "min ms", "median ms", "p90 ms", "ratio", title=f"edgeq bench on {target} ({runtime})"
                  + (" (random inputs)" if report["random_inputs"] else ""))
    base = report["latency"][str(model)]["median_ms"]
    for name, lat in report["latency"].items():
        table.add_row(name, f"{lat['min_ms']:.3f}", f"{lat['median_ms']:.3f}", f"{lat['p90_ms']:.3f}",
                      f"{lat['median_ms'] / base:.2f}")
    out.print(table)
    nodes = Table("node" if runtime == "onnxruntime" else "kernel", "op type", "ms/run",
                  title=f"costliest {'nodes' if runtime == 'onnxruntime' else 'TVM kernels'} of {model}")
    for n in report["profile"][:top]:
        nodes.add_row(n["name"], n["op_type"], f"{n['ms']:.4f}")
    out.print(nodes)

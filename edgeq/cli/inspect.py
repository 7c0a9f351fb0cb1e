"""``edgeq inspect``: what is in an ONNX file, as stored."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from edgeq.cli.app import debug_option, main, out


@main.command()
@debug_option
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", default="x86-avx512-vnni", show_default=True, help="Target for coverage.")
@click.option("--nodes", is_flag=True, help="List every node (name, op type, subgraph depth).")
@click.option("--json", "as_json", is_flag=True)
def inspect(model, target, nodes, as_json):
    """Describe MODEL: opset, ops, parameters, quantizable coverage, subgraphs, Constant weights."""
    from edgeq.model_info import model_info
    from edgeq.target import load_target

    info = model_info(model, load_target(target))
    if not nodes:
        info.pop("nodes")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"edgeq inspect {model}", show_header=False)
    for key in ("ir_version", "opsets", "producer", "parameters", "constant_weights", "subgraphs", "quantized_ops"):
        table.add_row(key, str(info[key]))
    table.add_row("inputs", ", ".join(f"{i['name']}{i['shape']}" for i in info["inputs"]))
    table.add_row("outputs", ", ".join(f"{o['name']}{o['shape']}" for o in info["outputs"]))
    table.add_row("ops", ", ".join(f"{k}×{v}" for k, v in info["ops"].items()))
    if info["subgraph_ops"]:
        table.add_row("ops in subgraphs", ", ".join(f"{k}×{v}" for k, v in info["subgraph_ops"].items()))
    cov = info["coverage"]
    table.add_row("quantizable coverage", f"{cov['in_main_graph']}/{cov['compute_nodes']} compute nodes in the main "
                                          f"graph ({cov['quantizable_share']:.0%}) for {cov['target']}")
    if "sparsity" in info:
        sp = info["sparsity"]
        table.add_row("2:4 sparsity", f"{sp['weights']} annotated weights · pattern "
                                      f"{'holds' if sp['ok'] else 'BROKEN in ' + str(len(sp['violations']))} · "
                                      f"compressed/dense {sp['bytes_ratio']:.2f}")
    out.print(table)
    if nodes:
        node_table = Table("name", "op type", "depth")
        for n in info["nodes"]:
            node_table.add_row(n["name"], n["op_type"], str(n["depth"]))
        out.print(node_table)

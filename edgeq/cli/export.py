"""``edgeq export``: a torch module to ONNX, checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq.cli.app import debug_option, main, out


@main.command()
@debug_option
@click.argument("factory")
@click.option("--input", "inputs", multiple=True, required=True,
              help="NAME:D0,D1,...[:DTYPE] (repeatable, in order; DTYPE float32, int64 or int32).")
@click.option("--static-batch", is_flag=True, help="Keep the batch dimension fixed instead of dynamic.")
@click.option("--tolerance", type=float, default=1e-4, show_default=True, help="Max relative error vs PyTorch.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
def export(factory, inputs, static_batch, tolerance, output):
    """Export the nn.Module returned by FACTORY (pkg.mod:fn or file.py:fn) to ONNX, checked against PyTorch."""
    from edgeq.export import export_torch, parse_input_spec

    report = export_torch(factory, [parse_input_spec(s) for s in inputs], output,
                          dynamic_batch=not static_batch, tolerance=tolerance)
    out.print(f"wrote {output} (max relative error vs PyTorch {report['max_relative_error']:.2e})")

"""``edgeq targets``: the bundled targets and whether this machine can measure them."""

from __future__ import annotations

import json

import click
from rich.table import Table

from edgeq.cli.app import debug_option, main, out


TVM_QDQ_NOTE = ("--runtime tvm builds float models: TVM 0.27 imports ONNX QDQ as float fake-quant (no integer "
                "kernels), slower than float, so quantized models go to ONNX Runtime.")


def _tvm_summary(t) -> str:
    if t.tvm is None:
        return "none"
    target = t.tvm.target
    if target["kind"] == "cuda":
        return f"cuda {target.get('arch', '')} (float), host {t.tvm.arch}"
    return f"llvm {target.get('mcpu', '')} {t.tvm.arch} (float)"


@main.command()
@debug_option
@click.option("--json", "as_json", is_flag=True)
def targets(as_json):
    """List the bundled targets and whether this machine can measure them."""
    from edgeq.devices.local import LocalDevice
    from edgeq.target import bundled_target_names, load_target

    rows, here = [], LocalDevice()
    for name in bundled_target_names():
        t = load_target(name)
        why = here.check(t)
        ok = not why
        rows.append({"name": name, "arch": t.arch, "activations": t.quantization.activations,
                     "runtime": "onnxruntime " + "+".join(t.onnxruntime.providers),
                     "tvm": _tvm_summary(t),
                     "mixed_precisions": list(t.precisions.candidates),
                     "measurable_here": ok, "why_not": why, "description": t.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("target", "arch", "activations", "runtime", "--runtime tvm", "--scheme mixed", "measured here",
                  "description", caption=TVM_QDQ_NOTE)
    for r in rows:
        table.add_row(r["name"], r["arch"], r["activations"], r["runtime"], r["tvm"], ", ".join(r["mixed_precisions"]),
                      "yes" if r["measurable_here"] else f"no: {r['why_not']}", r["description"])
    out.print(table)

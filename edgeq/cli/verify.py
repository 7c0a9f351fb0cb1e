"""``edgeq verify``: is an artifact the one that was built, and can an app's ONNX Runtime load it?"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from edgeq.cli.app import debug_option, default_cache_dir, main, out
from edgeq.errors import EXIT_BUDGET_MISSED, EXIT_OK


@main.command()
@debug_option
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--ort-version", help="The ONNX Runtime release an app ships (e.g. 1.17.3). Default: the one edgeq "
                                    "runs. Another release is installed once into the cache to try the file.")
@click.option("--no-install", is_flag=True, help="Do not install --ort-version's release: answer from the ORT "
                                                 "format version alone (kernels unchecked).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(artifact, ort_version, no_install, as_json):
    """Check ARTIFACT (a compile's -o folder): every file its manifest lists, unchanged, and that ONNX Runtime
    loads its model (model.ort when packaged, else model.onnx). Exit 0: it loads; 3: it does not; 2: bad input."""
    from edgeq.verify import verify_artifact

    report = verify_artifact(artifact, ort_version, install=not no_install, cache_dir=default_cache_dir())
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        table = Table(title=f"edgeq verify {artifact}", show_header=False)
        table.add_row("files", f"{report['files']} present, {report['digests_checked']} SHA-256 digests match")
        if "ort_format_version" in report:
            table.add_row("ORT format", f"v{report['ort_format_version']}: read by ONNX Runtime "
                                        f"{report['readable_from_onnxruntime']} and later")
        if report["model"] is None:
            table.add_row("model", "no ONNX Runtime model (a TVM library): files checked only")
        else:
            answer = {True: "loads", False: "DOES NOT LOAD", None: "not checked"}[report["loads"]]
            table.add_row(report["model"], f"ONNX Runtime {report['onnxruntime']}: {answer} ({report['how']})"
                                           + (f": {report['why']}" if report.get("why") else ""))
        out.print(table)
    sys.exit(EXIT_BUDGET_MISSED if report["loads"] is False else EXIT_OK)

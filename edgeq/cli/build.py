"""``edgeq build``: run the compiles a build file (``edgeq.toml``) describes, one per target."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeq import build_file
from edgeq.cli.app import RichReporter, debug_option, main, out
from edgeq.cli.compile import compile as compile_command
from edgeq.cli.compile import print_summary, run_compile
from edgeq.errors import UserError


@main.command()
@debug_option
@click.argument("file", type=click.Path(path_type=Path), default=Path("edgeq.toml"))
@click.option("-t", "--target", "only", multiple=True, help="Build only these of the file's targets.")
@click.option("--json", "as_json", is_flag=True, help="Print {target: manifest} as JSON instead of tables.")
def build(file, only, as_json):
    """Compile what FILE (default edgeq.toml) describes, for each of its targets in order. Exit code: the worst
    of the compiles' (3 when a budget was missed); a bad input stops the matrix (artifacts already built stay)."""
    spec = build_file.load(file, compile_command)
    unknown = next((t for t in only if t not in spec.targets), None)
    if unknown is not None:
        raise UserError(f"target '{unknown}' is not in {file}", f"its targets are {', '.join(spec.targets)}")
    manifests, code = {}, 0
    for target in [t for t in spec.targets if not only or t in only]:
        output = spec.output_for(target)
        if not as_json:
            out.rule(f"{target} → {output}")
        manifest, exit_code = run_compile(spec.model, target, output, reporter=RichReporter(enabled=not as_json),
                                          **spec.options)
        manifests[target], code = manifest, max(code, exit_code)
        if not as_json:
            print_summary(manifest, output)
    if as_json:
        click.echo(json.dumps(manifests, indent=2, default=str))
    sys.exit(code)

"""``edgeq init``: write a build file (``edgeq.toml``) from the options ``edgeq compile`` takes."""

from __future__ import annotations

from pathlib import Path

import click

from edgeq import build_file
from edgeq.cli.app import debug_option, main, out
from edgeq.cli.compile import compile as compile_command


@main.command()
@debug_option
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", "targets", multiple=True, required=True,
              help="Target name or .toml path; repeat it for a matrix of targets.")
@click.option("-o", "--output", help="Artifact folder, relative to the build file; {target} becomes each target's "
                                     "name. Default: build/{target}.")
@click.option("-f", "--file", "path", type=click.Path(path_type=Path), default=Path("edgeq.toml"), show_default=True,
              help="The build file to write.")
@click.option("--force", is_flag=True, help="Replace an existing build file.")
def init(model, targets, output, path, force, **options):
    """Write a build file for MODEL: the targets and every compile option given here that differs from its
    default (the same options as edgeq compile). 'edgeq build' runs it."""
    written = build_file.write(path, model, list(targets), output, options, compile_command, force)
    out.print(f"wrote {written}: edgeq build {written} runs it")


init.params.extend(build_file.file_options(compile_command).values())  # one schema: compile's own options

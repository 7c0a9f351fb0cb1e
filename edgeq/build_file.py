"""The build file (``edgeq.toml``): a reviewable description of the compiles ``edgeq build`` runs.

Rules:
1. One schema with the command line: the keys of ``[compile]`` are ``edgeq compile``'s long option names
   without the dashes (``max-drop = "1%"``, ``no-measure = true``, ``exclude = ["op:Softmax"]``), read
   through the same click types, so the file and the flags cannot drift apart. The top level holds
   ``edgeq = "build/1"``, ``model``, ``targets`` (one name or a list: a matrix, built in order), ``output``
   (``{target}`` becomes each target's name; required in it when there are several) and ``[compile]``.
   Any other key is an error naming it.
2. Paths (``model``, ``calib``, ``eval``, a ``file.py:fn`` metric, ``output``) are relative to the build
   file's folder; ``edgeq init`` writes them so, wherever it is run from.
3. ``edgeq init`` writes only the options that differ from ``edgeq compile``'s defaults, never overwrites an
   existing file unless told to, and writes into a temporary sibling renamed into place.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import tomli_w

from edgeq.errors import UserError

FORMAT = "build/1"
DEFAULT_OUTPUT = "build/{target}"
TOP_LEVEL = ("edgeq", "model", "targets", "output", "compile")
NOT_IN_FILE = ("debug", "model", "target", "output", "as_json")  # compile's own arguments, or per run
PATH_OPTIONS = ("calib", "eval_path")  # compile parameters that are paths


def file_options(command: click.Command) -> dict[str, click.Parameter]:
    """``[compile]`` key → the compile option it sets (rule 1)."""
    options = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name not in NOT_IN_FILE:
            long = next(opt for opt in param.opts if opt.startswith("--"))
            options[long[2:]] = param
    return options


@dataclass
class BuildFile:
    path: Path
    model: Path
    targets: list[str]
    output: str
    options: dict[str, object]  # compile parameter name → value
    section: dict  # [compile] as written (paths relative to the file): what the lock records

    def output_for(self, target: str) -> Path:
        return self.path.parent / self.output.replace("{target}", Path(target).stem)


def load(path: Path, command: click.Command) -> BuildFile:
    """Read and check a build file (rules 1–2); one-line UserErrors name the key at fault."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no build file {path}", "write one with 'edgeq init MODEL -t TARGET …'") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"build file {path} is not readable TOML ({exc})", "fix the line it names") from None
    unknown = next((k for k in data if k not in TOP_LEVEL), None)
    if unknown is not None:
        raise UserError(f"unknown key '{unknown}' in build file {path}", f"the top level holds {', '.join(TOP_LEVEL)}")
    if data.get("edgeq", FORMAT) != FORMAT:
        raise UserError(f"build file {path} is format '{data['edgeq']}', this edgeq reads '{FORMAT}'",
                        "write it again with 'edgeq init', or use the edgeq that wrote it")
    folder = path.parent
    if not isinstance(data.get("model"), str):
        raise UserError(f"build file {path} names no model", 'add model = "path/to/model.onnx"')
    targets = data.get("targets")
    targets = [targets] if isinstance(targets, str) else targets
    if not targets or not all(isinstance(t, str) for t in targets) or len(set(targets)) != len(targets):
        raise UserError(f"build file {path}: targets must be a target name or a list of distinct names",
                        'e.g. targets = ["x86-64", "aarch64"]')
    output = data.get("output", DEFAULT_OUTPUT)
    if not isinstance(output, str) or (len(targets) > 1 and "{target}" not in output):
        raise UserError(f"build file {path}: output {output!r} would be the same folder for every target",
                        'put {target} in it, e.g. output = "build/{target}"')
    section = data.get("compile", {})
    if not isinstance(section, dict):
        raise UserError(f"build file {path}: compile must be a table", "write it as [compile]")
    known = file_options(command)
    context = click.Context(command)
    options = {}
    for key, value in section.items():
        if key not in known:
            raise UserError(f"unknown key '{key}' in [compile] of build file {path}",
                            "keys are edgeq compile's options without the dashes (see edgeq compile --help)")
        options[known[key].name] = _convert(known[key], key, value, context, path)
    for name in PATH_OPTIONS:
        if options.get(name) is not None:
            options[name] = folder / options[name]
    if isinstance(options.get("metric"), str) and ".py:" in options["metric"]:
        file, _, function = options["metric"].rpartition(":")
        options["metric"] = f"{folder / file}:{function}"
    return BuildFile(path, folder / data["model"], list(targets), output, options, section)


def _convert(param: click.Parameter, key: str, value, context: click.Context, path: Path):
    """A file value through the option's own click type (rule 1)."""
    where = f"[compile] {key} in build file {path}"
    if getattr(param, "is_flag", False):
        if not isinstance(value, bool):
            raise UserError(f"{where} is a switch", f"write {key} = true or false")
        return value
    if param.multiple and not isinstance(value, list):
        raise UserError(f"{where} takes a list", f'write {key} = ["…"]')
    try:
        if param.multiple:
            return tuple(param.type.convert(v, param, context) for v in value)
        return param.type.convert(value, param, context)
    except click.BadParameter as exc:
        raise UserError(f"{where}: {exc.message}", "fix the value") from None


def write(path: Path, model: Path, targets: list[str], output: str | None, values: dict, command: click.Command,
          force: bool = False) -> Path:
    """``edgeq init``: the file for these compile option values (rule 3); paths made relative to it."""
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists", "pass --force to replace it, or choose another --file")
    if not Path(model).is_file():
        raise UserError(f"model {model} not found", "pass the path of an .onnx file")
    folder = path.parent.resolve()
    context = click.Context(command)

    def relative(value) -> str:
        return Path(os.path.relpath(Path(value).resolve(), folder)).as_posix()

    section = {}
    for key, param in file_options(command).items():
        value = values.get(param.name)
        default = param.get_default(context)
        if value is None or value == () or value == default or (getattr(param, "is_flag", False) and not value):
            continue
        if param.name in PATH_OPTIONS:
            value = relative(value)
        elif param.name == "metric" and ".py:" in value:
            file, _, function = value.rpartition(":")
            value = f"{relative(file)}:{function}"
        section[key] = list(value) if isinstance(value, tuple) else value
    data = {"edgeq": FORMAT, "model": relative(model), "targets": list(targets),
            "output": DEFAULT_OUTPUT if output is None else output if Path(output).is_absolute() else relative(output)}
    if section:
        data["compile"] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(f"# edgeq build file: 'edgeq build {path.name}' runs it; [compile] keys are edgeq compile's "
                     "options.\n" + tomli_w.dumps(data))
    os.replace(tmp, path)
    return path

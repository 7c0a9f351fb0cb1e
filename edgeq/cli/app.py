"""The ``edgeq`` command group: output consoles, progress, and the one-line error rule.

Exit codes: 0 ok · 1 internal error (one line naming the stage; ``--debug`` shows the trace) · 2 bad input (one
line on stderr naming the problem and the fix) · 3 budget missed (artifact written) · 130/143 interrupted.
Whatever the exit, a failed command writes nothing. Progress goes to stderr; tables, or JSON with ``--json``,
go to stdout.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from edgeq import errors
from edgeq.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, UserError

out = Console()
err = Console(stderr=True)

# OS errors that are the machine's state, not a bug: said in one line like a user error.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG,
                       errno.ELOOP, errno.EMFILE, errno.ENOTDIR, errno.EISDIR}
_DEBUG = "edgeq.debug"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every cleanup (temporary folders) runs before exiting."""


class RichReporter:
    """Shows each pipeline stage while it runs (with a bar when it reports progress), then one line with its
    time. A stage that fails leaves nothing behind but the error line."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task = None

    @contextlib.contextmanager
    def stage(self, name: str):
        with errors.stage(name):
            if not self.enabled:
                yield
                return
            started = time.perf_counter()
            live = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
            with live as progress:
                self._progress, self._task = progress, progress.add_task(name, total=None)
                try:
                    yield
                finally:
                    self._progress = None
            err.print(f"[green]✓[/green] {name} [dim]({time.perf_counter() - started:.1f} s)[/dim]")

    def progress(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)


# Libraries that log their own recoverable failures with a trace (onnx_ir's shape inference, onnxscript's
# optimizer and converter): the user sees them only with --debug.
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript")


def _set_debug(ctx, param, value):
    """``--debug`` on the group or on a verb (ctx.meta is shared by one invocation's contexts)."""
    debug = ctx.meta[_DEBUG] = ctx.meta.get(_DEBUG, False) or bool(value)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show the full trace of an internal error.")


def _raise_terminated(signum, frame):
    raise Terminated()


class EdgeqGroup(click.Group):
    """Every error ends as one line on stderr and a documented exit code; nothing escapes as a traceback."""

    def invoke(self, ctx):
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if _in_main_thread() else None
        command = ctx.protected_args[0] if ctx.protected_args else "edgeq"
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except UserError as exc:
            _fail(ctx, f"error: {exc}", EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            _fail(ctx, "error: interrupted; nothing was written", 130)
        except Terminated:
            _fail(ctx, "error: terminated; nothing was written", 143)
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRNOS:
                _internal(ctx, exc, command)
            where = f" ({exc.filename})" if exc.filename else ""
            _fail(ctx, f"error: {os.strerror(exc.errno)}{where} in {errors.stage_of(exc, command)}; nothing was "
                       "written; free space or fix the permissions, or choose another -o / $EDGEQ_CACHE_DIR",
                  EXIT_BAD_INPUT)
        except MemoryError as exc:
            _fail(ctx, f"error: out of memory in {errors.stage_of(exc, command)}; nothing was written; free memory "
                       "or use fewer/smaller calibration feeds", EXIT_INTERNAL)
        except Exception as exc:  # noqa: BLE001 — the documented catch-all: one line, exit 1
            _internal(ctx, exc, command)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _internal(ctx, exc: BaseException, command: str) -> None:
    if ctx.meta.get(_DEBUG):
        traceback.print_exception(exc, file=sys.stderr)
    _fail(ctx, f"error: internal error in {errors.stage_of(exc, command)}: {type(exc).__name__}: "
               f"{errors.first_line(exc) or 'no message'}; rerun with --debug for the trace", EXIT_INTERNAL)


def _fail(ctx, line: str, code: int) -> None:
    click.echo(line, err=True)
    ctx.exit(code)


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE_DIR", Path.home() / ".cache" / "edgeq"))


@click.group(cls=EdgeqGroup)
@click.version_option(package_name="edgeq")
@debug_option
def main():
    """edgeq: compile float ONNX models into fast, verified int8 models for a named target."""

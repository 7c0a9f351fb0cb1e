"""User-facing errors, and the stage an error happened in.

Rules:
- A mistake in what the user gave us (a path, a file, a flag, calibration data, a model edgeq or ONNX Runtime
  cannot use) raises :class:`UserError` with one line that names the problem and the fix. The CLI prints that
  line and exits with :data:`EXIT_BAD_INPUT`.
- Anything else is a bug (or a model edgeq does not understand yet). The CLI prints one line naming the stage
  it happened in (:func:`stage`) and exits with :data:`EXIT_INTERNAL`; ``--debug`` shows the trace.
- Either way nothing is written: artifacts are published only at the very end, caches atomically.
"""

from __future__ import annotations

import contextlib
import re

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_BUDGET_MISSED = 3

_STAGE_ATTR = "edgeq_stage"


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is the one-line message (problem + fix)."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


@contextlib.contextmanager
def stage(name: str):
    """Run a block as the pipeline stage ``name``: an exception leaving it carries the innermost stage's name."""
    try:
        yield
    except BaseException as exc:
        if getattr(exc, _STAGE_ATTR, None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(exc, _STAGE_ATTR, name)
        raise


def stage_of(exc: BaseException, default: str) -> str:
    """The stage ``exc`` left (see :func:`stage`), or ``default``."""
    return getattr(exc, _STAGE_ATTR, None) or default


# A C++ library's source location and function signature before its message ("model.cc:256
# onnxruntime::Model::Model(onnx::ModelProto&&, …) Unsupported model IR version: 14, …"): 200 characters
# that pushed the message itself past the line's end.
_CPP_FRAME = re.compile(r"[/\\][^\s:]*\.(?:cc|cpp|h):\d+ [\w:~<>]+\((?:[^()]|\([^()]*\))*\) ")


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of a (library's) message, less any C++ source frame, shortened: CLI errors are
    one line."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    line = _CPP_FRAME.sub("", line)
    return line if len(line) <= limit else line[: limit - 1] + "…"

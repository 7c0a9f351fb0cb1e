"""User-facing errors.

Rule: a mistake in what the user gave us (a path, a file, a flag, calibration data) raises
:class:`UserError` with one line that names the problem and the fix. The CLI prints that line and exits
with :data:`EXIT_BAD_INPUT`; it never shows a traceback for it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_BUDGET_MISSED = 3


class UserError(Exception):
    """A problem with the user's input; ``str(err)`` is the one-line message (problem + fix)."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)

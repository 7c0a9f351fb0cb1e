"""Cross-compiled TVM artifacts for the zoo: aarch64 libraries run under qemu-user, Jetson Orin (sm_87) kernels
compiled by nvcc — what can be verified without the boards.

    python benchmarks/cross_targets.py [--models mobilenetv2,resnet18,bert_small] --sysroot DIR

For every model: ``edgeq``'s TVM build for the ``aarch64`` target (untuned: tuning needs the board) and for
``jetson-orin``. The aarch64 library's ELF header must say aarch64; then it runs under ``qemu-aarch64-static``
inside ``--sysroot`` (an arm64 Python 3.11 with numpy and the aarch64 apache-tvm wheel, used runtime-only;
``benchmarks/aarch64_sysroot.sh`` builds one from Debian packages and wheels) on 2 evaluation feeds, and its
outputs are compared with ONNX Runtime's on this machine: max |tvm - ort| / max |ort|. The Orin library's
kernels are compiled for sm_87 by nvcc (``cuda_kernels.nvcc_check``); they cannot run here (no GPU).
Without ``--sysroot`` only the builds and ELF checks run, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from vs_ort_quantizer import prepare  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq.calibration_data import CalibrationData, input_specs  # noqa: E402
from edgeq.model_io import load_model  # noqa: E402
from edgeq.runtimes.onnxruntime import create_session  # noqa: E402
from edgeq.runtimes.tvm import TvmRuntime, library_arch  # noqa: E402
from edgeq.target import load_target  # noqa: E402
from edgeq.model_check import max_relative_error  # noqa: E402

# Runs inside the emulated arm64 Python: load the library with TVM's runtime only and run each feed.
RUNNER = """
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
library, feeds, out = sys.argv[1:4]
vm = VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())
results = {}
with np.load(feeds) as data:
    for index in sorted({k.split("/")[0] for k in data.files}, key=int):
        names = sorted((k for k in data.files if k.startswith(index + "/")), key=lambda k: int(k.split("/")[1]))
        value = vm["main"](*[tvm.runtime.tensor(data[k], tvm.cpu()) for k in names])
        outputs = [value] if hasattr(value, "numpy") else list(value)
        for j, o in enumerate(outputs):
            results[f"{index}/{j}"] = o.numpy()
np.savez(out, **results)
"""


def run_under_qemu(library: Path, feeds: list[dict], sysroot: Path, work: Path) -> list[list[np.ndarray]]:
    np.savez(work / "feeds.npz", **{f"{i}/{j}": v for i, f in enumerate(feeds) for j, v in enumerate(f.values())})
    (work / "runner.py").write_text(RUNNER)
    python = sysroot / "usr/bin/python3.11"
    env = os.environ | {"TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(sysroot / "usr/lib/python3.11/site-packages")}
    subprocess.run(["qemu-aarch64-static", "-L", str(sysroot), str(python), str(work / "runner.py"), str(library),
                    str(work / "feeds.npz"), str(work / "out.npz")], check=True, env=env, timeout=1800)
    with np.load(work / "out.npz") as data:
        return [[data[k] for k in sorted((k for k in data.files if k.startswith(f"{i}/")),
                                         key=lambda k: int(k.split("/")[1]))] for i in range(len(feeds))]


def bench_model(name: str, work: Path, sysroot: Path | None) -> dict:
    fp32, _, eval_folder = prepare(ZOO[name], Path("build/bench") / name, 8, 8)
    feeds = [f.inputs for f, _ in zip(CalibrationData.from_path(eval_folder, input_specs(load_model(fp32))),
                                      range(2))]
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "aarch64").mkdir(parents=True)
    (folder / "jetson-orin").mkdir()
    arm = TvmRuntime(load_target("aarch64"), feed=feeds[0]).build(fp32, folder / "aarch64")
    orin_runtime = TvmRuntime(load_target("jetson-orin"), feed=feeds[0])
    orin = orin_runtime.build(fp32, folder / "jetson-orin")
    row = {"model": name, "aarch64_elf": library_arch(arm), "aarch64_mb": arm.stat().st_size / 1e6,
           "orin_elf": library_arch(orin), "orin_kernels": orin_runtime.cuda_kernels["nvcc_check"]}
    if sysroot is None:
        return row | {"qemu": "not run: no --sysroot"}
    reference = create_session(fp32)
    outputs = run_under_qemu(arm, feeds, sysroot, folder / "aarch64")
    error = max(max_relative_error(reference.run(None, f), o) for f, o in zip(feeds, outputs))
    return row | {"qemu": f"ran {len(feeds)} feeds", "max_rel_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,resnet18,bert_small")
    parser.add_argument("--sysroot", type=Path, help="arm64 Python sysroot (benchmarks/aarch64_sysroot.sh)")
    parser.add_argument("--work", type=Path, default=Path("build/bench-cross"))
    args = parser.parse_args()
    rows = [bench_model(m, args.work, args.sysroot) for m in args.models.split(",")]
    print("\n| model | aarch64 .so (ELF, MB) | under qemu-aarch64 | max rel. error vs ORT x86 | jetson-orin .so | "
          "sm_87 kernels (nvcc) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        error = f"{r['max_rel_error']:.1e}" if "max_rel_error" in r else "—"
        print(f"| {r['model']} | {r['aarch64_elf']}, {r['aarch64_mb']:.1f} | {r['qemu']} | {error} | {r['orin_elf']} | "
              f"{r['orin_kernels']} |")


if __name__ == "__main__":
    main()

"""The mobile/CI build pipeline on the zoo, timed side by side in one run: a measured ``edgeq build`` (int8,
packaged as ``.ort``), its ``--locked`` replay with the build cache off, and an unchanged rebuild restored from
the cache — each the whole command, as a CI job runs it.

Prints per model: measured build seconds, replay seconds and replay/build ratio (target ≤ 0.10), cache-hit
seconds (target ≤ 3 s for a ResNet-18-sized model), whether the replay reproduced the bytes (it refuses to
publish otherwise), and the ``.ort`` check (max relative error vs ``model.onnx``, target ≤ 1e-5; the
operator config equal to the kernels in the file).

    python benchmarks/build_pipeline.py [--models resnet18,mobilenetv2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vs_ort_quantizer import export, write_feeds  # noqa: E402
from zoo import ZOO  # noqa: E402

from edgeq.target import host_x86_target  # noqa: E402

EDGEQ = str(Path(sys.executable).parent / "edgeq")


def timed(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([EDGEQ, *args], env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done


def bench(name: str, work: Path, target: str) -> dict:
    entry = ZOO[name]
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.onnx"
    if not model.exists():
        export(entry, model)
    write_feeds(entry, folder / "calib", 32, seed=1)
    path = folder / "edgeq.toml"
    path.write_text(f'model = "model.onnx"\ntargets = "{target}"\noutput = "out/{{target}}"\n'
                    '[compile]\ncalib = "calib"\npackage = "ort"\nrepeats = 20\n')
    env = os.environ | {"EDGEQ_CACHE_DIR": str(folder / "cache")}
    build_s, built = timed(["build", str(path)], env)
    if built.returncode not in (0, 3):
        return {"model": name, "error": (built.stderr or built.stdout).strip().splitlines()[-1]}
    replay_s, replayed = timed(["build", str(path), "--locked"], env | {"EDGEQ_CACHE_DIR": str(folder / "nocache")})
    (folder / "out" / target / "model.onnx").unlink()
    hit_s, hit = timed(["build", str(path)], env)
    manifest = json.loads((folder / "out" / target / "manifest.json").read_text())
    package = manifest.get("package", {})
    return {"model": name, "delivered": manifest["delivered"]["precision"], "build_s": build_s,
            "replay_s": replay_s, "replay_ok": replayed.returncode == 0,
            "hit_s": hit_s, "hit_ok": hit.returncode == 0 and "restored from the build cache" in hit.stdout,
            "ort_error": package.get("check", {}).get("max_relative_error"),
            "config_ok": package.get("check", {}).get("config_matches_kernels")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenetv2,vit_tiny,bert_small")
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="edgeq-build-bench-"))
    target = host_x86_target()
    rows = [bench(name, work, target) for name in args.models.split(",")]
    print(f"\ntarget {target}; whole commands, one run on this machine\n")
    print(f"{'model':<12} {'delivered':<9} {'build s':>8} {'replay s':>9} {'replay/build':>12} {'replay ok':>9} "
          f"{'hit s':>6} {'hit ok':>6} {'ort rel err':>11} {'config':>6}")
    for row in rows:
        if "error" in row:
            print(f"{row['model']:<12} error: {row['error']}")
            continue
        error = "-" if row["ort_error"] is None else f"{row['ort_error']:.1e}"
        print(f"{row['model']:<12} {row['delivered']:<9} {row['build_s']:>8.1f} {row['replay_s']:>9.1f} "
              f"{row['replay_s'] / row['build_s']:>12.2f} {str(row['replay_ok']):>9} {row['hit_s']:>6.1f} "
              f"{str(row['hit_ok']):>6} {error:>11} {str(row['config_ok']):>6}")


if __name__ == "__main__":
    main()

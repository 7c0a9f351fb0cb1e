"""``edgeq profile``: per-node times of a model (and of a second one beside it) measured on the device, written
as ``profile.json`` (``edgeq/schemas/profile-1.schema.json``) and a self-contained ``report.html``.

Rules:
1. Where: the target's device (``--device`` overrides it). ONNX Runtime is profiled on any device that can
   measure the target (:func:`edgeq.devices.base.why_not`); TVM for CPU targets, here or on a board that runs
   ``edgeq device serve``, where the VM's instrument hook times each kernel call on the board itself (CUDA kernel
   calls return before the GPU has run them).
2. What: latency of MODEL and M2 interleaved in one run (:meth:`Runtime.measure`, the agent's latency and noise
   rules, so their ratio is meaningful), then each model profiled on its own over ``runs`` runs (ONNX Runtime:
   at most ``runs``, about a second of them, at least 3).
3. One schema for both runtimes. ``names`` says what a node is: ``onnx-nodes`` (ONNX Runtime: kernels mapped
   back through its fusions to the ONNX node names, :mod:`edgeq.runtimes.onnxruntime`; ``op_type`` is the
   kernel's, e.g. ``QLinearConv``) or ``tvm-kernels`` (TVM's fused functions, e.g. ``fused_conv2d_add_relu``;
   ``op_type`` is the fused pattern, TVM's numbering removed: ``conv2d_add_relu``). ``share`` is a node's part
   of its model's kernel time; ``op_types`` sums the nodes by op type.
4. ``compare`` joins the two models node by node, by name: each one's op type and ms (null where a model has no
   such node), and ``ratio`` = M2's ms / MODEL's.
5. Output: everything is written into a hidden temporary sibling of ``-o`` and renamed into place at the end.
   ``-o`` may be new, empty or an earlier profile (``profile.json`` and ``report.html`` only), which is
   replaced; anything else — an artifact of ``edgeq compile`` included — is refused before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

from edgeq import errors, scratch
from edgeq.artifact import _apply_umask, check_output_dir, tool_versions
from edgeq.bench import measurement_feed, tvm_libraries
from edgeq.devices import device_summary, open_device
from edgeq.errors import UserError
from edgeq.runtimes.base import NodeTime
from edgeq.target import Target

FORMAT = "profile/1"
PROFILE = "profile.json"
REPORT = "report.html"
FILES = frozenset({PROFILE, REPORT})
NAMES = {"onnxruntime": "onnx-nodes", "tvm": "tvm-kernels"}
_TVM_NUMBERING = re.compile(r"(?<=[A-Za-z])\d+$")  # fused_conv2d1_add1_relu11 → conv2d_add_relu


def profile_models(model: Path, target: Target, feeds: Path | None = None, compare: Path | None = None,
                   runs: int = 20, runtime: str = "onnxruntime", cache_dir: Path | None = None,
                   reporter=None) -> dict:
    """The profile (schema ``profile/1``) of ``model`` — and ``compare`` beside it — on the target's device."""
    stage = reporter.stage if reporter is not None else errors.stage
    paths = [Path(model)] + ([Path(compare)] if compare else [])
    labels = _labels(paths)
    if runtime == "tvm" and target.tvm is not None and target.tvm.kind == "cuda":
        raise UserError(f"TVM kernels are timed on CPU targets only ({target.name} is CUDA: its kernel calls return "
                        "before the GPU has run them)", "profile the CUDA target with --runtime onnxruntime")
    with stage("load models and feed"):  # before reaching the device: bad input fails fast
        feed = measurement_feed(paths, feeds)
    with contextlib.closing(open_device(target.measure_where)) as device:
        with stage(f"check device {device.address}"):
            why = device.check(target, runtime)
            if why:
                raise UserError(f"device {device.address} cannot measure {target.name}: {why}",
                                "measure on the device itself (--device ssh://… or rpc://…)")
        record = {"edgeq": FORMAT, "tools": tool_versions(("apache-tvm",) if runtime == "tvm" else ()),
                  "runtime": runtime, "names": NAMES[runtime], "target": target.name,
                  "device": device_summary(device) | ({"tvm": device.facts().get("tvm")} if runtime == "tvm" else {}),
                  "feeds": {"random": feeds is None, "path": str(feeds) if feeds else None,
                            "inputs": {name: {"dtype": str(value.dtype), "shape": list(value.shape)}
                                       for name, value in feed.items()}},
                  "runs": runs, "model": labels[0]}
        if runtime == "tvm":
            device.close()  # TVM requests its own board session: this one's board goes back to the tracker first
            latency, times, database = _measure_tvm(paths, labels, target, feed, runs, cache_dir, stage)
            record["tvm_database"] = database
        else:
            latency, times = _measure_onnxruntime(paths, labels, target, feed, runs, device, stage)
    record["models"] = {label: _model_record(path, latency[label], times[label], runtime)
                        for label, path in zip(labels, paths)}
    if compare:
        record["compare"] = _compare(record["models"], labels[0], labels[1])
    return record


def _labels(paths: list[Path]) -> list[str]:
    """What each model is called in the profile: its file name; its path where the names coincide."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    names = [str(p) for p in paths]
    return names if len(set(names)) == len(names) else [names[0], f"{names[1]} (again)"]


def _measure_onnxruntime(paths, labels, target, feed, runs, device, stage):
    from edgeq.runtimes.onnxruntime import OnnxRuntime

    ort = OnnxRuntime(target, device)
    with stage("measure latency (interleaved)" if len(paths) > 1 else "measure latency"):
        latency = ort.measure(dict(zip(labels, paths)), feed)
    times = {}
    for label, path in zip(labels, paths):
        with stage(f"profile {label}"):
            times[label] = ort.profile(path, feed, runs)
    return latency, times


def _measure_tvm(paths, labels, target, feed, runs, cache_dir, stage):
    with contextlib.ExitStack() as stack:
        with stage("build with TVM"):
            tvm, libraries, database = stack.enter_context(tvm_libraries(paths, target, feed, cache_dir))
        by_label = {label: libraries[str(path)] for label, path in zip(labels, paths)}
        with stage("measure latency (interleaved)" if len(paths) > 1 else "measure latency"):
            latency = tvm.measure(by_label, feed)
        times = {}
        for label, library in by_label.items():
            with stage(f"profile {label}"):
                times[label] = tvm.profile(library, feed, runs)
    return latency, times, database


def tvm_pattern(kernel: str) -> str:
    """A TVM kernel's fused pattern: ``fused_conv2d1_add1_relu11`` → ``conv2d_add_relu``."""
    parts = kernel.removeprefix("fused_").split("_")
    return "_".join(_TVM_NUMBERING.sub("", part) for part in parts)


def _model_record(path: Path, latency, times: list[NodeTime], runtime: str) -> dict:
    total = sum(t.ms for t in times)
    nodes = [{"name": t.name, "op_type": tvm_pattern(t.name) if runtime == "tvm" else (t.op_type or "unknown"),
              "ms": t.ms, "share": t.ms / total if total > 0 else 0.0} for t in sorted(times, key=lambda t: -t.ms)]
    op_types: dict[str, float] = defaultdict(float)
    for node in nodes:
        op_types[node["op_type"]] += node["ms"]
    return {"file": str(path), "latency": latency.to_dict(), "total_ms": total, "nodes": nodes,
            "op_types": dict(sorted(op_types.items(), key=lambda item: -item[1]))}


def _compare(models: dict, first: str, second: str) -> dict:
    a = {n["name"]: n for n in models[first]["nodes"]}
    b = {n["name"]: n for n in models[second]["nodes"]}
    rows = []
    for name in dict.fromkeys([*a, *b]):
        x, y = a.get(name), b.get(name)
        rows.append({"name": name,
                     "op_types": {label: n["op_type"] for label, n in ((first, x), (second, y)) if n is not None},
                     "ms": {first: x["ms"] if x else None, second: y["ms"] if y else None},
                     "ratio": y["ms"] / x["ms"] if x and y and x["ms"] > 0 else None})
    rows.sort(key=lambda r: -max(ms for ms in r["ms"].values() if ms is not None))
    base = models[first]["latency"]["median_ms"]
    return {"model": first, "with": second,
            "latency_ratio": models[second]["latency"]["median_ms"] / base if base > 0 else None, "nodes": rows}


# ---------------------------------------------------------------- the output folder (rule 5)

def _earlier_profile(folder: Path) -> bool:
    entries = {p.name for p in folder.iterdir()}
    if not entries or not entries <= FILES or PROFILE not in entries:
        return False
    if any((folder / name).is_symlink() or not (folder / name).is_file() for name in entries):
        return False
    try:
        return str(json.loads((folder / PROFILE).read_text()).get("edgeq", "")).startswith("profile/")
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out_dir: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Rule 5 on ``-o``, before any work: a one-line UserError when it may not be written."""
    out_dir = Path(out_dir)
    for path in inputs:
        inside = Path(path).resolve()
        if inside == out_dir.resolve() or out_dir.resolve() in inside.parents:
            raise UserError(f"-o {out_dir} holds this profile's input {path}", "write the profile somewhere else")
    if out_dir.is_dir() and not out_dir.is_symlink() and _earlier_profile(out_dir):
        return
    check_output_dir(out_dir)  # not a link, not a file, not inside a file; new, empty or an edgeq artifact
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"output folder {out_dir} holds an edgeq artifact, not a profile",
                        "pass a new or empty folder with -o")


def write(out_dir: Path, profile: dict, page: str) -> Path:
    """``profile.json`` and ``report.html`` written into a temporary sibling folder, then renamed into place."""
    out_dir = Path(out_dir)
    check_output(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out_dir.name}."
    scratch.sweep(out_dir.parent, prefix)
    tmp = scratch.make_dir(out_dir.parent, prefix)
    backup = None
    try:
        (tmp / PROFILE).write_text(profile_text(profile) + "\n")
        (tmp / REPORT).write_text(page)
        _apply_umask(tmp)
        if out_dir.exists():  # an earlier profile (checked just now): moved aside, removed once replaced
            backup = scratch.make_dir(out_dir.parent, prefix, "old")
            os.replace(out_dir, backup / "profile")
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if backup is not None:
                os.replace(backup / "profile", out_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    return out_dir


def profile_text(profile: dict) -> str:
    return json.dumps(profile, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v))

"""The lock (``edgeq.lock``): what a build read, the tools it ran with, every measured decision, the bytes made.

Rules:
1. ``edgeq build`` writes it beside the build file (``edgeq.toml`` → ``edgeq.lock``) after each measured
   target is built: for each target, the SHA-256 of
   every input (model file and its external data, calibration and evaluation data, a metric file, the target's
   resolved description), the build file's options, the tool versions, the :class:`Decisions` — op set, nodes
   kept float, per-tensor calibration methods and the activation ranges quantized with (and the tensors
   calibration saw non-finite values in: a replay runs no calibration), PTQ kept on a guard
   miss, what was delivered, per-node precisions (mixed), layers left dense (2:4), the TVM tuning records
   applied — and the SHA-256 of each artifact file. JSON with sorted keys, one key per line: stable,
   reviewable, diff-able.
2. ``edgeq build --locked`` first compares tools and inputs with the lock; any difference is a one-line error
   naming it (``--relock`` accepts it: a measured build that writes a new lock). Then it replays: no latency is
   measured and no search runs; each decision is applied as recorded, and the artifact is published only if
   every file has the SHA-256 the lock records. ``model.ort`` is the exception: ONNX Runtime's ORT-format
   writer lays its tables out in a different order from one process to the next, so it is checked by content
   (the kernels it holds, its outputs against ``model.onnx``; :mod:`edgeq.runtimes.ort_format`).
   ``report.html`` and the manifest hold timings and are not compared; a replay's report shows the recorded
   decisions and no measurement. The recorded activation ranges make int8, mixed
   and float replays the same bytes on any machine (no calibration runs); the weights of PTQ passes and 2:4
   reconstruction, which compute with this machine's BLAS and ONNX Runtime, are recorded too (rule 4).
3. A lock of another format (``lock/N``) or from another edgeq major version is refused. Tool versions must
   match exactly, Python's to the minor release.
4. Weights another CPU would compute differently — an int8/mixed build with PTQ passes (GPTQ, bias correction,
   CLE, SmoothQuant), any build with 2:4-pruned layers — are recorded too: the delivered model's initializers,
   one ``.npy`` per tensor named by its SHA-256, in the weight folder beside the lock (``edgeq.lock`` →
   ``edgeq.weights/``; commit it with the lock), and ``decisions.weights`` maps each initializer to its file.
   A replay takes those tensors instead of computing its own: it solves no GPTQ and collects no
   bias-correction statistics (the recorded initializers replace every one the build made; the SHA-256
   check still guards the result), so the same bytes come out on any CPU, without the solver's time. A
   missing or altered file is a one-line error, nothing published. Files no entry names are removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeq.artifact import MANIFEST, MODEL, REPORT, file_digest, tool_versions
from edgeq.errors import UserError
from edgeq.runtimes.ort_format import ORT_FILE

FORMAT = "lock/1"
NOT_BYTE_STABLE = (MANIFEST, REPORT, ORT_FILE)  # the manifest and report hold timings; model.ort: rule 2


@dataclass(frozen=True)
class Decisions:
    """Every measured choice of one compile; a locked build applies them instead of measuring."""

    delivered: str  # "int8", "mixed" or "float"
    optional_ops: str = "none"
    keep_float: tuple[str, ...] = ()
    ranges: dict[str, str] = field(default_factory=dict)  # tensor → calibration method the guard chose
    ptq_on_guard_miss: bool = False  # --ptq auto kept GPTQ + bias correction
    precisions: dict[str, str] | None = None  # --scheme mixed: node → precision
    keep_dense: tuple[str, ...] | None = None  # --sparsity 2:4: eligible layers left dense
    tuning_records: str | None = None  # --runtime tvm: SHA-256 of the tuning database applied
    # tensor → [low, high] the delivered build quantized with: a replay on another CPU, whose kernels round
    # the calibration runs differently in the last bits, still writes the same scales
    activation_ranges: dict[str, list[float]] | None = None
    # tensor → counts of the non-finite values calibration skipped: with the ranges, a replay needs no calibration
    nonfinite: dict[str, dict[str, int]] | None = None
    weights: dict[str, str] | None = None  # rule 4: initializer → SHA-256 of its file in the weight folder

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Decisions":
        recipe = manifest["recipe"]
        if recipe["runtime"] == "tvm":
            return cls("float", tuning_records=manifest["tvm"]["tuning_records"])
        mixed = manifest.get("mixed")
        sparsity = manifest.get("sparsity", {})
        layers = sparsity.get("layers")
        return cls(manifest["delivered"]["precision"], recipe["optional_ops"], tuple(recipe["keep_float"]),
                   dict(manifest["calibration"]["per_tensor"]),
                   bool((manifest["ptq"].get("auto") or {}).get("kept")),
                   {n: g["precision"] for g in mixed["groups"] for n in g["nodes"]} if mixed else None,
                   tuple(sorted(n for n, layer in layers.items() if layer["eligible"] and not layer["pruned"]))
                   if layers is not None else None,
                   activation_ranges=manifest["calibration"].get("ranges"),
                   nonfinite=manifest["calibration"].get("nonfinite"))

    @classmethod
    def from_dict(cls, data: dict) -> "Decisions":
        return cls(**{**data, "keep_float": tuple(data["keep_float"]),
                      "keep_dense": None if data["keep_dense"] is None else tuple(data["keep_dense"])})

    def to_dict(self) -> dict:
        return asdict(self)


def path_digest(path: Path | None) -> str | None:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.relative_to(path).as_posix().encode() + b"\0" + file_digest(item).encode())
    return digest.hexdigest()


def data_digests(model: Path, options: dict) -> dict:
    """The digests of the files a compile reads (rule 1): the same for every target of a build file."""
    model = Path(model)
    metric = options.get("metric")
    metric_file = metric.rpartition(":")[0] if metric and ".py:" in metric else None
    return {"model": path_digest(model),
            "external_data": {p.name: file_digest(p) for p in sorted(model.parent.glob(f"{model.name}.data"))},
            "calib": path_digest(options.get("calib")), "eval": path_digest(options.get("eval_path")),
            "metric": path_digest(metric_file)}


def inputs_of(data: dict, target: dict) -> dict:
    """Everything a compile reads: the file digests, and its target's resolved description."""
    return data | {"target": hashlib.sha256(json.dumps(target, sort_keys=True, default=str).encode()).hexdigest()}


def entry(manifest: dict, inputs: dict, options: dict, artifact: Path, lock_path: Path) -> dict:
    """One target's lock entry from its finished, measured build in the folder ``artifact``."""
    weights = store_weights(artifact / MODEL, weights_dir(lock_path)) if computed_weights(manifest) else None
    return {"inputs": inputs, "options": _plain(options),
            "decisions": Decisions.from_manifest(manifest).to_dict() | {"weights": weights},
            "artifact": {name: digest for name, digest in manifest["sha256"].items() if name not in NOT_BYTE_STABLE}}


def weights_dir(lock_path: Path) -> Path:
    return Path(lock_path).with_suffix(".weights")


def computed_weights(manifest: dict) -> bool:
    """Rule 4: whether the delivered weights come from a computation another CPU rounds differently."""
    if manifest["recipe"]["runtime"] == "tvm":
        return False
    ptq = manifest["delivered"]["precision"] != "float" and bool(manifest["ptq"]["techniques"])
    return ptq or bool((manifest.get("sparsity") or {}).get("pruned"))


def store_weights(model_path: Path, folder: Path) -> dict[str, str]:
    """Write each initializer of the model's main graph to ``folder`` (content-addressed, once); name → SHA-256."""
    import onnx_ir as ir  # 0.7 s: only a build that records weights pays it

    folder.mkdir(exist_ok=True)
    digests = {}
    for name, value in sorted(ir.load(model_path).graph.initializers.items()):
        buffer = io.BytesIO()
        np.save(buffer, value.const_value.numpy(), allow_pickle=False)
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        path = folder / f"{digest}.npy"
        if not path.exists():
            handle, tmp = tempfile.mkstemp(prefix=f".{digest}.", dir=folder)
            with os.fdopen(handle, "wb") as stream:
                stream.write(buffer.getvalue())
            os.replace(tmp, path)
        digests[name] = digest
    return digests


def load_weights(lock_path: Path, digests: dict[str, str]) -> dict[str, np.ndarray]:
    """Rule 4's tensors for a replay, each checked against its SHA-256."""
    folder, arrays = weights_dir(lock_path), {}
    for name, digest in digests.items():
        try:
            raw = (folder / f"{digest}.npy").read_bytes()
        except OSError:
            raise UserError(f"{folder.name}/{digest[:12]}….npy (weight '{name}' of {Path(lock_path).name}) is missing",
                            f"commit {folder.name}/ with the lock, or --relock") from None
        if hashlib.sha256(raw).hexdigest() != digest:
            raise UserError(f"{folder.name}/{digest[:12]}….npy (weight '{name}') does not match its digest",
                            f"restore {folder.name}/ from version control, or --relock")
        arrays[name] = np.load(io.BytesIO(raw), allow_pickle=False)
    return arrays


def apply_weights(model, arrays: dict[str, np.ndarray]) -> None:
    """Rule 4: the recorded tensors replace the initializers of the same name and shape (the ones this build
    computed); a build the lock's model is not, keeps its own, and the artifact check then refuses it.
    ``model``: an onnx_ir model."""
    import onnx_ir as ir

    for name, value in model.graph.initializers.items():
        array, mine = arrays.get(name), value.const_value
        if array is None or mine is None or tuple(array.shape) != tuple(mine.shape):
            continue
        own = mine.numpy()
        if array.dtype != own.dtype:  # a 4-bit tensor's file holds raw bytes of its width; another type is not it
            if array.dtype.kind != "V" or array.dtype.itemsize != own.dtype.itemsize:
                continue
            array = array.view(own.dtype)
        if array.tobytes() != own.tobytes():  # an equal tensor keeps its own encoding in the file
            value.const_value = ir.tensor(array, dtype=mine.dtype, name=name)


def prune_weights(lock_path: Path, entries: dict[str, dict]) -> None:
    """Remove the weight files no entry names (rule 4), and the folder when none is left."""
    folder = weights_dir(lock_path)
    if not folder.is_dir():
        return
    named = {d for e in entries.values() for d in (e["decisions"].get("weights") or {}).values()}
    for path in folder.glob("*.npy"):
        if path.stem not in named:
            path.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def write(path: Path, entries: dict[str, dict]) -> Path:
    text = json.dumps({"edgeq": FORMAT, "tools": tool_versions(), "targets": entries}, indent=2, sort_keys=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text + "\n")
    os.replace(tmp, path)
    return path


def read(path: Path) -> dict:
    try:
        lock = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no lock {path}", "run 'edgeq build' once (it writes the lock), then --locked") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"lock {path} is not readable JSON ({exc.__class__.__name__})",
                        "restore it from version control, or --relock") from None
    if not isinstance(lock, dict) or lock.get("edgeq") != FORMAT:
        raise UserError(f"lock {path} is format {lock.get('edgeq') if isinstance(lock, dict) else '?'!r}, this "
                        f"edgeq reads {FORMAT!r}", "--relock to rebuild it with this edgeq")
    mine, theirs = tool_versions().get("edgeq", "0"), lock.get("tools", {}).get("edgeq", "0")
    if mine.split(".")[0] != theirs.split(".")[0]:
        raise UserError(f"lock {path} was written by edgeq {theirs}, this is edgeq {mine} (another major version)",
                        "--relock to rebuild it with this edgeq")
    return lock


def check(lock: dict, target: str, inputs: dict, options: dict, path: Path) -> Decisions:
    """Rule 2's comparison: the decisions to replay, or a one-line error naming the first difference."""
    entries = lock.get("targets", {})
    if target not in entries:
        raise UserError(f"lock {path} has no entry for target {target}", "--relock to build and lock it")
    for name, version in sorted(lock.get("tools", {}).items()):
        now = tool_versions().get(name)
        if name == "python":  # a patch release of Python changes no byte edgeq writes
            now, version = (".".join(str(v).split(".")[:2]) if v else v for v in (now, version))
        if now != version:
            raise UserError(f"{name} is {now}, the lock {path} was built with {version}",
                            f"install {name}=={version}, or --relock to accept it")
    locked = entries[target]
    for name, digest in sorted(locked["inputs"].items()):
        if inputs.get(name) != digest:
            raise UserError(f"{target}'s input '{name}' changed since {path} was written",
                            "--relock to rebuild and accept it")
    now = _plain(options)
    changed = sorted(k for k in {*locked["options"], *now} if locked["options"].get(k) != now.get(k))
    if changed:
        raise UserError(f"the build file's option '{changed[0]}' changed since {path} was written",
                        "--relock to rebuild and accept it")
    return Decisions.from_dict(locked["decisions"])


def entry_digest(lock: dict, target: str) -> str:
    """The SHA-256 of one target's lock entry (a replay's artifact is a function of it)."""
    entry = lock.get("targets", {}).get(target)
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _plain(options: dict) -> dict:
    """Options as JSON values (paths as given, tuples as lists), for comparing and storing."""
    return json.loads(json.dumps(options, default=str, sort_keys=True))

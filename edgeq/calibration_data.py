"""CalibrationData: the real inputs a model is calibrated and checked on, streamed one feed at a time.

Accepted sources:
- a folder of ``.npz`` files, one feed each, arrays keyed by model input name;
- a folder of ``.npy`` files, one feed each, for single-input models;
- one ``.npz``/``.npy`` file holding samples stacked on the batch axis; it is cut into feeds of the model's
  batch size (1 when the batch axis is dynamic);
- a folder of images (``.png``/``.jpg``) with a ``preprocess.toml`` that declares size, scale, mean, std and
  layout — preprocessing is never guessed;
- synthetic random feeds, only when asked for explicitly (the manifest then says so).

Arrays in a feed whose key is not a model input are *extras* (labels, say): not fed to the model, handed
to a user metric. Every feed is checked against the model's inputs (names, dtypes, ranks, fixed dims, NaN/Inf);
a mismatch is a one-line :class:`UserError`.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeq.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple | None  # ints for fixed dims, None for dynamic ones; None for an unknown rank

    @property
    def batch(self) -> int:
        fixed = self.shape[0] if self.shape else None
        return fixed if isinstance(fixed, int) and fixed > 0 else 1

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.dtype}[any shape]"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def input_specs(model) -> list[InputSpec]:
    """The graph inputs of an ``onnx_ir`` model that need feeding (initializers excluded). A dim is fixed only
    when it is a positive number: symbolic dims, and the ``-1`` or ``0`` some exporters write for dynamic ones
    (against the spec, as ONNX Runtime also reads them), accept any size."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        try:
            dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        except TypeError:
            raise UserError(f"model input '{value.name}' has no usable element type ({value.dtype})",
                            "declare the input's type (float32, int64, …) in the model") from None
        shape = None if value.shape is None else tuple(d if isinstance(d, int) and d > 0 else None
                                                       for d in value.shape)
        specs.append(InputSpec(value.name, dtype, shape))
    if not specs:
        raise UserError("the model has no inputs: there is nothing to calibrate or measure",
                        "pass a model that reads its data from graph inputs")
    return specs


@dataclass(frozen=True)
class Feed:
    inputs: dict[str, np.ndarray]
    extras: dict[str, np.ndarray]
    origin: str


@dataclass(frozen=True)
class _FeedRef:
    path: Path
    index: int | None  # slice of a stacked file, or None for a whole file


class CalibrationData:
    """An ordered, re-iterable collection of feeds; nothing is held in memory between feeds."""

    def __init__(self, specs: list[InputSpec], refs: list[_FeedRef], kind: str, digest: str,
                 preprocess: dict | None = None, seed: int = 0):
        self.specs = specs
        self._refs = refs
        self.kind = kind
        self.digest = digest
        self.preprocess = preprocess
        self._seed = seed
        self._stack_cache: tuple[Path, dict] | None = None

    # construction -----------------------------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path, specs: list[InputSpec]) -> "CalibrationData":
        path = Path(path)
        if not path.exists():
            raise UserError(f"calibration data not found: {path}", "pass a folder of .npz/.npy feeds or images")
        if path.is_file():
            return cls._from_stacked_file(path, specs)
        files = sorted(p for p in path.iterdir() if p.is_file())
        arrays = [p for p in files if p.suffix in (".npz", ".npy")]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if arrays:
            if any(p.suffix == ".npy" for p in arrays) and len(specs) != 1:
                raise UserError(f"{path} holds .npy files but the model has {len(specs)} inputs",
                                "save each feed as .npz keyed by input name")
            refs = [_FeedRef(p, None) for p in arrays]
            return cls(specs, refs, "arrays", _hash_files(arrays))
        if images:
            return cls._from_images(path, images, specs)
        raise UserError(f"calibration folder {path} is empty (no .npz, .npy or image files)",
                        "put a few hundred real input feeds in it")

    @classmethod
    def _from_stacked_file(cls, path: Path, specs: list[InputSpec]) -> "CalibrationData":
        if path.suffix not in (".npz", ".npy"):
            raise UserError(f"{path} is not a .npz or .npy file", "pass a .npz/.npy file or a folder of them")
        arrays = _read_arrays(path, specs)
        spec = specs[0]
        if spec.name not in arrays:
            raise UserError(f"{path} has no array for model input '{spec.name}'",
                            f"store arrays keyed by input name ({', '.join(s.name for s in specs)})")
        total = arrays[spec.name].shape[0] if arrays[spec.name].ndim else 0
        count = total // spec.batch
        if count == 0:
            raise UserError(f"{path} holds no complete batch of {spec.batch} samples", "add samples")
        refs = [_FeedRef(path, i) for i in range(count)]
        data = cls(specs, refs, "stacked", _hash_files([path]))
        data._stack_cache = (path, arrays)
        return data

    @classmethod
    def _from_images(cls, folder: Path, images: list[Path], specs: list[InputSpec]) -> "CalibrationData":
        recipe_file = folder / "preprocess.toml"
        if not recipe_file.is_file():
            raise UserError(f"image folder {folder} has no preprocess.toml",
                            "declare size = [H, W], scale, mean, std and layout ('NCHW' or 'NHWC') in it")
        if len(specs) != 1:
            raise UserError("image calibration needs a single-input model", "save feeds as .npz instead")
        try:
            pre = tomllib.loads(recipe_file.read_text())
            pre = {
                "size": [int(v) for v in pre["size"]],
                "scale": float(pre.get("scale", 1 / 255)),
                "mean": [float(v) for v in pre.get("mean", [0.0, 0.0, 0.0])],
                "std": [float(v) for v in pre.get("std", [1.0, 1.0, 1.0])],
                "layout": str(pre.get("layout", "NCHW")).upper(),
                "channels": str(pre.get("channels", "RGB")).upper(),
            }
        except (KeyError, ValueError, TypeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"{recipe_file} is invalid ({exc})", "declare size = [H, W] and numeric scale/mean/std") from None
        digest = hashlib.sha256((_hash_files(images) + repr(sorted(pre.items()))).encode()).hexdigest()
        return cls(specs, [_FeedRef(p, None) for p in images], "images", digest, preprocess=pre)

    @classmethod
    def random(cls, specs: list[InputSpec], count: int = 64, seed: int = 0) -> "CalibrationData":
        """Synthetic standard-normal feeds. Only on explicit request: scales from noise are rarely right."""
        for spec in specs:
            if spec.dtype.kind != "f":
                raise UserError(f"random calibration cannot invent values for {spec.dtype} input '{spec.name}'",
                                "pass --calib with real inputs (token ids, indices, masks)")
        digest = hashlib.sha256(f"random:{count}:{seed}".encode()).hexdigest()
        return cls(specs, [_FeedRef(Path("<random>"), i) for i in range(count)], "random", digest, seed=seed)

    # access -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._refs)

    def __iter__(self) -> Iterator[Feed]:
        for ref in self._refs:
            yield self._load(ref)

    def split(self, holdout_fraction: float) -> tuple["CalibrationData", "CalibrationData | None"]:
        """Hold back every k-th feed for evaluation (deterministic); the rest calibrates."""
        if holdout_fraction <= 0 or len(self._refs) < 2:
            return self, None
        step = max(2, round(1 / holdout_fraction))
        held_index = {i for i in range(len(self._refs)) if i % step == step - 1} or {len(self._refs) - 1}
        held = [r for i, r in enumerate(self._refs) if i in held_index]
        kept = [r for i, r in enumerate(self._refs) if i not in held_index]
        return self._subset(kept, "calib"), self._subset(held, "holdout")

    def _subset(self, refs: list[_FeedRef], tag: str) -> "CalibrationData":
        digest = hashlib.sha256(f"{self.digest}:{tag}:{len(refs)}".encode()).hexdigest()
        sub = CalibrationData(self.specs, refs, self.kind, digest, self.preprocess, self._seed)
        sub._stack_cache = self._stack_cache
        return sub

    def describe(self) -> dict:
        return {"kind": self.kind, "feeds": len(self), "sha256": self.digest, "preprocess": self.preprocess,
                "random": self.kind == "random"}

    # loading ----------------------------------------------------------------------------------------
    def _load(self, ref: _FeedRef) -> Feed:
        if self.kind == "random":
            rng = np.random.default_rng([self._seed, ref.index])
            inputs = {s.name: rng.standard_normal([d or 1 for d in (s.shape or (1,))]).astype(s.dtype) for s in self.specs}
            return Feed(inputs, {}, f"random[{ref.index}]")
        if self.kind == "images":
            arrays = {self.specs[0].name: _load_image(ref.path, self.preprocess, self.specs[0].dtype)}
        elif self.kind == "stacked":
            if self._stack_cache is None or self._stack_cache[0] != ref.path:
                self._stack_cache = (ref.path, _read_arrays(ref.path, self.specs))
            whole = self._stack_cache[1]
            b = self.specs[0].batch
            arrays = {k: v[ref.index * b:(ref.index + 1) * b] for k, v in whole.items()}
        else:
            arrays = _read_arrays(ref.path, self.specs)
        origin = ref.path.name if ref.index is None else f"{ref.path.name}[{ref.index}]"
        return _check_feed(arrays, self.specs, origin)


def _read_arrays(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npy":
            return {specs[0].name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except Exception as exc:
        raise UserError(f"cannot read feed file {path.name} ({type(exc).__name__}: {exc})",
                        "save feeds with numpy.savez / numpy.save") from None


def _check_feed(arrays: dict[str, np.ndarray], specs: list[InputSpec], origin: str) -> Feed:
    inputs = {}
    for spec in specs:
        if spec.name not in arrays:
            raise UserError(f"feed {origin} lacks model input '{spec.name}' (it has: {', '.join(arrays) or 'nothing'})",
                            f"store arrays keyed by the model's input names: {', '.join(s.name for s in specs)}")
        value = arrays[spec.name]
        if spec.dtype == object and value.dtype.kind in "US":  # numpy saves strings as str_ / bytes_ arrays
            value = value.astype(object)
        if value.dtype != spec.dtype:
            raise UserError(f"feed {origin}: input '{spec.name}' is {value.dtype}, the model expects {spec.dtype}",
                            f"save it as {spec.dtype}")
        if spec.shape is not None and value.ndim != len(spec.shape) or any(
            d is not None and d != v for d, v in zip(spec.shape or (), value.shape)
        ):
            raise UserError(f"feed {origin}: input '{spec.name}' has shape {list(value.shape)}, "
                            f"the model expects {spec.describe()}", "reshape the feed to the model's input shape")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise UserError(f"feed {origin}: input '{spec.name}' contains NaN or Inf",
                            "clean or drop that feed")
        inputs[spec.name] = value
    extras = {k: v for k, v in arrays.items() if k not in inputs}
    return Feed(inputs, extras, origin)


def _load_image(path: Path, pre: dict, dtype: np.dtype) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if pre["channels"] == "L" else "RGB").resize(tuple(pre["size"][::-1]))
            pixels = np.asarray(img, dtype=np.float32)
    except OSError as exc:
        raise UserError(f"cannot read image {path.name} ({exc})", "remove or replace the file") from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pre["channels"] == "BGR":
        pixels = pixels[..., ::-1]
    pixels = (pixels * pre["scale"] - np.asarray(pre["mean"][: pixels.shape[-1]], np.float32)) / np.asarray(
        pre["std"][: pixels.shape[-1]], np.float32)
    if pre["layout"] == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[None]).astype(dtype)


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()

"""Recipe: what a compile does, fully resolved so that a build can be replayed.

Every field has a default; the CLI fills the rest from flags. ``to_dict`` is written into ``manifest.json``
and ``Recipe.from_dict`` reads it back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from edgeq.errors import UserError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
SCHEMES = ("int8", "mixed", "float")
RUNTIMES = ("onnxruntime", "tvm")
SENSITIVITY = ("auto", "measured", "proxy")
SPARSITY = ("none", "2:4")
PACKAGES = ("none", "ort")  # ort: model.ort + the reduced-build operator config (edgeq.runtimes.ort_format)
SPARSITY_METHODS = ("reconstruct", "magnitude")
PTQ_TECHNIQUES = ("cle", "smoothquant", "gptq", "bias-correction")  # edgeq.ptq_stage
PTQ_ON_GUARD_MISS = ("gptq", "bias-correction")  # what --ptq auto tries when uniform int8 misses the guard
SMALLER_SHARE = 0.5  # an int8 build at most this share of float's bytes is a size win (Recipe.max_ratio_for)


@dataclass(frozen=True)
class Exclusions:
    """Nodes that stay float: by exact node name, by regular expression on the name, or by op type."""

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()

    @classmethod
    def parse(cls, specs: tuple[str, ...] | list[str]) -> "Exclusions":
        """Parse CLI specs: ``name:NODE``, ``re:REGEX``, ``op:OPTYPE``; a bare word is a node name."""
        names, patterns, op_types = [], [], []
        for spec in specs:
            kind, sep, value = spec.partition(":")
            if not sep:
                names.append(spec)
            elif kind == "name":
                names.append(value)
            elif kind == "re":
                patterns.append(value)
            elif kind == "op":
                op_types.append(value)
            else:
                raise UserError(f"bad --exclude '{spec}'", "use name:NODE, re:REGEX or op:OPTYPE")
        return cls(tuple(names), tuple(patterns), tuple(op_types))


@dataclass(frozen=True)
class Recipe:
    # "mixed": a precision per layer group from the target's candidates, within budgets; "float": no
    # quantization (the TVM runtime's only scheme: TVM has no integer kernels for ONNX QDQ)
    scheme: str = "int8"
    runtime: str = "onnxruntime"  # or "tvm": a tuned TVM library instead of an ONNX model for ONNX Runtime
    tune_trials: int = 0  # --runtime tvm: MetaSchedule trials for the model (cumulative in the tuning database)
    method: str = "percentile"  # measured best SQNR on the whole zoo (benchmarks/vs_ort_quantizer.py)
    # Which optional op groups to quantize — the target's requant ops (Add, Mul, Concat, …) and ActMatMul
    # (MatMuls of two activations): "auto" (measure candidate sets, keep the best), "all", "none"
    # (Conv/Gemm/MatMul with weights, and passthrough ops, only), or a comma-separated list.
    optional_ops: str = "auto"
    percentile: float = 99.999
    # post-training techniques on top of calibration (PTQ_TECHNIQUES), or ("auto",): none, unless the fidelity
    # guard misses — then PTQ_ON_GUARD_MISS is built on its most sensitive groups, measured, and kept where it
    # does no worse
    ptq: tuple[str, ...] = ("auto",)
    exclude: Exclusions = field(default_factory=Exclusions)
    holdout_fraction: float = 0.2
    allow_random_calibration: bool = False
    max_drop: float | None = None
    guard: bool = True  # with no --metric/--max-drop: hold every output to edgeq.guard's default (int8 scheme)
    latency_ms: float | None = None  # --scheme mixed: median latency budget on the target
    size_mb: float | None = None  # --scheme mixed: model size budget (10^6 bytes)
    mixed_iterations: int = 4  # builds measured by the mixed-precision feedback loop, at most
    sensitivity_feeds: int = 8  # calibration feeds each one-group sensitivity build runs
    sensitivity: str = "auto"  # "measured" (gated model / a build per group), "proxy" (layer statistics), "auto"
    no_slowdown: bool = True
    max_ratio: float = 0.97  # deliver int8 only when int8/float median latency is at most this,
    # or at most this where int8 takes at most SMALLER_SHARE of float's bytes: not measurably slower (two builds
    # of equal compute, measured interleaved, differ by up to 0.5% here: a bar at 1.0 flipped between runs)
    max_ratio_smaller: float = 1.01
    max_revert_rounds: int = 2
    latency_repeats: int = 50
    latency_warmup: int = 5
    seed: int = 0
    sparsity: str = "none"  # "2:4": prune eligible layers to 2:4 before calibration
    sparsity_method: str = "reconstruct"  # or "magnitude" (no reconstruction)
    sparsity_permute: bool = False  # search an input-channel order that keeps more magnitude
    package: str = "none"  # PACKAGES: what is delivered beside model.onnx

    def max_ratio_for(self, int8_bytes: int, float_bytes: int) -> float:
        """The largest int8/float median latency ratio delivered: ``max_ratio`` (a gain inside measurement noise
        does not pay for the accuracy int8 costs), or ``max_ratio_smaller`` for a build of at most
        :data:`SMALLER_SHARE` of float's bytes, whose size gain pays for it: it need only be not measurably
        slower."""
        return self.max_ratio_smaller if int8_bytes <= SMALLER_SHARE * float_bytes else self.max_ratio

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise UserError(f"unknown scheme '{self.scheme}'", f"use one of {SCHEMES}")
        if self.runtime not in RUNTIMES:
            raise UserError(f"unknown runtime '{self.runtime}'", f"use one of {RUNTIMES}")
        if self.runtime == "tvm" and self.scheme != "float":
            raise UserError(f"--runtime tvm builds float models only (--scheme {self.scheme} asked): TVM 0.27 has no "
                            "integer kernels for ONNX QDQ", "drop --scheme, or use --runtime onnxruntime for int8")
        if self.runtime == "onnxruntime" and self.scheme == "float":
            raise UserError("--scheme float is the TVM runtime's (ONNX Runtime runs the float model as it is)",
                            "add --runtime tvm, or choose --scheme int8 or mixed")
        if self.tune_trials < 0 or (self.tune_trials and self.runtime != "tvm"):
            raise UserError("--tune-trials tunes TVM kernels and must not be negative", "add --runtime tvm")
        if self.runtime == "tvm" and self.sparsity != "none":
            raise UserError("--sparsity 2:4 needs sparse kernels, which edgeq's TVM builds do not have",
                            "use --runtime onnxruntime with a sparse target")
        if self.scheme == "mixed" and self.max_drop is None and self.latency_ms is None and self.size_mb is None:
            raise UserError("--scheme mixed needs a budget to allocate against",
                            "give --max-drop, --latency-ms and/or --size-mb")
        if self.scheme != "mixed" and (self.latency_ms is not None or self.size_mb is not None):
            raise UserError("--latency-ms and --size-mb are budgets of the mixed-precision allocation",
                            "add --scheme mixed")
        if self.scheme == "mixed" and self.sparsity != "none":
            raise UserError("--scheme mixed with --sparsity 2:4 is not supported yet",
                            "compile with one of the two")
        for name in ("latency_ms", "size_mb"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number (got {value})", "e.g. 10")
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise UserError(f"--max-drop must be a number ≥ 0 (got {self.max_drop})", "e.g. 0.01 or 1%")
        if self.latency_repeats < 1 or self.latency_warmup < 0:
            raise UserError("--repeats must be at least 1", "e.g. 50")
        if self.method not in CALIBRATION_METHODS:
            raise UserError(f"unknown calibration method '{self.method}'", f"use one of {CALIBRATION_METHODS}")
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"percentile {self.percentile} out of range", "use a value in (50, 100], e.g. 99.999")
        unknown = [t for t in self.ptq if t not in PTQ_TECHNIQUES] if self.ptq != ("auto",) else []
        if unknown:
            raise UserError(f"unknown --ptq technique '{unknown[0]}'",
                            f"use 'auto', 'none' or a list of {', '.join(PTQ_TECHNIQUES)}")
        if self.sensitivity not in SENSITIVITY:
            raise UserError(f"unknown sensitivity mode '{self.sensitivity}'", f"use one of {SENSITIVITY}")
        if self.sparsity not in SPARSITY:
            raise UserError(f"unknown sparsity '{self.sparsity}'", f"use one of {SPARSITY}")
        if self.sparsity_method not in SPARSITY_METHODS:
            raise UserError(f"unknown sparsity method '{self.sparsity_method}'", f"use one of {SPARSITY_METHODS}")
        if self.package not in PACKAGES:
            raise UserError(f"unknown package '{self.package}'", f"use one of {PACKAGES}")
        if self.package == "ort" and self.runtime != "onnxruntime":
            raise UserError("--package ort packages ONNX Runtime models; --runtime tvm delivers model.so",
                            "drop --package, or use --runtime onnxruntime")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise UserError("holdout fraction must be in [0, 1)", "e.g. 0.2")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["ptq"] = tuple(data.get("ptq", ("auto",)))
        values["exclude"] = Exclusions(**{k: tuple(v) for k, v in data.get("exclude", {}).items()})
        return cls(**values)

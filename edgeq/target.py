"""Target: a device description read from a TOML file.

A target says what the device can run fast, and edgeq only quantizes what it can run fast:
- ``[quantization]``: activation/weight integer types and which ops have integer kernels. ``compute_ops``
  carry weights (Conv, MatMul, …); ``requant_ops`` have integer kernels that requantize (Add, Concat, …);
  ``passthrough_ops`` move integers unchanged (MaxPool, Reshape, …) and share their input's scale.
  ``symmetric_activations`` forces zero point 0 (TensorRT's explicit quantization requires it).
  ``dynamic_matmuls`` says the runtime has dynamic int8 MatMul kernels (activation scales computed at run
  time), which makes ``DynamicMatMul`` an optional op set member. ``dynamic_lstm`` says it has a dynamic int8
  LSTM kernel: an LSTM is then quantized that way in every int8 build (it has no static form), unless measured
  back to float. ``pool_as_reduce`` says an int8 MaxPool over
  non-overlapping windows runs faster as Reshape + ReduceMax (:mod:`edgeq.passes.pool_as_reduce`).
- ``[sparsity]``: the structured-sparsity patterns the device has kernels for (``patterns = ["2:4"]``), and
  the rules a layer must meet to use them: op types, weight dtypes, minimum input/output channels, a
  multiple for the input channels; ``pays_from_channels`` is where sparse kernels start to pay. No section:
  no sparse kernels.
- ``[precisions]``: the precisions ``--scheme mixed`` may give a layer (``candidates``): ``float``, ``fp16``
  (weights stored in float16), ``int8`` (W8A8 QDQ), ``int16`` (W8A16: 16-bit activations, for devices with
  16-bit activation kernels; ORT's CPU EP has none) and ``int4`` (weight-only, block-wise along the reduction
  axis, ``int4_block_size`` rows per scale; MatMuls with a 2-D constant weight, which ORT runs as
  ``MatMulNBits``). No section: float and int8.
- ``[onnxruntime]``: execution providers and thread counts for building and measuring.
- ``[tvm]``: for ``--runtime tvm``: the TVM target (``kind`` llvm or cuda, ``mcpu``, ``mtriple``, ``mattr``,
  ``num-cores`` = threads, ``arch`` for CUDA, ``host`` for the CPU side of a GPU target) and the
  ``cross_compiler`` that links a library for another architecture. No section: no TVM builds.
- ``[measure]``: where latency is measured (``where``: ``local``, ``ssh://…`` or ``rpc://…``, see
  :mod:`edgeq.devices`; ``--device`` overrides it), the CPU flags the device must have (``cpu_flags``, as Linux
  names them in ``/proc/cpuinfo``: int8 numerics and speed on x86 depend on VNNI, and AVX2 code dies on a CPU
  without it), and the noise settings of :mod:`edgeq.devices.agent` (``pin_cpus``, ``cooldown_s``,
  ``retries``). A device that does not match the target measures nothing (:mod:`edgeq.devices.base`).

Bundled targets live in ``edgeq/targets/*.toml``; a user may pass the path of their own file.
"""

from __future__ import annotations

import platform
import tomllib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from edgeq.errors import UserError

_INT_TYPES = ("uint8", "int8")
SPARSITY_PATTERNS = ("2:4",)
PRECISIONS = ("float", "fp16", "int8", "int16", "int4")
TVM_KINDS = ("llvm", "cuda")
# x86 CPU flags (/proc/cpuinfo names) of int8 dot products that accumulate without saturating.
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class QuantizationRules:
    activations: str
    weights: str
    per_channel: bool
    compute_ops: tuple[str, ...]
    requant_ops: tuple[str, ...]
    passthrough_ops: tuple[str, ...]
    activation_fusions: tuple[str, ...] = ("Relu", "Clip")
    activation_matmuls: bool = True  # quantize MatMuls of two activations (attention scores, attention · V)
    dynamic_matmuls: bool = False  # the runtime has dynamic int8 MatMul kernels (ORT CPU: DynamicQuantizeMatMul)
    dynamic_lstm: bool = False  # the runtime has a dynamic int8 LSTM kernel (ORT CPU: DynamicQuantizeLSTM)
    pool_as_reduce: bool = False  # int8 MaxPool over non-overlapping windows runs faster as Reshape + ReduceMax
    reduce_range: bool = False  # 7-bit weights: avoids u8*s8 overflow in AVX2 (non-VNNI) kernels
    symmetric_activations: bool = False


@dataclass(frozen=True)
class SparsityRules:
    patterns: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()  # precisions the sparse kernels run in (the build enables them)
    min_in_channels: int = 0
    min_out_channels: int = 0
    in_channel_multiple: int = 4
    pays_from_channels: int = 0
    note: str = ""


@dataclass(frozen=True)
class PrecisionRules:
    candidates: tuple[str, ...] = ("float", "int8")
    int4_block_size: int = 32


@dataclass(frozen=True)
class OrtSettings:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    provider_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TvmSettings:
    target: dict
    cross_compiler: str = ""

    @property
    def kind(self) -> str:
        return self.target["kind"]

    @property
    def arch(self) -> str:
        """The CPU architecture the library is linked for (the host's for a GPU target)."""
        triple = self.target.get("host", self.target).get("mtriple", "")
        return triple.split("-")[0] if triple else "x86_64"


@dataclass(frozen=True)
class NoiseSettings:
    """How latency is measured on the device (:mod:`edgeq.devices.agent`'s noise rule)."""

    pin: tuple[int, ...] = ()  # CPU ids the measuring thread runs on; () lets the OS choose
    cooldown_s: float = 0.0  # pause before each measurement (a passively cooled board)
    retries: int = 1  # repeats of a measurement flagged throttled or busy, once its cause has passed

    def to_dict(self) -> dict:
        return {"pin": list(self.pin) or None, "cooldown_s": self.cooldown_s, "retries": self.retries}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    quantization: QuantizationRules
    onnxruntime: OrtSettings
    sparsity: SparsityRules = field(default_factory=SparsityRules)
    precisions: PrecisionRules = field(default_factory=PrecisionRules)
    tvm: TvmSettings | None = None
    measure_where: str = "local"
    cpu_flags: tuple[str, ...] = ()
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    source: str = ""

    def with_device(self, device: str | None) -> "Target":
        """This target measured on another device (an address of :mod:`edgeq.devices`, checked here)."""
        if device is None:
            return self
        from edgeq.devices import validate

        return replace(self, measure_where=validate(device))

    def int8_caveat_here(self) -> str:
        """Why this machine's ONNX Runtime would compute the target's int8 models less accurately than the
        target does ('' when it computes them alike): on x86 without VNNI, int8 kernels (AVX2's vpmaddubsw) add
        pairs of 8-bit products in saturating 16-bit lanes, which full-range weights overflow."""
        if host_arch() != "x86_64" or self.quantization.reduce_range:
            return ""
        if set(EXACT_INT8_FLAGS) & host_cpu_flags(EXACT_INT8_FLAGS):
            return ""
        return (f"this CPU has no VNNI: its int8 kernels saturate products of {self.name}'s full-range 8-bit weights, "
                "so accuracy measured here is lower than on the target")

    def to_dict(self) -> dict:
        return asdict(self)


def host_arch() -> str:
    """This machine's architecture, named as targets name theirs (x86_64, aarch64)."""
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def host_cpu_flags(wanted: tuple[str, ...]) -> set[str]:
    """The CPU flags this machine has, as ``/proc/cpuinfo`` names them; where that file does not exist (not
    Linux), the ``wanted`` ones are assumed present."""
    from edgeq.devices.agent import cpu_flags

    return set(cpu_flags()) or set(wanted)


def host_x86_target(runtime: str = "onnxruntime") -> str:
    """The bundled x86 target this machine can measure ``runtime`` on: AVX512-VNNI where its CPU has it, else
    AVX2 (``x86-64``, whose 7-bit weights AVX2's int8 kernels do not saturate)."""
    from edgeq.devices.local import LocalDevice

    return "x86-avx512-vnni" if not LocalDevice().check(load_target("x86-avx512-vnni"), runtime) else "x86-64"


def bundled_target_names() -> list[str]:
    folder = resources.files("edgeq.targets")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_target(name_or_path: str) -> Target:
    """Load a bundled target by name, or a user's TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"target file not found: {path}", "check the path, or run 'edgeq targets'")
        try:
            text, source = path.read_text(), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read target file {path} ({exc})", "pass a UTF-8 TOML file") from None
    else:
        if name_or_path not in bundled_target_names():
            raise UserError(
                f"unknown target '{name_or_path}'",
                f"use one of: {', '.join(bundled_target_names())}, or the path of a target .toml file",
            )
        text = resources.files("edgeq.targets").joinpath(f"{name_or_path}.toml").read_text()
        source = f"bundled:{name_or_path}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"target file {source} is not valid TOML ({exc})", "fix the syntax") from None
    return _parse(data, source)


def _parse(data: dict, source: str) -> Target:
    try:
        q = data["quantization"]
        rules = QuantizationRules(
            activations=q["activations"],
            weights=q["weights"],
            per_channel=bool(q.get("per_channel", True)),
            compute_ops=tuple(q["compute_ops"]),
            requant_ops=tuple(q.get("requant_ops", ())),
            passthrough_ops=tuple(q.get("passthrough_ops", ())),
            activation_fusions=tuple(q.get("activation_fusions", ("Relu", "Clip"))),
            reduce_range=bool(q.get("reduce_range", False)),
            activation_matmuls=bool(q.get("activation_matmuls", True)),
            dynamic_matmuls=bool(q.get("dynamic_matmuls", False)),
            dynamic_lstm=bool(q.get("dynamic_lstm", False)),
            pool_as_reduce=bool(q.get("pool_as_reduce", False)),
            symmetric_activations=bool(q.get("symmetric_activations", False)),
        )
        sp = data.get("sparsity", {})
        sparsity = SparsityRules(
            patterns=tuple(sp.get("patterns", ())),
            ops=tuple(sp.get("ops", ("Conv", "Gemm", "MatMul"))),
            dtypes=tuple(sp.get("dtypes", ())),
            min_in_channels=int(sp.get("min_in_channels", 0)),
            min_out_channels=int(sp.get("min_out_channels", 0)),
            in_channel_multiple=int(sp.get("in_channel_multiple", 4)),
            pays_from_channels=int(sp.get("pays_from_channels", 0)),
            note=sp.get("note", ""),
        )
        pr = data.get("precisions", {})
        precisions = PrecisionRules(candidates=tuple(pr.get("candidates", ("float", "int8"))),
                                    int4_block_size=int(pr.get("int4_block_size", 32)))
        ort = data.get("onnxruntime", {})
        tvm = data.get("tvm")
        measure = data.get("measure", {})
        target = Target(
            name=data["name"],
            description=data.get("description", ""),
            arch=data["arch"],
            quantization=rules,
            onnxruntime=OrtSettings(
                providers=tuple(ort.get("providers", ("CPUExecutionProvider",))),
                intra_op_threads=int(ort.get("intra_op_threads", 1)),
                inter_op_threads=int(ort.get("inter_op_threads", 1)),
                provider_options=dict(ort.get("provider_options", {})),
            ),
            sparsity=sparsity,
            precisions=precisions,
            tvm=TvmSettings(dict(tvm["target"]), tvm.get("cross_compiler", "")) if tvm else None,
            measure_where=measure.get("where", "local"),
            cpu_flags=tuple(measure.get("cpu_flags", ())),
            noise=NoiseSettings(tuple(int(c) for c in measure.get("pin_cpus", ())),
                                float(measure.get("cooldown_s", 0.0)), int(measure.get("retries", 1))),
            source=source,
        )
    except KeyError as exc:
        raise UserError(f"target {source} lacks the key {exc}", "see targets/x86-64.toml for the format") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"target {source} has a value of the wrong type ({exc})",
                        "see targets/x86-64.toml for the format") from None
    for kind in (rules.activations, rules.weights):
        if kind not in _INT_TYPES:
            raise UserError(f"target {source}: unsupported integer type '{kind}'", f"use one of {_INT_TYPES}")
    if rules.symmetric_activations and rules.activations != "int8":
        raise UserError(f"target {source}: symmetric activations need activations = \"int8\"", "fix the target file")
    unknown = sorted(set(sparsity.patterns) - set(SPARSITY_PATTERNS))
    if unknown:
        raise UserError(f"target {source}: unknown sparsity pattern {unknown}", f"use one of {SPARSITY_PATTERNS}")
    unknown = sorted(set(precisions.candidates) - set(PRECISIONS))
    if unknown or "float" not in precisions.candidates:
        raise UserError(f"target {source}: precisions.candidates {list(precisions.candidates)} must include float "
                        "and name only known precisions", f"use some of {PRECISIONS}")
    block = precisions.int4_block_size
    if block < 16 or block & (block - 1):
        raise UserError(f"target {source}: int4_block_size {block} is not a power of two ≥ 16",
                        "use 32 (ONNX Runtime's MatMulNBits default)")
    if target.tvm and target.tvm.kind not in TVM_KINDS:
        raise UserError(f"target {source}: unsupported TVM target kind '{target.tvm.kind}'", f"use one of {TVM_KINDS}")
    from edgeq.devices import validate

    validate(target.measure_where)
    if sparsity.in_channel_multiple % 4:
        raise UserError(f"target {source}: in_channel_multiple must be a multiple of 4 (groups of four)",
                        "fix the target file")
    return target

"""Apache TVM implementation of the Runtime protocol: ONNX → Relax → one shared library for the target.

Rules:
- Import: ``tvm.relax.frontend.onnx`` at fixed input shapes (those of the feed the library will run on),
  weights bound as constants, so the library is the whole model.
- Lowering: ``DecomposeOpsForInference``; edgeq's Relax rewrites (constants folded, on a CPU convolutions
  channels-last: :mod:`edgeq.runtimes.tvm_rewrites`); then legalize and fuse, on a CPU with weights marked
  layout-free — the fused functions are the tasks MetaSchedule tunes
  (:mod:`edgeq.runtimes.tvm_tuning`). A tuning database, when given, supplies schedules for the tasks it has
  records of (``MetaScheduleApplyDatabase``), with the weight layouts they chose packed into the constants at
  build time; TVM's default schedules (``dlight``) cover the rest where it has them (GEMV and reductions on CPU;
  all GPU kernels, which cannot run unscheduled).
- Export: ``export_library``, linked by the target's ``cross_compiler`` when the library is for another
  architecture; the ELF header of what was written must name the target's architecture.
- Run: the Relax VM on the target's device with the target's ``num-cores`` threads (``TVM_NUM_THREADS``, which a
  process reads once: the first library it runs sets it), or on a board behind a TVM RPC tracker (the library is
  uploaded; latency is the device's own timer, without the network).
- Latency: the same interleaved protocol as ONNX Runtime (:func:`edgeq.runtimes.base.measure_interleaved`).
- Kernel times: each kernel call timed by the VM's instrument hook where the library runs — here, or on a board
  that runs ``edgeq device serve`` (:data:`KERNEL_TIMES`, registered at its start-up): a host-side hook would
  time the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from edgeq.devices.rpc import rpc_address
from edgeq.errors import UserError
from edgeq.passes.normalize import QUANTIZED_OPS
from edgeq.runtimes.base import Latency, NodeTime, measure_interleaved
from edgeq.runtimes.onnxruntime import OnnxRuntime
from edgeq.target import Target, host_arch

LIBRARY = "model.so"
KERNEL_TIMES = "edgeq.tvm_kernel_times"  # a board's global function: (uploaded library, feed .npz, runs) → JSON
# ELF e_machine codes of the architectures edgeq builds for.
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


def _tvm():
    """TVM, imported on first use (a few seconds): only ``--runtime tvm`` pays for it."""
    try:
        import tvm
        from tvm import relax  # noqa: F401  (registers the Relax passes and VM)
    except ImportError:
        raise UserError("--runtime tvm needs Apache TVM, which is not installed",
                        "pip install 'edgeq[tvm]' (apache-tvm 0.27)") from None
    return tvm


def tvm_target(target: Target):
    if target.tvm is None:
        raise UserError(f"target {target.name} has no [tvm] section", "use a target that lists one (edgeq targets)")
    return _tvm().target.Target(target.tvm.target)


def device_present(target: Target) -> tuple[bool, str]:
    """Whether this machine has the target's device: a CUDA GPU for a CUDA target; for a CPU target, a CPU with
    every instruction-set extension the target's ``mcpu``/``mattr`` let LLVM use (else the library would die of
    an illegal instruction here)."""
    if target.tvm is None:
        return False, f"target {target.name} has no [tvm] section"
    if target.tvm.kind == "cuda":
        return (True, "") if _tvm().cuda(0).exist else (False, "no CUDA GPU on this machine")
    missing = missing_cpu_features(target)
    if missing:
        return False, (f"target {target.name}'s TVM build uses {', '.join(missing[:4])}"
                       f"{' …' if len(missing) > 4 else ''}, which this CPU ({host_cpu()}) lacks")
    return True, ""


# LLVM feature names that are instruction-set extensions (the rest are tuning hints such as "fast-gather").
_ISA_FEATURES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "gfni", "vaes", "vpclmulqdq", "movbe",
                 "popcnt", "lzcnt", "neon", "dotprod", "fullfp16", "i8mm", "bf16", "sve")


def host_cpu() -> str:
    """This machine's CPU as LLVM names it (e.g. ``sapphirerapids``, ``znver1``)."""
    return _tvm().target.codegen.llvm_get_system_cpu()


def missing_cpu_features(target: Target) -> list[str]:
    """Instruction-set extensions a CPU target's code may use that this machine's CPU lacks."""
    tvm = _tvm()
    features = tvm.target.codegen.llvm_get_cpu_features
    wanted = features(tvm_target(target))
    have = features(tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()}))
    return sorted(f for f in wanted if f.startswith(_ISA_FEATURES) and f not in have)


def library_arch(path: Path) -> str:
    """The architecture an ELF shared library was built for, from its header."""
    header = Path(path).read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        return "not an ELF file"
    machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
    return ELF_MACHINES.get(machine, f"ELF machine {machine}")


def static_shapes(model_path: Path, feed: Mapping[str, np.ndarray] | None) -> dict[str, list[int]]:
    """Input shapes to build for: the feed's, else the model's own (which must then be static)."""
    if feed is not None:
        return {name: list(np.shape(value)) for name, value in feed.items()}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    shapes = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if not all(dims):
            raise UserError(f"input {value.name} of {model_path.name} has a dynamic shape",
                            "give feeds (--feeds/--calib) whose shapes the library is built for")
        shapes[value.name] = dims
    return shapes


def refuse_quantized(name: str, quantized_ops: list[str]) -> None:
    """Quantized models go to ONNX Runtime: TVM would run them slower than their float build."""
    if quantized_ops:
        raise UserError(f"{name} is quantized ({', '.join(sorted(set(quantized_ops))[:3])}): TVM 0.27 has no integer "
                        "kernels for ONNX QDQ and runs it as float fake-quant, slower than the float model",
                        "give TVM the float model, or use --runtime onnxruntime for int8")


def import_onnx(model_path: Path, shapes: dict[str, list[int]]):
    """The model as a Relax module, weights bound as constants."""
    tvm = _tvm()
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(model_path))
    refuse_quantized(model_path.name, [n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS])
    try:
        mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises bare errors for ops it lacks (LSTM, Loop, QLinearConv, …)
        raise UserError(f"TVM's ONNX importer cannot read {model_path.name}: {str(exc).splitlines()[0][:200]}",
                        "use --runtime onnxruntime for this model") from None
    return tvm.relax.transform.DecomposeOpsForInference()(mod)


def fuse(mod, target):
    """Legalize and fuse: the fused primitive functions are the tuning tasks. Before that, edgeq's Relax rewrites
    (:mod:`edgeq.runtimes.tvm_rewrites`); after it, on a CPU, every task's weights are marked layout-free, so each
    schedule may choose the weight layout its loops read fastest (MetaSchedule's RewriteLayout; the packing is
    folded into the constants at build time)."""
    tvm = _tvm()
    relax = tvm.relax
    from edgeq.runtimes import tvm_rewrites

    cpu = target.kind.name == "llvm"
    passes = [*tvm_rewrites.before_legalize(mod, cpu), relax.transform.LegalizeOps(),
              relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    if cpu:
        passes += [relax.transform.CanonicalizeBindings(), relax.transform.AttachAttrLayoutFreeBuffers()]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def _default_schedules(target):
    """TVM's rule-based schedules for the functions no database record covers."""
    from tvm.s_tir import dlight as dl

    if target.kind.name == "cuda":
        rules = (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    else:
        rules = (dl.cpu.GEMV(), dl.cpu.Reduction())
    return dl.ApplyDefaultSchedule(*rules)


def compile_fused(fused, target, database=None):
    """A fused module → an executable: database schedules first (their weight packing split out and folded
    into the constants), then default schedules, then codegen."""
    tvm = _tvm()
    relax = tvm.relax
    with target, tvm.transform.PassContext(opt_level=3):
        if database is not None:
            with database:  # the pass reads the database in scope
                fused = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(fused)
            from edgeq.runtimes import tvm_rewrites

            fused = tvm_rewrites.fold_weight_packing(relax.transform.SplitLayoutRewritePreproc()(fused))
        fused = _default_schedules(target)(fused)
    return tvm.compile(fused, target=target)


def check_cuda_kernels(module, target) -> dict:
    """A CUDA library built without a GPU carries its kernels as CUDA C, which the device's NVRTC compiles when
    the library loads; here nvcc compiles that source for the target's architecture, so a kernel the device
    could not compile fails now rather than on the board."""
    stack, source = [module], None
    while stack and source is None:
        current = stack.pop()
        source = current.inspect_source("cuda") if current.kind == "cuda" else None
        stack.extend(current.imports)
    arch = target.attrs.get("arch", "")
    report = {"form": "CUDA C, compiled by NVRTC when the library loads", "arch": arch,
              "source_bytes": len(source or "")}
    if source is None or shutil.which("nvcc") is None:
        return report | {"nvcc_check": "not run: no nvcc here" if source else "no CUDA kernels"}
    from tvm.support import nvcc

    with target:  # nvcc's helpers read the architecture from the current target
        cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc")
    return report | {"nvcc_check": f"ok: {len(cubin)} bytes of {arch} code"}


class _TvmSession:
    """A library loaded into the Relax VM, locally or on an RPC device."""

    def __init__(self, library: Path, target: Target, remote=None):
        tvm = _tvm()
        kind = target.tvm.kind
        if remote is None:
            module = tvm.runtime.load_module(str(library))
            self.device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
        else:
            # A name per content: re-uploading over a library the board's process has loaded crashes it.
            self.name = f"{hashlib.sha256(Path(library).read_bytes()).hexdigest()[:16]}-{Path(library).name}"
            remote.upload(str(library), target=self.name)
            module = remote.load_module(self.name)
            self.device = remote.cuda(0) if kind == "cuda" else remote.cpu(0)
        self.remote = remote
        threads = _threads(target)
        if threads and remote is not None:  # a board of its own: TVM's usual setting, threads pinned to big cores
            remote.get_function("runtime.config_threadpool")(1, threads)
        self.vm = tvm.relax.VirtualMachine(module, self.device)
        self._tvm = tvm

    def to_device(self, feeds: Mapping[str, np.ndarray]) -> list:
        return [self._tvm.runtime.tensor(np.ascontiguousarray(v), self.device) for v in feeds.values()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        result = self.vm["main"](*self.to_device(feeds))
        outputs = [result] if hasattr(result, "numpy") else list(result)
        return [o.numpy() for o in outputs]

    def runner(self, feeds: Mapping[str, np.ndarray]):
        """One timed run per call, inputs already on the device. On an RPC device the call returns the device's
        own timing of the run, so the network round trip is not counted."""
        args = self.to_device(feeds)
        if self.remote is None:
            main = self.vm["main"]
            return lambda: main(*args)
        timer = self.vm.time_evaluator("main", self.device, number=1, repeat=1)
        return lambda: timer(*args).mean


class TvmRuntime:
    """Builds with TVM for ``target``; ``database`` (a MetaSchedule database) supplies tuned schedules."""

    name = "tvm"

    def __init__(self, target: Target, database=None, feed: Mapping[str, np.ndarray] | None = None):
        self.target, self.database, self.feed = target, database, feed
        self.tvm_target = tvm_target(target)
        self.cuda_kernels: dict | None = None  # set by build() for CUDA targets
        if _threads(target):  # read when this process first runs a parallel kernel (tuning candidates included);
            # pinning threads with config_threadpool would make them share a core with ONNX Runtime's
            os.environ.setdefault("TVM_NUM_THREADS", str(_threads(target)))
        self._remote = None
        self._sessions: dict[Path, _TvmSession] = {}

    def lower(self, model_path: Path):
        """The fused Relax module of ``model_path`` at the feed's shapes (what is tuned and compiled)."""
        return fuse(import_onnx(Path(model_path), static_shapes(Path(model_path), self.feed)), self.tvm_target)

    def build(self, model_path: Path, out_dir: Path) -> Path:
        """Compile and export ``out_dir/model.so`` for the target's architecture (checked in the ELF header).
        The model is lowered afresh: compiling changes the lowered module in place, and a module that was
        compiled once no longer matches its tasks' records in the database."""
        executable = compile_fused(self.lower(model_path), self.tvm_target, self.database)
        self.cuda_kernels = check_cuda_kernels(executable.mod, self.tvm_target) if self.target.tvm.kind == "cuda" \
            else None
        library = Path(out_dir) / LIBRARY
        executable.export_library(str(library), **self._linker())
        arch = library_arch(library)
        if arch != self.target.tvm.arch:
            raise RuntimeError(f"{library} was linked for {arch}, not {self.target.tvm.arch}")
        return library

    def _linker(self) -> dict:
        """Cross-compile when the library's architecture is not this machine's."""
        if self.target.tvm.arch == host_arch():
            return {}
        compiler = self.target.tvm.cross_compiler
        if not compiler:
            raise UserError(f"target {self.target.name} builds for {self.target.tvm.arch} but names no "
                            "cross_compiler", "add cross_compiler = \"aarch64-linux-gnu-g++\" to its [tvm] section")
        if shutil.which(compiler) is None:
            raise UserError(f"cross compiler {compiler} not found",
                            "install it (Debian: apt-get install g++-aarch64-linux-gnu) or fix cross_compiler")
        return {"fcompile": _tvm().support.cc.cross_compiler(compiler)}

    def _rpc_session(self):
        if self._remote is None:
            from tvm import rpc

            device = rpc_address(self.target)
            try:
                tracker = rpc.connect_tracker(device.host, device.port)
                self._remote = tracker.request(device.key, priority=1, session_timeout=600)
            except Exception as exc:
                raise UserError(f"cannot reach {device}: {str(exc).splitlines()[0][:160]}",
                                "start the tracker and the board's rpc_server (README: measuring on a board)") from None
        return self._remote

    def session(self, model_path: Path) -> _TvmSession:
        """``model_path``: a library built by :meth:`build` (``.so``); loaded once per runtime."""
        key = Path(model_path).resolve()
        if key not in self._sessions:
            remote = self._rpc_session() if rpc_address(self.target) is not None else None
            self._sessions[key] = _TvmSession(key, self.target, remote)
        return self._sessions[key]

    def measure(self, models: Mapping[str, Path], feeds: Mapping[str, np.ndarray], warmup: int = 5,
                repeats: int = 50) -> dict[str, Latency]:
        runners = {name: self.session(path).runner(feeds) for name, path in models.items()}
        return measure_interleaved(runners, warmup=warmup, repeats=repeats, here=rpc_address(self.target) is None)

    def measure_with_onnxruntime(self, libraries: Mapping[str, Path], model_path: Path,
                                 feeds: Mapping[str, np.ndarray], warmup: int = 5, repeats: int = 50,
                                 ort_name: str = "onnxruntime") -> dict[str, Latency]:
        """TVM libraries and — where the target is this machine — ONNX Runtime on the ONNX model, interleaved."""
        runners = {name: self.session(path).runner(feeds) for name, path in libraries.items()}
        if rpc_address(self.target) is None:
            session = OnnxRuntime(self.target).session(model_path)
            runners[ort_name] = lambda: session.run(feeds)
        return measure_interleaved(runners, warmup=warmup, repeats=repeats, here=rpc_address(self.target) is None)

    def profile(self, model_path: Path, feeds: Mapping[str, np.ndarray], runs: int = 20) -> list[NodeTime]:
        """Time per kernel call (TVM's fused names, e.g. ``fused_conv2d_add_relu``) averaged over ``runs``
        (:func:`kernel_times`), where the library runs (CPU libraries: calls there are synchronous)."""
        session = self.session(model_path)
        if session.remote is None:
            totals = kernel_times(session.vm, session.to_device(feeds), runs)
        else:
            from edgeq.devices.agent import npz_bytes

            try:
                function = session.remote.get_function(KERNEL_TIMES)
            except Exception:  # noqa: BLE001 — TVM's error for a function the server lacks
                raise UserError(f"the board under {self.target.measure_where} runs TVM's plain rpc_server, which "
                                "cannot time kernels", "start the board with 'edgeq device serve --tracker "
                                "HOST:PORT --key KEY'") from None
            totals = json.loads(function(session.name, bytearray(npz_bytes(dict(feeds))), runs))
        return sorted((NodeTime(n, "tvm", ms) for n, ms in totals.items()), key=lambda t: -t.ms)


def kernel_times(vm, args: list, runs: int) -> dict[str, float]:
    """Milliseconds per run of each kernel ``vm`` calls for ``main(*args)``, timed around each call by the VM's
    instrument hook over ``runs`` runs (the VM's own builtins left out)."""
    totals: dict[str, float] = {}
    started: list[float] = []

    def instrument(func, symbol, before_run, ret_value, *call_args):
        if before_run:
            started.append(time.perf_counter())
        elif started:
            totals[symbol] = totals.get(symbol, 0.0) + (time.perf_counter() - started.pop()) * 1e3
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*args)
    return {n: ms / runs for n, ms in totals.items() if not n.startswith("vm.builtin")}


def register_kernel_times() -> None:
    """On a board (``edgeq device serve``): answer :data:`KERNEL_TIMES` for a library the host uploaded, on the
    board's CPU with the threads the host's session configured."""
    tvm = _tvm()
    from edgeq.devices.agent import npz_arrays

    def board_kernel_times(name: str, feed, runs: int) -> str:
        module = tvm.runtime.load_module(tvm.get_global_func("tvm.rpc.server.workpath")(name))
        vm = tvm.relax.VirtualMachine(module, tvm.cpu(0))
        args = [tvm.runtime.tensor(np.ascontiguousarray(v), tvm.cpu(0)) for v in npz_arrays(bytes(feed)).values()]
        return json.dumps(kernel_times(vm, args, int(runs)))

    tvm.register_global_func(KERNEL_TIMES, board_kernel_times, override=True)


def _threads(target: Target) -> int | None:
    """The target's ``num-cores``: TVM's threads, as ORT's intra-op threads on the same target."""
    cores = target.tvm.target.get("num-cores") if target.tvm and target.tvm.kind == "llvm" else None
    return int(cores) if cores else None

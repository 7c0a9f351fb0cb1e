"""The device side of a measurement: what edgeq runs *on* the device, in one self-contained file.

This module imports nothing from edgeq and needs only Python 3, numpy and onnxruntime, so the ssh device can
send it to a board as it is and run it there (:func:`serve`); the local device and the TVM RPC farm import it
in-process. One source of truth for the latency protocol, wherever it runs.

Latency rule: candidates are compared inside one process, interleaved, on the same feed. After ``warmup``
runs each, every round runs each candidate once, in an order that alternates between rounds so neither
always runs first; per-run wall times give min, median and p90. There are ``repeats`` rounds, more for fast
models — as many as fill :data:`MIN_SECONDS` per candidate (at most :data:`MAX_ROUNDS`): 50 runs of a
sub-millisecond model are noise — and fewer for slow ones: no more than fill :data:`MAX_SECONDS` per candidate,
but at least :data:`MIN_ROUNDS`. Warm-up stops early past :data:`MAX_SECONDS`. Only ratios from one such run
are meaningful on a shared machine.

Noise rule (every measurement records its conditions):
1. Before and after the run: CPU frequency governor, hottest thermal zone, the kernel's thermal-throttle
   count, the 1-minute load average; during it, the *foreign* load: busy CPU time of the CPUs this process
   may run on (``/proc/stat``; all of them unless pinned) less this process's own, in cores — a board pinned
   to its own cores is not busy because of work on the others.
2. The run is flagged ``throttled`` when the throttle count rose during it or a zone reached :data:`HOT_C`,
   and ``busy`` when the foreign load took more than :data:`BUSY_CORES` cores.
3. A flagged run is repeated, at most ``retries`` times, after ``cooldown_s`` (and, while a zone is hot, until
   it cools, at most :data:`MAX_COOLDOWN_S`) — but only once a short probe shows the cause has passed: a
   foreign load that persists is recorded, not measured into again. A run still flagged is kept, flagged.
4. With ``pin`` (CPU ids), the measuring thread and the sessions it creates run on those CPUs only.
Fields the device cannot read (no thermal zone in a VM) are ``None``, never guessed.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from collections import OrderedDict

import numpy as np

AGENT_VERSION = 1
MIN_SECONDS = 0.5
MAX_SECONDS = 10.0
MIN_ROUNDS = 7
MAX_ROUNDS = 5000
HOT_C = 80.0
BUSY_CORES = 0.5
MAX_COOLDOWN_S = 60.0
PROBE_S = 0.2
SESSIONS_KEPT = 2
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


# ---------------------------------------------------------------- facts and conditions


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def cpu_flags() -> list[str]:
    """The CPU's flags as Linux names them (x86 ``flags``, Arm ``Features``); [] where unknown."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted(set(value.split()))
    return []


# Arm cores by (implementer, part) of /proc/cpuinfo, where the kernel names no model (Raspberry Pi 5, Jetson Orin).
_ARM_CORES = {("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd0b"): "Cortex-A76",
              ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd4b"): "Cortex-A78C", ("0x41", "0xd0c"): "Neoverse-N1",
              ("0x41", "0xd40"): "Neoverse-V1", ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd05"): "Cortex-A55"}


def cpu_model() -> str:
    """The CPU's name: x86 ``model name``; on Arm the board's model or the core named by its part number."""
    fields: dict[str, str] = {}
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware"):
        if fields.get(key):
            return fields[key]
    board = (_read("/proc/device-tree/model") or "").rstrip("\x00")
    core = _ARM_CORES.get((fields.get("CPU implementer", ""), fields.get("CPU part", "")))
    if board or core:
        return " · ".join(p for p in (board, core) if p)
    if fields.get("CPU part"):
        return f"Arm part {fields.get('CPU implementer', '?')}/{fields['CPU part']}"
    return platform.processor() or "unknown"


def facts() -> dict:
    """What this device is and has: architecture, CPU, cores, ONNX Runtime and its execution providers, TVM's
    runtime, and its current conditions."""
    record = {"agent": AGENT_VERSION, "arch": platform.machine().lower().replace("amd64", "x86_64")
              .replace("arm64", "aarch64"), "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
              "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform(),
              "onnxruntime": None, "providers": [], "tvm": None}
    try:
        import onnxruntime

        record["onnxruntime"] = onnxruntime.__version__
        record["providers"] = list(onnxruntime.get_available_providers())
    except ImportError:
        pass
    record["tvm"] = tvm_version()
    return record | {"conditions": conditions()}


def tvm_version() -> str | None:
    """The installed TVM package's version ("unknown" for a build without package metadata, as a board's runtime
    built from source), or None; read without importing TVM, which takes seconds that every compile would pay.
    The runtime alone is enough to run a TVM library: a board need not have the compiler."""
    from importlib import metadata, util

    try:
        if util.find_spec("tvm") is None:
            return None
    except (ImportError, ValueError):
        return None
    names = metadata.packages_distributions().get("tvm") or []
    return metadata.version(names[0]) if names else "unknown"


def _throttle_count() -> int | None:
    counts = [_read(f"/sys/devices/system/cpu/cpu{i}/thermal_throttle/core_throttle_count")
              for i in range(os.cpu_count() or 1)]
    counts = [int(c) for c in counts if c and c.isdigit()]
    return sum(counts) if counts else None


def _hottest_c() -> float | None:
    temps = []
    for index in range(64):
        raw = _read(f"/sys/class/thermal/thermal_zone{index}/temp")
        if raw is None:
            break
        if raw.lstrip("-").isdigit():
            temps.append(int(raw) / 1000.0)
    return max(temps) if temps else None


def conditions() -> dict:
    """The device's state now: governor, hottest zone (°C), throttle count, 1-minute load average."""
    return {"governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
            "temperature_c": _hottest_c(), "throttle_count": _throttle_count(),
            "load_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def _busy_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies since boot of the CPUs ``cpus``."""
    busy = total = 0
    for line in (_read("/proc/stat") or "").splitlines():
        name, *values = line.split()[:9] or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in values]
            busy, total = busy + sum(ticks) - ticks[3] - ticks[4], total + sum(ticks)
    return (busy, total) if total else None


def _my_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


class LoadMeter:
    """Foreign load over a window: the busy cores of the CPUs this process may run on, less its own."""

    def __init__(self):
        self._cpus = _my_cpus()
        self._jiffies, self._own, self._wall = _busy_jiffies(self._cpus), _own_seconds(), time.perf_counter()

    def foreign_cores(self) -> float | None:
        now = _busy_jiffies(self._cpus)
        if now is None or self._jiffies is None or now[1] == self._jiffies[1]:
            return None
        busy = (now[0] - self._jiffies[0]) / (now[1] - self._jiffies[1]) * len(self._cpus)
        own = (_own_seconds() - self._own) / max(time.perf_counter() - self._wall, 1e-9)
        return round(max(busy - own, 0.0), 2)


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


# ---------------------------------------------------------------- the latency protocol


def interleaved(runners: dict, warmup: int = 5, repeats: int = 50) -> dict[str, list[float]]:
    """Per-run seconds of each runner by the latency rule of this module's docstring."""
    names = list(runners)
    started, warmed = time.perf_counter(), 0
    while warmed < max(warmup, 1) and (not warmed or time.perf_counter() - started < MAX_SECONDS):
        for name in names:
            runners[name]()
        warmed += 1
    per_round = max((time.perf_counter() - started) / warmed, 1e-9)
    repeats = max(repeats, min(MAX_ROUNDS, int(MIN_SECONDS * len(names) / per_round)))
    repeats = min(repeats, max(MIN_ROUNDS, int(MAX_SECONDS * len(names) / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            runners[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"min_ms": float(ms.min()), "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "runs": len(ms)}


def _flags(before: dict, after: dict, foreign: float | None) -> list[str]:
    flags = []
    if (before["throttle_count"] is not None and after["throttle_count"] is not None
            and after["throttle_count"] > before["throttle_count"]) or \
            any(c["temperature_c"] is not None and c["temperature_c"] >= HOT_C for c in (before, after)):
        flags.append("throttled")
    if foreign is not None and foreign > BUSY_CORES:
        flags.append("busy")
    return flags


def _cool_down(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)
    waited = 0.0
    while waited < MAX_COOLDOWN_S:
        hottest = _hottest_c()
        if hottest is None or hottest < HOT_C:
            return
        time.sleep(1.0)
        waited += 1.0


def _cause_passed(flags: list[str]) -> bool:
    """Whether a flagged run is worth repeating: a short probe no longer shows its cause."""
    meter = LoadMeter()
    time.sleep(PROBE_S)
    now = conditions()
    return not _flags(now, now, meter.foreign_cores()) if "busy" in flags else \
        (now["temperature_c"] is None or now["temperature_c"] < HOT_C)


def measured(runners: dict, warmup: int = 5, repeats: int = 50,
             noise: dict | None = None) -> tuple[dict[str, dict], dict]:
    """Latency stats of each runner and the conditions it was measured in, by the latency and noise rules."""
    noise = {"pin": None, "cooldown_s": 0.0, "retries": 1} | (noise or {})
    tries = []
    for attempt in range(int(noise["retries"]) + 1):
        if attempt or noise["cooldown_s"]:
            _cool_down(float(noise["cooldown_s"]))
        before, meter = conditions(), LoadMeter()
        samples = interleaved(runners, warmup, repeats)
        foreign, after = meter.foreign_cores(), conditions()
        flags = _flags(before, after, foreign)
        tries.append({"before": before, "after": after, "foreign_load_cores": foreign, "flags": flags})
        if not flags or attempt == int(noise["retries"]) or not _cause_passed(flags):
            break
    record = {"protocol": {"warmup": warmup, "repeats": repeats, "interleaved": True, "pin": noise["pin"],
                           "cooldown_s": noise["cooldown_s"], "retries": noise["retries"]},
              **tries[-1], "tries": len(tries), "flagged": bool(tries[-1]["flags"])}
    return {name: stats(s) for name, s in samples.items()}, record


class pinned:
    """Run the calling thread (and threads it starts) on ``cpus`` for the ``with`` block; nothing when None."""

    def __init__(self, cpus):
        self.cpus, self._previous = cpus, None

    def __enter__(self):
        if self.cpus and hasattr(os, "sched_setaffinity"):
            self._previous = os.sched_getaffinity(0)
            os.sched_setaffinity(0, set(self.cpus))
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            os.sched_setaffinity(0, self._previous)


# ---------------------------------------------------------------- ONNX Runtime on the device


def create_session(model_path, *, intra_op_threads: int = 0, inter_op_threads: int = 0,
                   providers=("CPUExecutionProvider",), provider_options: dict | None = None,
                   profile_prefix: str | None = None, optimized: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    opts = [dict((provider_options or {}).get(p, {})) for p in chosen]
    return ort.InferenceSession(str(model_path), options, providers=chosen, provider_options=opts)


def kernel_events(trace: str):
    """(kernel name, op type, µs) of each kernel-time event of an ORT profile (one JSON object per line), read
    one line at a time: a Loop body's kernels make millions of events."""
    with open(trace) as lines:
        for line in lines:
            if '_kernel_time"' not in line:
                continue
            event = json.loads(line.strip().rstrip(","))
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                yield event["name"][: -len("_kernel_time")], event.get("args", {}).get("op_name", ""), \
                    event.get("dur", 0)


class Loaded:
    """One ONNX Runtime session: ``run(feeds)`` gives every output, in order."""

    def __init__(self, session):
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict) -> list:
        return self.session.run(None, dict(feeds))


class Agent:
    """ONNX Runtime sessions on this device, by model file and settings (the last :data:`SESSIONS_KEPT` are
    kept: a candidate's latency and fidelity runs, and the float model every candidate is measured against,
    load once)."""

    def __init__(self, pin=None):
        self.pin = pin
        self._sessions: OrderedDict = OrderedDict()

    def session(self, path: str, settings: dict, optimized: bool = True) -> Loaded:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, optimized,
               json.dumps(settings, sort_keys=True))
        session = self._sessions.pop(key, None)
        if session is None:
            with pinned(self.pin):  # ORT's threads start on the CPUs of the thread that creates the session
                session = Loaded(create_session(path, optimized=optimized, **settings))
        self._sessions[key] = session
        while len(self._sessions) > SESSIONS_KEPT:
            self._sessions.popitem(last=False)
        return session

    def measure(self, models: dict, feed: dict, settings: dict, warmup: int, repeats: int,
                noise: dict | None = None) -> dict:
        sessions = {name: self.session(path, settings) for name, path in models.items()}
        runners = {name: (lambda s=s: s.run(feed)) for name, s in sessions.items()}
        with pinned(self.pin):
            latency, record = measured(runners, warmup, repeats, (noise or {}) | {"pin": self.pin})
        # which board measured: a farm spreads one compile's candidates over several
        return {"latency": latency, "conditions": record | {"board": f"{platform.node()}:{os.getpid()}"}}

    def profile(self, path: str, feed: dict, settings: dict, runs: int, seconds: float, folder: str) -> dict:
        """Kernel time totals of a profiled session: about ``seconds`` of runs (at most ``runs``, at least 3)
        after 3 warm-up runs, which ORT's profiler counts too."""
        with pinned(self.pin):
            session = create_session(path, profile_prefix=os.path.join(folder, "profile"), **settings)
            for _ in range(2):
                session.run(None, feed)
            started = time.perf_counter()
            session.run(None, feed)
            runs = max(3, min(runs, int(seconds / max(time.perf_counter() - started, 1e-6))))
            for _ in range(runs):
                session.run(None, feed)
        trace = session.end_profiling()
        totals: dict = {}
        for kernel, op_type, microseconds in kernel_events(trace):
            totals[(kernel, op_type)] = totals.get((kernel, op_type), 0.0) + microseconds
        os.remove(trace)
        return {"kernels": [[k, op, us] for (k, op), us in totals.items()], "runs": runs + 3}

    def run(self, path: str, feed: dict, settings: dict, optimized: bool = True) -> list:
        return self.session(path, settings, optimized).run(feed)


# ---------------------------------------------------------------- serving a remote host over a byte stream
#
# Requests are JSON lines; ``put`` is followed by ``size`` raw bytes. Answers are JSON lines, ``{"ok": true,
# ...}`` or ``{"ok": false, "error": "..."}``; a ``run`` answer is followed by ``size`` bytes of an .npz of the
# outputs (``0``, ``1``, … in output order). Files live in ``folder/<bundle digest>/<file name>``: a model keeps
# its own name beside its external data file, and a bundle pushed once is found by its digest ever after. When
# the host says ``bye``, the least recently used bundles go until the folder holds at most ``CACHE_BYTES``
# (``$EDGEQ_DEVICE_CACHE_MB``), and so do partial uploads older than ``STALE_PARTIAL_S`` (a transfer killed midway).
CACHE_BYTES = int(float(os.environ.get("EDGEQ_DEVICE_CACHE_MB", 2048)) * (1 << 20))
STALE_PARTIAL_S = 3600.0


def _bytes_in(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def prune(folder: str, keep_bytes: int) -> int:
    """Remove stale partial uploads, then the least recently used bundles of ``folder`` until it holds at most
    ``keep_bytes``; how many bundles went."""
    paths = [os.path.join(folder, name) for name in os.listdir(folder)]
    for path in paths:
        if ".partial-" in path and time.time() - os.path.getmtime(path) > STALE_PARTIAL_S:
            shutil.rmtree(path, ignore_errors=True)
    bundles = sorted((os.path.getmtime(path), path) for path in paths
                     if os.path.isdir(path) and ".partial-" not in path)
    total, removed = sum(_bytes_in(path) for _, path in bundles), 0
    for _, path in bundles:
        if total <= keep_bytes:
            break
        total -= _bytes_in(path)
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def npz_bytes(arrays: dict) -> bytes:
    """An .npz of ``arrays`` whose bytes depend on the arrays alone (``np.savez`` stamps the time): the same
    feed is the same bundle, pushed once."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(entry, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def npz_arrays(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _check_reference(bundle: str, name: str) -> None:
    """A bundle is a hex digest and a file name has no folder in it: nothing outside the folder is reachable."""
    if not bundle.isalnum() or os.sep in name or name in ("", ".", ".."):
        raise ValueError(f"bad file reference {bundle}/{name}")


class Handler:
    """The agent's requests, whatever carries them (an ssh stream, a TVM RPC call): ``handle(request, read)``
    answers one; ``read(n)`` gives the bytes that follow a ``put``."""

    def __init__(self, folder: str | None = None):
        self.folder = os.path.expanduser(folder or os.environ.get("EDGEQ_DEVICE_DIR", "~/.cache/edgeq-device"))
        self.agent = Agent()
        os.makedirs(self.folder, exist_ok=True)

    def path(self, bundle: str, name: str) -> str:
        _check_reference(bundle, name)
        folder = os.path.join(self.folder, bundle)
        if os.path.isdir(folder):
            os.utime(folder)  # recently used: kept by prune()
        return os.path.join(folder, name)

    def feed(self, ref) -> dict:
        with open(self.path(*ref), "rb") as handle:
            return npz_arrays(handle.read())

    def put(self, request: dict, read) -> dict:
        for name, _ in request["files"]:
            _check_reference(request["bundle"], name)
        bundle = os.path.join(self.folder, request["bundle"])
        partial = tempfile.mkdtemp(prefix=f"{request['bundle']}.partial-", dir=self.folder)
        for name, size in request["files"]:
            with open(os.path.join(partial, name), "wb") as handle:
                remaining = size
                while remaining:
                    chunk = read(min(remaining, 1 << 20))
                    if not chunk:
                        raise EOFError("the host closed the stream inside a file")
                    handle.write(chunk)
                    remaining -= len(chunk)
        try:
            os.rename(partial, bundle)
        except OSError:
            if not os.path.isdir(bundle):
                raise
            shutil.rmtree(partial)  # pushed by another host (or board) meanwhile: same digest, same bytes
        return {}

    def handle(self, request: dict, read) -> tuple[dict, bytes]:
        op = request["op"]
        if op == "facts":
            return facts(), b""
        if op == "has":
            return {"missing": [b for b in request["bundles"] if not os.path.isdir(os.path.join(self.folder, b))]}, b""
        if op == "put":
            return self.put(request, read), b""
        if op == "bye":
            return {"pruned": prune(self.folder, CACHE_BYTES)}, b""
        settings = request.get("settings", {})
        self.agent.pin = request.get("pin")
        if op == "measure":
            models = {name: self.path(*ref) for name, ref in request["models"].items()}
            return self.agent.measure(models, self.feed(request["feed"]), settings, request["warmup"],
                                      request["repeats"], request.get("noise")), b""
        if op == "profile":
            return self.agent.profile(self.path(*request["model"]), self.feed(request["feed"]), settings,
                                      request["runs"], request["seconds"], self.folder), b""
        if op == "run":  # the feed comes inline: a fidelity run's feed is used once, never stored
            outputs = self.agent.run(self.path(*request["model"]), npz_arrays(read(request["feed_bytes"])),
                                     settings, request.get("optimized", True))
            payload = npz_bytes({str(i): np.asarray(o) for i, o in enumerate(outputs)})
            return {"size": len(payload)}, payload
        raise ValueError(f"unknown request {op!r}")

    def answer(self, request: dict, read) -> bytes:
        """The answer line (and payload) to one request; a failure is an answer too, one line. The bytes that
        follow the request are consumed either way: the next request starts after them."""
        following = request.get("feed_bytes", 0) + sum(size for _, size in request.get("files", ()))
        consumed = [0]

        def counted(n: int) -> bytes:
            data = read(n)
            consumed[0] += len(data)
            return data

        try:
            record, payload = self.handle(request, counted)
            return json.dumps({"ok": True} | record).encode() + b"\n" + payload
        except EOFError:
            raise
        except Exception as exc:  # noqa: BLE001 — every failure goes back to the host as one line
            while consumed[0] < following and counted(min(following - consumed[0], 1 << 20)):
                pass
            said = str(exc).splitlines()[0][:400] if str(exc) else ""
            return json.dumps({"ok": False, "error": f"{type(exc).__name__}: {said}".rstrip(": ")}).encode() + b"\n"


def serve(folder: str | None = None) -> None:
    """Answer one host's requests on stdin/stdout until it says ``bye`` or closes the stream."""
    handler, stdin, stdout = Handler(folder), sys.stdin.buffer, sys.stdout.buffer
    while line := stdin.readline():
        request = json.loads(line)
        try:
            stdout.write(handler.answer(request, stdin.read))
        except EOFError:
            return
        stdout.flush()
        if request.get("op") == "bye":
            return


def bootstrap() -> str:
    """A ``python -c`` program that reads this module's source from stdin (a length line, then the source) and
    serves: nothing has to be installed on the device but Python, numpy and onnxruntime."""
    return ("import sys;n=int(sys.stdin.buffer.readline());g={'__name__':'edgeq_agent'};"
            "exec(compile(sys.stdin.buffer.read(n),'edgeq_agent','exec'),g);g['serve']()")


def source() -> bytes:
    with open(__file__, "rb") as handle:
        return handle.read()


"""Another ONNX Runtime release, asked whether it loads a model file.

Rules:
- A release is ``MAJOR.MINOR[.PATCH]``. The running release answers in process.
- Any other is installed once by pip (from the package index this machine uses) into
  ``<cache>/onnxruntime/<release>``, a virtual environment of its own with numpy (``numpy<2`` before 1.19,
  whose wheels were built against numpy 1), and answers from a child process.
- "Loads" means a CPU session is created on the file: ONNX Runtime resolves every node's kernel and reads
  the file's format there, so a missing op or opset, or an unreadable ORT format version, fails there.
- The environment is installed into a temporary sibling and renamed into place: a killed install is never
  used.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edgeq.errors import UserError

INSTALL_SECONDS = 600
_LOADER = ("import sys, onnxruntime as o; o.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
           "print(o.__version__)")


def parse_release(text: str) -> tuple[int, ...]:
    """``1.17`` or ``1.17.3`` as a tuple (one-line UserError otherwise)."""
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", text.strip()):
        raise UserError(f"bad ONNX Runtime release '{text}'", "give MAJOR.MINOR or MAJOR.MINOR.PATCH, e.g. 1.17.3")
    return tuple(int(part) for part in text.strip().split("."))


RUNNING = re.match(r"\d+\.\d+\.\d+", ort.__version__).group(0)


def is_running(release: str) -> bool:
    """``release`` names the ONNX Runtime this process runs (``1.31`` names 1.31.1 too)."""
    wanted = parse_release(release)
    return wanted == parse_release(RUNNING)[:len(wanted)]


@dataclass
class LoadResult:
    release: str
    loads: bool
    how: str  # "in process" or "installed in <folder>"
    why: str = ""  # ONNX Runtime's last line when it does not load

    def to_dict(self) -> dict:
        record = {"onnxruntime": self.release, "loads": self.loads, "how": self.how}
        return record | ({"why": self.why} if self.why else {})


def try_load(path: Path, release: str, cache_dir: Path | None) -> LoadResult:
    """Does ONNX Runtime ``release`` load ``path``? See the rules."""
    if is_running(release):
        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 — ONNX Runtime's refusal is the answer
            return LoadResult(ort.__version__, False, "in process", _last_line(str(exc)))
        return LoadResult(ort.__version__, True, "in process")
    if cache_dir is None:
        raise UserError(f"trying ONNX Runtime {release} needs a cache folder to install it in",
                        "drop --no-cache, or pass --no-install to answer from the ORT format version alone")
    python = _environment(release, Path(cache_dir) / "onnxruntime")
    done = subprocess.run([str(python), "-c", _LOADER, str(Path(path).resolve())], capture_output=True, text=True)
    how = f"installed in {python.parent.parent}"
    if done.returncode != 0:
        return LoadResult(release, False, how, _last_line(done.stderr))
    return LoadResult(done.stdout.strip() or release, True, how)


def _environment(release: str, root: Path) -> Path:
    """The python of a virtual environment holding ONNX Runtime ``release``, installed once."""
    folder = root / release
    python = folder / "bin" / "python"
    if python.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{release}.", dir=root))
    numpy = "numpy<2" if parse_release(release) < (1, 19) else "numpy"
    steps = ([sys.executable, "-m", "venv", str(tmp)],
             [str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              f"onnxruntime=={release}", numpy])
    try:
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_SECONDS)
            except subprocess.TimeoutExpired:
                done = subprocess.CompletedProcess(step, 1, "", f"no answer in {INSTALL_SECONDS} s")
            if done.returncode != 0:
                raise UserError(f"could not install onnxruntime=={release} for Python "
                                f"{sys.version_info.major}.{sys.version_info.minor}: {_last_line(done.stderr)}",
                                "check that the release exists for this Python, or pass --no-install")
        try:
            tmp.rename(folder)
        except OSError:  # another verify installed it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return python
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"

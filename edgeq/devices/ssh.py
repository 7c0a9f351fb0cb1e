"""The ssh device: a board reached with the system's OpenSSH client, ``ssh://[user@]host[:port][/python]``.

Rules:
- The user's ssh setup is used as it is (keys, agent, ``~/.ssh/config``, ProxyJump); ``BatchMode`` is on, so a
  board that would ask for a password is an error, not a prompt. ``$EDGEQ_SSH_OPTIONS`` adds client options
  (e.g. ``-F ci_ssh_config``).
- One ssh connection per compile runs :mod:`edgeq.devices.agent` on the board: the host sends the agent's
  source through the connection itself (``python -c`` reads it), so the board needs only Python 3, numpy and
  onnxruntime — ``/python`` in the address names that interpreter (default ``python3``), quoted for the board's
  shell, like every path.
- Files go to the board once, by content (:mod:`edgeq.devices.client`), under ``~/.cache/edgeq-device`` there.
- Every request waits at most :data:`ANSWER_TIMEOUT_S` for its answer; a silent or closed connection is one
  line naming the device, with ssh's own last words.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeq.devices.agent import bootstrap, source
from edgeq.devices.client import CHUNK, AgentClient
from edgeq.errors import UserError
from edgeq.target import Target

ANSWER_TIMEOUT_S = 900.0
_ADDRESS = re.compile(r"ssh://(?:(?P<user>[^@/:\s]+)@)?(?P<host>[A-Za-z0-9._\-\[\]:]+?)(?::(?P<port>\d+))?"
                      r"(?P<python>/.*)?")
FIX = ("check that 'ssh [user@]host' logs in without a prompt and that the board has python3 with numpy and "
       "onnxruntime (README: measuring on a board)")


@dataclass(frozen=True)
class SshAddress:
    user: str | None
    host: str
    port: int | None
    python: str

    @classmethod
    def parse(cls, address: str) -> "SshAddress":
        match = _ADDRESS.fullmatch(address)
        if not match or match["host"].startswith("-"):
            raise UserError(f"bad device address '{address}'",
                            "use ssh://[user@]host[:port][/path/to/python], e.g. ssh://pi@pi5.local/usr/bin/python3")
        return cls(match["user"], match["host"], int(match["port"]) if match["port"] else None,
                   match["python"] or "python3")

    def ssh_command(self, remote: str) -> list[str]:
        extra = shlex.split(os.environ.get("EDGEQ_SSH_OPTIONS", ""))
        port = ["-p", str(self.port)] if self.port else []
        login = f"{self.user}@{self.host}" if self.user else self.host
        return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=15", *extra,
                *port, "--", login, remote]


class SshDevice(AgentClient):
    def __init__(self, address: str):
        super().__init__(address)
        self.where = SshAddress.parse(address)
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._buffer = b""

    # ------------------------------------------------------------ the connection

    def _start(self) -> None:
        remote = f"{shlex.quote(self.where.python)} -u -c {shlex.quote(bootstrap())}"
        self._stderr = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(self.where.ssh_command(remote), stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0)
        except FileNotFoundError:
            raise UserError("the ssh client is not installed", "install OpenSSH's client (Debian: openssh-client)") \
                from None
        code = source()
        self._send(f"{len(code)}\n".encode() + code)

    def _lost(self, what: str) -> UserError:
        said = ""
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._stderr.seek(0)
            lines = [ln.strip() for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
            said = f" (it said: {lines[-1][:200]})" if lines else f" (exit {self._process.returncode})"
            self._process = None
        return UserError(f"device {self.address} {what}{said}", FIX)

    def _send(self, data: bytes) -> None:
        try:
            self._process.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError, ValueError):
            raise self._lost("closed the connection") from None

    def _receive(self, size: int | None) -> bytes:
        """``size`` bytes, or (None) one line without its newline."""
        stream = self._process.stdout
        while (b"\n" not in self._buffer) if size is None else (len(self._buffer) < size):
            ready, _, _ = select.select([stream], [], [], ANSWER_TIMEOUT_S)
            if not ready:
                raise self._lost(f"gave no answer in {ANSWER_TIMEOUT_S:.0f} s")
            chunk = os.read(stream.fileno(), CHUNK)
            if not chunk:
                raise self._lost("closed the connection")
            self._buffer += chunk
        if size is None:
            line, _, self._buffer = self._buffer.partition(b"\n")
            return line
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _call(self, request: dict, files: list[tuple[str, bytes | Path]] = ()) -> tuple[dict, bytes]:
        if self._process is None:
            self._start()
        self._send(json.dumps(request).encode() + b"\n")
        for _, content in files:
            if isinstance(content, bytes):
                self._send(content)
                continue
            with open(content, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    self._send(chunk)
        try:
            answer = json.loads(self._receive(None))
        except json.JSONDecodeError:
            raise self._lost("answered with something that is not edgeq's agent") from None
        if not answer.pop("ok"):
            raise UserError(f"device {self.address} failed: {answer['error']}",
                            "check that the board's onnxruntime can load the model (edgeq device check)")
        payload = self._receive(answer["size"]) if request["op"] == "run" else b""
        return answer, payload

    def check(self, target: Target, runtime: str = "onnxruntime") -> str:
        if runtime == "tvm":
            return ("an ssh device measures ONNX Runtime builds; TVM libraries are measured on boards behind a TVM "
                    "RPC tracker (--device rpc://TRACKER_HOST:PORT/KEY)")
        return super().check(target, runtime)

    def close(self) -> None:
        if self._process is None:
            return
        try:
            self._call({"op": "bye"})
            self._process.wait(timeout=10)
        except (UserError, subprocess.TimeoutExpired):
            if self._process is not None:
                self._process.kill()
        self._process = None

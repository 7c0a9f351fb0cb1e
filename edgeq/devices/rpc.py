"""Boards behind a TVM RPC tracker: ``rpc://TRACKER_HOST:PORT/KEY``, for TVM and ONNX Runtime alike.

Rules:
- TVM tuning and TVM latency reach the boards through TVM's own RPC client (:mod:`edgeq.runtimes.tvm`,
  :mod:`edgeq.runtimes.tvm_tuning`).
- ``edgeq device serve --tracker HOST:PORT --key KEY`` on a board starts TVM's RPC server with edgeq's agent
  registered at start-up (the global function :data:`FUNCTION`, and TVM's kernel timer,
  :data:`edgeq.runtimes.tvm.KERNEL_TIMES`), so one tracker serves TVM tuning, TVM kernel profiles and ONNX
  Runtime measurement. ONNX Runtime requests travel as TVM RPC calls to it: files pushed by content
  (:mod:`edgeq.devices.client`), latency, profiles and remote runs as on an ssh board.
- A compile holds one board for its session (facts, the float model's runs); :meth:`RpcDevice.measure_many`
  measures a batch of candidates in parallel, one per free board under the key (as many boards as the tracker
  lists free, at least one), each board measuring its share in turn.
- TVM RPC has no authentication: a tracker and its servers belong on a trusted network only (README: measuring
  on a board).
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from edgeq.devices.client import AgentClient
from edgeq.errors import UserError
from edgeq.runtimes.base import Latency
from edgeq.target import Target

FUNCTION = "edgeq.agent"
SESSION_TIMEOUT_S = 3600
FIX = "start the tracker and 'edgeq device serve --tracker HOST:PORT --key KEY' on each board (README: measuring on a board)"


@dataclass(frozen=True)
class RpcAddress:
    host: str
    port: int
    key: str

    @classmethod
    def parse(cls, address: str) -> "RpcAddress":
        match = re.fullmatch(r"rpc://([^:/]+):(\d+)/(\S+)", address)
        if not match:
            raise UserError(f"bad device address '{address}'",
                            "use rpc://TRACKER_HOST:PORT/KEY, e.g. rpc://127.0.0.1:9190/pi5")
        return cls(match[1], int(match[2]), match[3])

    def __str__(self) -> str:
        return f"rpc://{self.host}:{self.port}/{self.key}"


def rpc_address(target: Target) -> RpcAddress | None:
    """The tracker a target's TVM builds are measured through; None when they are measured here."""
    return RpcAddress.parse(target.measure_where) if target.measure_where.startswith("rpc://") else None


# ---------------------------------------------------------------- the board's side


def register_agent() -> None:
    """TVM's RPC server calls this at start-up (in the server process; each session forks from it): the agent
    answers :data:`FUNCTION` (request JSON, bytes that follow a put) with its answer line and payload."""
    import io

    import onnxruntime  # noqa: F401 — imported once here: each session is a fork of this process, and starts with it
    import tvm

    from edgeq.devices.agent import Handler

    handler: list = []  # made in the session's process, on its first call

    def call(request: str, payload) -> bytes:
        if not handler:
            handler.append(Handler())
        return handler[0].answer(json.loads(request), io.BytesIO(bytes(payload)).read)

    tvm.register_global_func(FUNCTION, call, override=True)
    from edgeq.runtimes.tvm import register_kernel_times

    register_kernel_times()


def serve(tracker: str, key: str, host: str, port: int) -> None:
    """Run TVM's RPC server with the agent registered, registered with ``tracker`` under ``key``, until stopped."""
    from tvm import rpc

    tracker_host, _, tracker_port = tracker.rpartition(":")
    if not tracker_host or not tracker_port.isdigit():
        raise UserError(f"bad tracker address '{tracker}'", "use HOST:PORT, e.g. 192.168.1.10:9190")
    server = rpc.Server(host=host, port=port, port_end=port + 100, tracker_addr=(tracker_host, int(tracker_port)),
                        key=key, silent=True, server_init_callback=register_agent)
    try:
        threading.Event().wait()
    finally:
        server.terminate()


# ---------------------------------------------------------------- the host's side


class _Board(AgentClient):
    """One board's RPC session, held until closed."""

    def __init__(self, address: str, session):
        super().__init__(address)
        self._function = session.get_function(FUNCTION)
        self._session = session

    def _call(self, request: dict, files=()) -> tuple[dict, bytes]:
        payload = bytearray()
        for _, content in files:
            payload += content if isinstance(content, bytes) else Path(content).read_bytes()
        try:
            reply = bytes(self._function(json.dumps(request), payload))
        except Exception as exc:  # noqa: BLE001 — TVM raises its own error types for a lost session
            raise UserError(f"device {self.address}: the board's RPC session failed ({str(exc).splitlines()[0][:160]})",
                            FIX) from None
        line, _, rest = reply.partition(b"\n")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise UserError(f"device {self.address} failed: {answer['error']}",
                            "check that the board's onnxruntime can load the model (edgeq device check)")
        return answer, rest


class RpcDevice:
    """The boards under one tracker key."""

    def __init__(self, address: str):
        self.address = address
        self.where = RpcAddress.parse(address)
        self._tracker = None
        self._boards: list[_Board] = []  # the first is this compile's own board

    def _connect(self):
        if self._tracker is None:
            from tvm import rpc

            try:
                self._tracker = rpc.connect_tracker(self.where.host, self.where.port)
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"cannot reach {self.address}: {str(exc).splitlines()[0][:160]}", FIX) from None
        return self._tracker

    def _request(self) -> _Board:
        try:
            session = self._connect().request(self.where.key, priority=1, session_timeout=SESSION_TIMEOUT_S)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"no board answered under {self.address}: {str(exc).splitlines()[0][:160]}", FIX) from None
        try:
            return _Board(self.address, session)
        except Exception:  # noqa: BLE001 — a plain TVM rpc_server has no agent
            raise UserError(f"the board under {self.address} runs no edgeq agent (a plain TVM rpc_server?)",
                            FIX) from None

    @property
    def _board(self) -> _Board:
        if not self._boards:
            self._boards.append(self._request())
        return self._boards[0]

    def free_boards(self) -> int:
        """Boards the tracker lists free under the key now (not counting the ones this device holds)."""
        queue = self._connect().summary().get("queue_info", {}).get(self.where.key, {})
        return int(queue.get("free", 0))

    def facts(self) -> dict:
        return self._board.facts()

    def check(self, target: Target, runtime: str = "onnxruntime") -> str:
        if runtime == "tvm":
            return ""  # TVM's own client talks to the boards: what a board runs is what it registered for
        return self._board.check(target, runtime)

    def measure(self, models: Mapping[str, Path], feed: Mapping[str, np.ndarray], settings: dict, warmup: int,
                repeats: int, noise: dict) -> dict[str, Latency]:
        return self._board.measure(models, feed, settings, warmup, repeats, noise)

    def measure_many(self, jobs: list[Mapping[str, Path]], feed: Mapping[str, np.ndarray], settings: dict,
                     warmup: int, repeats: int, noise: dict) -> list[dict[str, Latency]]:
        """Each job (models measured interleaved against each other) on one board; jobs spread over every free
        board, in parallel."""
        wanted = min(len(jobs), 1 + self.free_boards()) - len(self._boards)
        for _ in range(max(wanted, 0)):
            self._boards.append(self._request())
        boards = self._boards[: max(1, min(len(jobs), len(self._boards)))]
        shares = [list(range(i, len(jobs), len(boards))) for i in range(len(boards))]

        def measure_share(board_and_share):
            board, share = board_and_share
            return {i: board.measure(jobs[i], feed, settings, warmup, repeats, noise) for i in share}

        results: dict[int, dict[str, Latency]] = {}
        with ThreadPoolExecutor(len(boards)) as pool:
            for part in pool.map(measure_share, zip(boards, shares)):
                results.update(part)
        return [results[i] for i in range(len(jobs))]

    def profile(self, model: Path, feed: Mapping[str, np.ndarray], settings: dict, runs: int,
                seconds: float) -> tuple[list[tuple[str, str, float]], int]:
        return self._board.profile(model, feed, settings, runs, seconds)

    def session(self, model: Path, settings: dict, optimized: bool = True):
        return self._board.session(model, settings, optimized)

    def close(self) -> None:
        for board in self._boards:
            try:
                board._call({"op": "bye"})
            except UserError:
                pass
        self._boards = []  # dropping the sessions frees the boards

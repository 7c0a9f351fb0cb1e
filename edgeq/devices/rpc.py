"""Boards behind a TVM RPC tracker: ``rpc://TRACKER_HOST:PORT/KEY``.

TVM tuning and TVM latency reach such boards through TVM's own RPC client (:mod:`edgeq.runtimes.tvm`,
:mod:`edgeq.runtimes.tvm_tuning`). TVM RPC has no authentication: a tracker and its servers belong on a
trusted network only (README: measuring on a board).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgeq.errors import UserError
from edgeq.target import Target


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


class RpcDevice:
    """The boards under one tracker key, as the Device of a compile: TVM measures through them itself."""

    def __init__(self, address: str):
        self.address = address
        self.where = RpcAddress.parse(address)

    def check(self, target: Target, runtime: str = "onnxruntime") -> str:
        if runtime == "tvm":
            return ""
        return f"ONNX Runtime cannot measure through {self.address}: use --runtime tvm"

    def close(self) -> None:
        pass

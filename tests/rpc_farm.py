"""A TVM RPC tracker and boards registered with it under one key, all on 127.0.0.1, for the tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def farm(board_command: list[str], boards: int = 1, key: str = "board", env: dict | None = None,
         cpus: list[int] | None = None):
    """Start the tracker and ``boards`` servers (``board_command`` + ``--tracker HOST:PORT --key KEY``; board i
    pinned to CPU ``cpus[i]`` with taskset where given); yield the device address once the tracker lists every
    board free."""
    from tvm import rpc

    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                   "--port", str(port), "--port-end", str(port + 1)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 120  # importing TVM takes ~4 s a process, more on a loaded machine
        while True:  # a board that finds no tracker retries only after 5 s
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the local RPC tracker did not come up")
            time.sleep(0.1)
        processes += [subprocess.Popen([*(["taskset", "-c", str(cpus[i])] if cpus else []), *board_command,
                                        "--tracker", f"127.0.0.1:{port}", "--key", key],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env=os.environ | (env or {})) for i in range(boards)]
        while True:
            with contextlib.suppress(Exception):
                queue = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(key, {})
                if queue.get("free", 0) >= boards:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the local RPC tracker and its boards did not come up")
            time.sleep(0.3)
        yield f"rpc://127.0.0.1:{port}/{key}"
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=10)

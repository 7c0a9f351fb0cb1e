"""A real OpenSSH server on 127.0.0.1 for the ssh device's tests (and scripts): generated host and client keys,
public-key login only, a client config that trusts exactly that host key. Needs root and Debian's
openssh-server (``.ci/run`` installs it); tests skip without it."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def available() -> str:
    """'' when a test can start sshd here, else why not."""
    if not Path(SSHD).exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "OpenSSH (server and client) is not installed"
    if os.geteuid() != 0:
        return "sshd needs root"
    return ""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def sshd(folder: Path, device_dir: Path):
    """Yield (port, client options for $EDGEQ_SSH_OPTIONS); the board side keeps its files in ``device_dir``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = _free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nAuthorizedKeysFile "
        f"{folder / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nAcceptEnv EDGEQ_DEVICE_DIR\n"
        f"PidFile {folder / 'sshd.pid'}\n")
    host_key = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (folder / "ssh_config").write_text(
        f"Host 127.0.0.1\n  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n  UserKnownHostsFile "
        f"{folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n  SetEnv EDGEQ_DEVICE_DIR=\"{device_dir}\"\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield port, f"-F {folder / 'ssh_config'}"
    finally:
        server.terminate()
        server.wait(timeout=10)

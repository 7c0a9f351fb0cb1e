"""Devices: where a target's builds are measured (:mod:`edgeq.devices.base` states the protocol and the rules).

``local`` is this machine; ``ssh://[user@]host[:port][/python]`` a board reached with OpenSSH
(:mod:`edgeq.devices.ssh`); ``rpc://TRACKER_HOST:PORT/KEY`` the boards registered with a TVM RPC tracker under
KEY (:mod:`edgeq.devices.rpc`). What runs on the device is :mod:`edgeq.devices.agent`.
"""

from __future__ import annotations

from edgeq.errors import UserError

ADDRESS_HELP = "use local, ssh://[user@]host[:port][/path/to/python] or rpc://TRACKER_HOST:PORT/KEY"


def validate(address: str) -> str:
    """``address`` when it is a device address this edgeq can reach; one line naming the problem otherwise."""
    if address == "local":
        return address
    if address.startswith("ssh://"):
        from edgeq.devices.ssh import SshAddress

        SshAddress.parse(address)
    elif address.startswith("rpc://"):
        from edgeq.devices.rpc import RpcAddress

        RpcAddress.parse(address)
    else:
        raise UserError(f"bad device address '{address}'", ADDRESS_HELP)
    return address


def open_device(address: str):
    """The device at ``address`` (connected on first use; ``close()`` it when done)."""
    validate(address)
    if address.startswith("ssh://"):
        from edgeq.devices.ssh import SshDevice

        return SshDevice(address)
    if address.startswith("rpc://"):
        from edgeq.devices.rpc import RpcDevice

        return RpcDevice(address)
    from edgeq.devices.local import LocalDevice

    return LocalDevice()


def device_summary(device) -> dict | None:
    """Where a compile measured: the device's address and what it is (None: nothing was measured)."""
    if device is None:
        return None
    facts = device.facts()
    return {"address": device.address} | {key: facts[key] for key in ("arch", "cpu_model", "cores", "onnxruntime")}

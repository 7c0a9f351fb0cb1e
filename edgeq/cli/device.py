"""``edgeq device``: what a device is and has, checked against a target."""

from __future__ import annotations

import contextlib
import json

import click
from rich.table import Table

from edgeq.cli.app import debug_option, main, out
from edgeq.errors import UserError


@main.group()
def device():
    """Devices that measure: local, ssh://[user@]host[:port][/python], rpc://TRACKER_HOST:PORT/KEY."""


@device.command()
@debug_option
@click.argument("address")
@click.option("-t", "--target", help="Check the device against this target (bundled name or .toml path).")
@click.option("--runtime", type=click.Choice(["onnxruntime", "tvm"]), default="onnxruntime", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def check(address, target, runtime, as_json):
    """Show what the device at ADDRESS has (architecture, CPU and flags, cores, ONNX Runtime and its execution
    providers, TVM runtime, governor, temperature, load) and, with -t, whether it can measure TARGET: a mismatch
    is one line and exit 2."""
    from edgeq.devices import open_device
    from edgeq.target import load_target

    wanted = load_target(target) if target else None
    with contextlib.closing(open_device(address)) as dev:
        facts = dev.facts()
        why = dev.check(wanted, runtime) if wanted else ""
    if as_json:
        click.echo(json.dumps({"address": address, "facts": facts} | ({"target": wanted.name, "runtime": runtime,
                                                                         "ok": not why, "why": why} if wanted else {}),
                              indent=2))
    else:
        _print(address, facts, wanted, runtime)
    if why:
        raise UserError(f"device {address} cannot measure target {wanted.name}: {why}",
                        "choose the target that device is, or fix the device")


@device.command()
@debug_option
@click.option("--tracker", required=True, help="The TVM RPC tracker, HOST:PORT.")
@click.option("--key", required=True, help="The key boards of this kind register under (e.g. pi5).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address this board's RPC server listens on.")
@click.option("--port", type=click.IntRange(1, 65435), default=9090, show_default=True,
              help="First port to try (up to 100 above it).")
def serve(tracker, key, host, port):
    """Serve this board to a TVM RPC tracker: TVM's RPC server with edgeq's ONNX Runtime agent and TVM kernel
    timer registered, so the tracker's clients tune TVM, profile, and measure ONNX Runtime builds here (--device
    rpc://TRACKER:PORT/KEY). TVM RPC has no authentication: keep the tracker and boards on a trusted network."""
    from edgeq.devices.rpc import serve as serve_board

    click.echo(f"edgeq device serve: registering with {tracker} under key {key} (Ctrl-C stops)", err=True)
    serve_board(tracker, key, host, port)


def _print(address: str, facts: dict, target, runtime: str) -> None:
    table = Table("", "device", "target" if target else "", title=f"edgeq device check {address}")
    conditions = facts["conditions"]
    rows = [
        ("architecture", facts["arch"], target.arch if target else ""),
        ("CPU", facts["cpu_model"], ""),
        ("cores", str(facts["cores"]), ""),
        ("CPU flags the target needs", ", ".join(f for f in target.cpu_flags if f in facts["cpu_flags"]) or "–"
         if target else f"{len(facts['cpu_flags'])} flags", ", ".join(target.cpu_flags) or "–" if target else ""),
        ("ONNX Runtime", facts["onnxruntime"] or "missing", runtime if target else ""),
        ("execution providers", ", ".join(facts["providers"]) or "–",
         target.onnxruntime.providers[0] if target else ""),
        ("TVM runtime", facts["tvm"] or "missing", ""),
        ("governor", conditions["governor"] or "unknown", ""),
        ("temperature °C", "unknown" if conditions["temperature_c"] is None else f"{conditions['temperature_c']:.1f}", ""),
        ("load (1 min)", "unknown" if conditions["load_1m"] is None else f"{conditions['load_1m']:.2f}", ""),
    ]
    for row in rows:
        table.add_row(*row)
    out.print(table)

"""``edgeq build``: run the compiles a build file (``edgeq.toml``) describes, one per target, and lock them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from edgeq import build_file, lock
from edgeq.artifact_cache import ArtifactCache, build_key, measuring_place
from edgeq.artifact import manifest_text
from edgeq.cli.app import RichReporter, debug_option, default_cache_dir, main, out
from edgeq.cli.compile import compile as compile_command
from edgeq.cli.compile import print_summary, run_compile
from edgeq.errors import EXIT_BUDGET_MISSED, EXIT_OK, UserError


@main.command()
@debug_option
@click.argument("file", type=click.Path(path_type=Path), default=Path("edgeq.toml"))
@click.option("-t", "--target", "only", multiple=True, help="Build only these of the file's targets.")
@click.option("--locked", is_flag=True, help="Replay edgeq.lock: measure nothing, apply every recorded decision, "
                                             "publish only the bytes the lock records (exit 2 on any difference).")
@click.option("--relock", is_flag=True, help="With --locked: a target whose inputs, options or tools differ from "
                                             "the lock is built measured and its lock entry replaced.")
@click.option("--json", "as_json", is_flag=True, help="Print {target: manifest} as JSON instead of tables.")
def build(file, only, locked, relock, as_json):
    """Compile what FILE (default edgeq.toml) describes, for each of its targets in order, and write edgeq.lock
    beside it. An unchanged target is restored from the build cache. Exit code: the worst of the compiles' (3
    when a budget was missed); a bad input stops the matrix (artifacts already built stay)."""
    from edgeq.target import load_target

    spec = build_file.load(file, compile_command)
    unknown = next((t for t in only if t not in spec.targets), None)
    if unknown is not None:
        raise UserError(f"target '{unknown}' is not in {file}", f"its targets are {', '.join(spec.targets)}")
    if relock and not locked:
        raise UserError("--relock goes with --locked", "a build without --locked always writes a new lock")
    lock_path = spec.path.with_suffix(".lock")
    try:
        existing = lock.read(lock_path)
    except UserError:  # no lock, or one this edgeq cannot replay: only a strict replay stops here
        if locked and not relock:
            raise
        existing = {"targets": {}}
    entries, manifests, code = dict(existing.get("targets", {})), {}, 0
    cache = None if spec.options.get("no_cache") else ArtifactCache(default_cache_dir())
    data = lock.data_digests(spec.model, spec.options)  # hashed once for the whole matrix
    for target in [t for t in spec.targets if not only or t in only]:
        output = spec.output_for(target)
        inputs = lock.inputs_of(data, load_target(target).with_device(spec.options.get("device")).to_dict())
        replay = None
        if locked:
            try:
                replay = lock.check(existing, target, inputs, spec.section, lock_path)
            except UserError:
                if not relock:
                    raise
        # checked before the cache: a lock whose weight files are not committed fails on every runner
        weights = lock.load_weights(lock_path, replay.weights) if replay and replay.weights else None
        # a replay measures nothing: its artifact depends on the lock entry, not on where it runs
        where = f"replay of {lock.entry_digest(existing, target)}" if replay else \
            measuring_place(spec.options.get("device"))
        key = build_key(inputs, spec.section, target, where)
        hit = cache.lookup(key) if cache else None
        if hit is not None:
            started = time.perf_counter()
            manifest = cache.restore(hit, output)
            if not as_json:
                out.rule(f"{target} → {output} (cache hit)")
                print_summary(manifest, output)
                out.print(f"restored from the build cache ({hit.key[:12]}) in {time.perf_counter() - started:.1f} s")
            exit_code = _exit_code(manifest)
        else:
            if not as_json:
                out.rule(f"{target} → {output}" + (" (replayed from the lock)" if replay else ""))
            options = dict(spec.options)
            if replay is not None:
                options |= {"optional_ops": replay.optional_ops, "keep_float": replay.keep_float,
                            "no_measure": True, "replay": replay,
                            "replay_weights": weights,
                            "expected_files": existing["targets"][target]["artifact"]}
            manifest, exit_code = run_compile(spec.model, target, output,
                                              reporter=RichReporter(enabled=not as_json), **options)
            if cache is not None:
                cache.store(key, output, {"model": spec.model.name, "target": target, "build_file": spec.path.name})
            if not as_json:
                print_summary(manifest, output)
        manifests[target], code = manifest, max(code, exit_code)
        if replay is None:
            entries[target] = lock.entry(manifest, inputs, spec.section, output, lock_path)
            lock.write(lock_path, entries)  # after each target: a stopped matrix keeps what it built
            lock.prune_weights(lock_path, entries)
    if as_json:
        click.echo(manifest_text(manifests))
    sys.exit(code)


def _exit_code(manifest: dict) -> int:
    """A restored artifact exits as its build did: 3 when a budget was missed or the TVM check failed."""
    budget_missed = (manifest.get("budget") or {}).get("met") is False
    check_failed = (manifest.get("tvm") or {}).get("check", {}).get("ok") is False
    return EXIT_BUDGET_MISSED if budget_missed or check_failed else EXIT_OK

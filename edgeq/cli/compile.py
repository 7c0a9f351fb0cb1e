"""``edgeq compile``: quantize (or, with TVM, compile) a model for a target and print what was delivered."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
from rich.table import Table

from edgeq.artifact import REPORT, manifest_text
from edgeq.cli.app import RichReporter, debug_option, default_cache_dir, main, out
from edgeq import guard
from edgeq.errors import UserError
from edgeq.recipe import Exclusions, Recipe


@main.command()
@debug_option
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", required=True, help="Bundled target name (see 'edgeq targets') or a .toml path.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration feeds: .npz/.npy folder or file, or images.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path), help="Evaluation feeds (default: hold back 20%; judge on every feed when under 20 are held back).")
@click.option("--runtime", type=click.Choice(["onnxruntime", "tvm"]), default="onnxruntime", show_default=True,
              help="onnxruntime: a quantized ONNX model; tvm: a float model compiled into one library (model.so) for "
                   "the target's [tvm] section, tuned with --tune-trials.")
@click.option("--scheme", type=click.Choice(["int8", "mixed", "float"]),
              help="int8 everywhere it pays (default with onnxruntime), mixed: a precision per layer group "
                   "(float/int8/int4 as the target offers) chosen from measured sensitivity and latency within the "
                   "budgets, or float (the only scheme, and default, with --runtime tvm).")
@click.option("--tune-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="--runtime tvm: MetaSchedule trials for this model, cumulative in the tuning database "
                   "(a re-compile finding them there tunes nothing). 0: TVM's default schedules only.")
@click.option("--device", help="Where every measured decision is measured: local, ssh://[user@]host[:port][/python] "
                               "(a board with python3, numpy and onnxruntime), or rpc://TRACKER_HOST:PORT/KEY (boards "
                               "registered with a TVM RPC tracker: 'edgeq device serve' for ONNX Runtime, TVM's "
                               "rpc_server or 'edgeq device serve' for --runtime tvm). Default: the target's [measure] "
                               "where.")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="percentile",
              show_default=True, help="Activation range observer.")
@click.option("--percentile", type=float, default=99.999, show_default=True, help="For --method percentile.")
@click.option("--ptq", default=",".join(Recipe().ptq) or "none", show_default=True,
              help="Post-training techniques: auto (gptq + bias-correction tried on the most sensitive layers when "
                   "the fidelity guard misses), "
                   "none, or a list of cle (cross-layer equalization of Conv chains), smoothquant (activation "
                   "outliers into the weights), gptq (reconstructed weight rounding), bias-correction.")
@click.option("--optional-ops", default="auto", show_default=True,
              help="Optional ops to quantize (Add, Mul, Concat, …, ActMatMul for attention, DynamicMatMul for "
                   "dynamic int8 MatMul/Gemm layers, MaxPoolAsReduce for int8 MaxPools as Reshape + ReduceMax): "
                   "auto (measure candidate sets), all, none, or a comma-separated list.")
@click.option("--exclude", multiple=True, help="Keep float: name:NODE, re:REGEX or op:OPTYPE (repeatable).")
@click.option("--metric", help="User metric pkg.module:fn or file.py:fn; fn(outputs, feeds) -> float.")
@click.option("--max-drop", help="Accuracy budget (metric drop, else top-1 disagreement): 0.01 or 1%.")
@click.option("--latency-ms", type=float, help="Latency budget, median ms on the target (--scheme mixed).")
@click.option("--size-mb", type=float, help="Model size budget in MB of 10^6 bytes (--scheme mixed).")
@click.option("--sensitivity", type=click.Choice(["auto", "measured", "proxy"]), default="auto", show_default=True,
              help="--scheme mixed and the fidelity guard: measure each group's effect on the output, or "
                   "estimate it from layer statistics (auto: the proxy for large models, and for the guard's "
                   "one-layer groups when more than 16 groups cannot run on the gated model).")
@click.option("--random-calibration", is_flag=True, help="Calibrate on synthetic data when no --calib is given.")
@click.option("--no-guard", is_flag=True, help="Without --metric/--max-drop, do not hold outputs to the default "
                                             "fidelity guard (see the README).")
@click.option("--allow-slowdown", is_flag=True, help="Deliver int8 even when it measures slower than float.")
@click.option("--no-measure", is_flag=True, help="Skip latency measurement (and the no-slowdown check).")
@click.option("--sparsity", type=click.Choice(["none", "2:4"]), default="none", show_default=True,
              help="Prune eligible Conv/Gemm/MatMul weights to 2:4 (targets with sparse kernels only).")
@click.option("--sparsity-method", type=click.Choice(["reconstruct", "magnitude"]), default="reconstruct",
              show_default=True, help="2:4 weights: OBS reconstruction on calibration inputs, or magnitude only.")
@click.option("--sparsity-permute", is_flag=True, help="Search an input-channel order that keeps more magnitude.")
@click.option("--package", type=click.Choice(["none", "ort"]), default="none", show_default=True,
              help="ort: also deliver model.ort (ONNX Runtime's format for mobile and reduced builds) and "
                   "required_operators_and_types.config for a reduced ONNX Runtime build, both checked.")
@click.option("--keep-float", multiple=True,
              help="A node to keep float, one per flag (replays a manifest's recipe.keep_float).")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True,
              help="Latency repeats per candidate.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the calibration cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of tables.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Artifact folder.")
def compile(model, target, output, as_json, **options):
    """Quantize MODEL (int8 QDQ, or mixed precision) for TARGET, or compile it with TVM; measure it, and write an
    artifact folder."""
    manifest, code = run_compile(model, target, output, reporter=RichReporter(enabled=not as_json), **options)
    if as_json:
        click.echo(manifest_text(manifest))
    else:
        print_summary(manifest, output)
    sys.exit(code)


def run_compile(model, target, output, *, reporter, calib=None, eval_path=None, runtime="onnxruntime", scheme=None,
                tune_trials=0, device=None, method="percentile", percentile=99.999, ptq="auto", optional_ops="auto",
                exclude=(), metric=None, max_drop=None, latency_ms=None, size_mb=None, sensitivity="auto",
                random_calibration=False, no_guard=False, allow_slowdown=False, no_measure=False, sparsity="none",
                sparsity_method="reconstruct", sparsity_permute=False, package="none", keep_float=(), repeats=50,
                no_cache=False, replay=None, replay_weights=None, expected_files=None) -> tuple[dict, int]:
    """One compile from ``edgeq compile``'s option values (``edgeq build`` runs its file's through here too;
    ``replay``/``replay_weights``/``expected_files``: a locked build's decisions, recorded weights and the artifact
    digests it must reproduce)."""
    from edgeq.pipeline import CompileRequest, compile_model
    from edgeq.target import load_target

    scheme = scheme or ("float" if runtime == "tvm" else "int8")
    recipe = Recipe(scheme=scheme, runtime=runtime, tune_trials=tune_trials, method=method, percentile=percentile,
                    ptq=_parse_list(ptq), optional_ops=optional_ops, exclude=Exclusions.parse(exclude),
                    allow_random_calibration=random_calibration, max_drop=_parse_fraction(max_drop),
                    latency_ms=latency_ms, size_mb=size_mb, sensitivity=sensitivity, guard=not no_guard,
                    no_slowdown=not allow_slowdown, latency_repeats=repeats, sparsity=sparsity,
                    sparsity_method=sparsity_method, sparsity_permute=sparsity_permute, package=package)
    request = CompileRequest(model=model, target=load_target(target).with_device(device), recipe=recipe,
                             out_dir=output, calib=calib, eval=eval_path, metric=metric,
                             cache_dir=None if no_cache else default_cache_dir(),
                             measure=not no_measure, keep_float=tuple(keep_float), replay=replay,
                             replay_weights=replay_weights, expected_files=expected_files)
    return compile_model(request, reporter)


def print_summary(manifest: dict, output: Path) -> None:
    if manifest["recipe"]["runtime"] == "tvm":
        _print_tvm_summary(manifest, output)
    else:
        _print_compile_summary(manifest, output)


def _parse_list(value: str) -> tuple[str, ...]:
    """``--ptq``: 'none' or comma-separated names."""
    return () if value.strip() in ("", "none") else tuple(v.strip() for v in value.split(",") if v.strip())


def _parse_fraction(value: str | None) -> float | None:
    """``--max-drop``: a fraction (0.01) or a percentage (1%), finite and not negative."""
    if value is None:
        return None
    try:
        fraction = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        fraction = math.nan
    if not math.isfinite(fraction) or fraction < 0:
        raise UserError(f"bad --max-drop '{value}'", "use a fraction (0.01) or a percentage (1%), 0 or more")
    return fraction


def _summary_table(title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # paths are one word: folded, never cut
    return table


def _print_tvm_summary(manifest: dict, output: Path) -> None:
    delivered, tvm = manifest["delivered"], manifest["tvm"]
    table = _summary_table(f"edgeq compile --runtime tvm → {output}")
    table.add_row("delivered", f"{delivered['file']} for {delivered['arch']} ({delivered['bytes'] / 1e6:.2f} MB, "
                               f"inputs {delivered['input_shapes']})")
    table.add_row("note", delivered["reason"])
    table.add_row("TVM target", tvm["target"])
    tuning = tvm["tuning"]
    if tuning:
        table.add_row("tuning", f"{tvm['tasks']} tasks · {tuning['trials_run']} trials run in "
                                f"{tuning['seconds']:.1f} s "
                                f"({tuning['trials_in_database_before']} found in {tuning['database']}) · "
                                f"runner {tuning['runner']}")
    lat = manifest["latency"]
    if "tvm" in lat:
        parts = [f"{name} {lat[name]['median_ms']:.3f} ms" for name in ("tvm", "tvm_untuned", "onnxruntime")
                 if name in lat]
        table.add_row("latency (median)", " · ".join(parts) + _measured_on(lat.get("device")))
    else:
        table.add_row("latency", f"not measured: {lat['why']}")
    check = tvm["check"]
    table.add_row("check vs ONNX Runtime", f"max relative error {check['max_relative_error']:.2e} on {check['feeds']} "
                  f"feeds ({'ok' if check['ok'] else 'FAILED'}, tolerance {check['tolerance']:g})" if check["run"]
                  else f"not run: {check['why']}")
    table.add_row("report", str(output / REPORT))
    out.print(table)


def _measured_on(device: dict | None) -> str:
    address = (device or {}).get("address", "local")
    return "" if address == "local" else f" · on {address}"


def _print_compile_summary(manifest: dict, output: Path) -> None:
    q = manifest["quantization"]
    delivered = manifest["delivered"]
    table = _summary_table(f"edgeq compile → {output}")
    table.add_row("delivered", f"{delivered['precision']}  ({delivered['bytes'] / 1e6:.2f} MB, "
                               f"float {delivered['float_bytes'] / 1e6:.2f} MB)")
    if delivered["reason"]:
        table.add_row("note", delivered["reason"])
    variants = [t for t in manifest["search"]["trials"] if t["strategy"] == "op set"]
    table.add_row("optional ops", manifest["recipe"]["optional_ops"] + ("\n" + "\n".join(
        f"  {t['label']}: ×{t['ratio']:.2f}, {t['sqnr_db']:.1f} dB" for t in variants) if variants else ""))
    table.add_row("quantized nodes", f"{q['quantized_nodes']} (float: {q['float_nodes']}, in subgraphs left float: "
                                     f"{q['subgraph_compute_left_float']})")
    lat = manifest["latency"]
    if "float" in lat:
        table.add_row("latency (median)", f"float {lat['float']['median_ms']:.3f} ms · int8 "
                                          f"{lat['int8']['median_ms']:.3f} ms · ratio {lat['ratio']:.2f}"
                                          + _measured_on(lat.get("device")))
    else:
        table.add_row("latency", f"not measured: {lat['why']}")
    fid = manifest["fidelity"]
    for name, o in fid["outputs"].items():
        if "cosine" not in o:  # an integer output or a set of detections: only agreement means anything
            items = f" ({o['items_float']} items float, {o['items_candidate']} delivered; SQNR " \
                    f"{o['sqnr_db']:.1f} dB matched)" if "items_float" in o else ""
            table.add_row(f"output {name}", f"{o['kind']}: agreement {o['decision_agreement']:.4f}{items}")
            continue
        extra = f" · top-1 agree {o['top1_agreement']:.3f}" if "top1_agreement" in o else ""
        extra += f" · sequences agree {o['sequence_agreement']:.3f}" if "sequence_agreement" in o else ""
        table.add_row(f"output {name}", f"cosine {o['cosine']:.5f} · SQNR {o['sqnr_db']:.1f} dB · "
                                        f"max abs {o['max_abs_error']:.3g}{extra}")
    if "guard" in fid:
        g = manifest["guard"]
        returned = len(g.get("float_groups", ())) if delivered["precision"] != "float" else 0
        back = f" · {returned} group{'s' * (returned != 1)} returned to float" if returned else ""
        table.add_row("fidelity guard", f"{'held' if fid['guard']['met'] else 'MISSED'}{back}: "
                                        + guard.describe(fid["guard"]))
    if "metric" in fid:
        m = fid["metric"]
        table.add_row("metric", f"float {m['float']:.4f} · delivered {m['candidate']:.4f} · drop {m['drop']:+.4f}")
    if "caveat" in fid:
        table.add_row("caveat", fid["caveat"])
    if manifest["budget"]:
        b = manifest["budget"]
        parts = []
        if "max_drop" in b:
            parts.append(f"max drop {b['max_drop']:.4f} (measured {b['drop']:.4f})")
        if "latency_ms" in b:
            parts.append(f"latency {b['latency_ms']:g} ms (measured {b['measured_ms']:.3f} ms)")
        if "size_mb" in b:
            parts.append(f"size {b['size_mb']:g} MB (measured {b['bytes'] / 1e6:.2f} MB)")
        table.add_row("budget", f"{'met' if b['met'] else 'MISSED'}: " + " · ".join(parts))
    if "mixed" in manifest:
        m = manifest["mixed"]
        table.add_row("mixed search", f"{len(m['groups'])} groups · {len(m['iterations'])} measured builds · "
                                      f"{sum(m['seconds'].values()):.1f} s")
    if "sparsity" in manifest:
        sp = manifest["sparsity"]
        check = sp["check"]
        pruned = f"{sp['pruned']} of {sp['eligible']} eligible layers pruned ({sp['method']}) · " if "layers" in sp else ""
        table.add_row("2:4 sparsity", f"{pruned}check {'ok' if check['ok'] else 'FAILED'} on {check['weights']} "
                                      f"weights · compressed/dense {check['bytes_ratio']:.2f}")
    if "deploy" in manifest:
        table.add_row("TensorRT build", manifest["deploy"]["trtexec"])
    if "package" in manifest:
        p = manifest["package"]
        table.add_row("ORT package", f"{p['file']} ({p['bytes'] / 1e6:.2f} MB, {p['style']} style, ORT format "
                                     f"v{p['ort_format_version']}: ONNX Runtime ≥ {p['readable_from_onnxruntime']}) · "
                                     f"{p['config']} ({len(p['kernels'])} kernels) · matches model.onnx to "
                                     f"{p['check']['max_relative_error']:.1e}")
    table.add_row("report", str(output / REPORT))
    out.print(table)
    if "layers" in manifest.get("sparsity", {}):
        _print_sparsity_layers(manifest["sparsity"]["layers"])
    if "mixed" in manifest:
        _print_mixed_groups(manifest["mixed"]["groups"])


def _print_mixed_groups(groups: list[dict]) -> None:
    table = Table("group", "op", "precision", "SQNR alone (dB)", "ms", "bytes", title="precision per layer group")
    for g in groups:
        alone = ", ".join(f"{p} {(-10 * math.log10(v)) if v > 0 else math.inf:.1f}"
                          for p, v in g["nsr"].items() if p != "float")
        table.add_row(g["name"], g["op_type"], g["precision"], alone, "" if g["ms"] is None else f"{g['ms']:.3f}",
                      f"{g['bytes']:,}")
    out.print(table)


def _print_sparsity_layers(layers: dict) -> None:
    table = Table("layer", "op", "in→out", "2:4", "error (magnitude → chosen)", "why not", title="2:4 per layer")
    for name, layer in layers.items():
        channels = f"{layer['in_channels']}→{layer['out_channels']}" if layer["eligible"] else ""
        error = f"{layer['magnitude_error']:.4f} → {layer['error']:.4f}" if layer["eligible"] else ""
        table.add_row(name, layer["op_type"], channels, "pruned" if layer["pruned"] else "dense", error,
                      layer["reason"])
    out.print(table)

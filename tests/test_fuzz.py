"""Seeded mutations of small valid models through compile, inspect and bench: never a traceback, exit codes only
0/1/2/3, and nothing written when a command fails.

The cases run in one child process (a crash of a native library there names its case instead of killing the
test run); each result comes back as a JSON line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

CASES = int(os.environ.get("EDGEQ_FUZZ_CASES", 40))  # more for a deeper run by hand
SEED = 12
OPS = ["Relu", "Conv", "MatMul", "Add", "Softmax", "Reshape", "If", "Loop", "Split", "Resize", "Gemm", "Clip",
       "ReduceMean", "Squeeze", "Concat", "Pad", "Slice", "Cast", "Upsample", "NoSuchOp"]


def _mutate(proto: onnx.ModelProto, rng: np.random.Generator) -> bytes:
    """One random structural or byte-level damage to ``proto``."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    kind = int(rng.integers(12))
    node = g.node[int(rng.integers(len(g.node)))]
    names = [v.name for v in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]
    if kind == 0:
        node.op_type = OPS[int(rng.integers(len(OPS)))]
    elif kind == 1:
        g.node.remove(node)
    elif kind == 2 and node.input:
        node.input[int(rng.integers(len(node.input)))] = (names + ["ghost"])[int(rng.integers(len(names) + 1))]
    elif kind == 3 and g.initializer:
        tensor = g.initializer[int(rng.integers(len(g.initializer)))]
        tensor.dims[:] = [int(d) for d in rng.integers(0, 5, size=int(rng.integers(0, 4)))]
    elif kind == 4 and node.attribute:
        attr = node.attribute[int(rng.integers(len(node.attribute)))]
        if attr.ints:
            attr.ints[:] = [int(v) for v in rng.integers(-3, 9, size=len(attr.ints))]
        elif attr.type == onnx.AttributeProto.INT:
            attr.i = int(rng.choice([-1, 0, 7, 2**40]))
    elif kind == 5:
        dim = g.input[0].type.tensor_type.shape.dim
        dim[int(rng.integers(len(dim)))].dim_value = int(rng.choice([0, 2, 5]))
    elif kind == 6:
        g.input[0].type.tensor_type.elem_type = int(rng.choice([TensorProto.INT64, TensorProto.FLOAT16, 0]))
    elif kind == 7:
        m.opset_import[0].version = int(rng.integers(1, 30))
    elif kind == 8:
        g.node.append(node)  # made twice
    elif kind == 9:
        del g.output[:]
        g.output.append(helper.make_tensor_value_info(names[int(rng.integers(len(names)))], TensorProto.FLOAT, None))
    data = bytearray(m.SerializeToString())
    if kind == 10:
        for i in rng.integers(0, len(data), size=8):
            data[int(i)] = int(rng.integers(256))
    elif kind == 11:
        data = data[: int(rng.integers(1, len(data)))]
    return bytes(data)


def drive(folder: str) -> None:
    """Run every case; print one JSON line per command."""
    from click.testing import CliRunner

    from conftest import conv_model, write_feeds
    from edgeq.cli import main
    from test_insert_qdq import _loop_model

    folder = Path(folder)
    conv_feeds = write_feeds(folder / "conv_feeds", "x", (1, 3, 16, 16), 6)
    loop_feeds = write_feeds(folder / "loop_feeds", "x", (1, 8), 6, extras={"n": np.array(2)})
    bases = [(conv_model(opset=11), conv_feeds), (_loop_model(), loop_feeds)]  # a CNN; a Loop (opset 17)
    rng = np.random.default_rng(SEED)
    for case in range(CASES):
        base, feeds = bases[case % len(bases)]
        path = folder / f"case{case}.onnx"
        path.write_bytes(_mutate(base, rng))
        out = folder / f"out{case}"
        commands = {"compile": ["compile", str(path), "-t", "x86-64", "--calib", str(feeds), "-o", str(out),
                                "--no-measure", "--no-cache"],
                    "inspect": ["inspect", str(path)],
                    "bench": ["bench", str(path), "-t", "x86-64", "--repeats", "2"]}
        for name, args in commands.items():
            print(json.dumps({"case": case, "command": name, "started": True}), flush=True)
            result = CliRunner().invoke(main, args)
            written = out.exists() and name == "compile"
            print(json.dumps({"case": case, "command": name, "exit": result.exit_code,
                              "traceback": "Traceback" in result.output or (
                                  result.exception is not None and not isinstance(result.exception, SystemExit)),
                              "written": written, "last": result.output.strip().splitlines()[-1:]}), flush=True)
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith((f".out{case}", "edgeq-"))]
        print(json.dumps({"case": case, "leftovers": leftovers}), flush=True)


def test_fuzzed_models_never_give_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), TMPDIR=str(tmp_path))
    child = subprocess.run([sys.executable, "-c", f"import test_fuzz; test_fuzz.drive({str(tmp_path)!r})"],
                           capture_output=True, text=True, env=env, timeout=600)
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    assert child.returncode == 0, f"child died after {lines[-1:]}: {child.stderr[-2000:]}"
    results = [r for r in lines if "exit" in r]
    assert len(results) == 3 * CASES
    for r in results:
        assert r["exit"] in (0, 1, 2, 3) and not r["traceback"], r
        assert r["exit"] in (0, 3) or not r["written"], r
        assert r["exit"] == 0 or (r["last"] and r["last"][0].startswith(("error:", "Error:"))), r
    assert all(not r["leftovers"] for r in lines if "leftovers" in r)
    codes = [r["exit"] for r in results]
    assert codes.count(2) > CASES and codes.count(0) >= 6  # the mutations reach both outcomes
    internal = [r for r in results if r["exit"] == 1]
    assert not internal, internal

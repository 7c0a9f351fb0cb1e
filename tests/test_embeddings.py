"""Embedding tables stored int8, one scale per row: Gather(int8 rows) → Cast → Mul by the gathered row scales."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import HOST_X86, make_model
from edgeq.cli import main
from edgeq.mixed.groups import layer_groups
from edgeq.passes.insert_qdq import EMBEDDING, InsertQDQPass
from edgeq.target import load_target

RULES = load_target(HOST_X86).quantization
VOCAB, WIDTH = 4096, 64  # 1 MiB: the smallest table stored int8


def _text_model(table: np.ndarray, seed: int = 0) -> onnx.ModelProto:
    """ids[2, 6] → Gather(table) → e (an output too) → MatMul → y; a second Gather of the same table by
    ``other`` ids; a 4-row segment table gathered by ``seg`` and added."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(rng.standard_normal((4, WIDTH)).astype(np.float32), "segments"),
             numpy_helper.from_array(rng.standard_normal((WIDTH, 8)).astype(np.float32) * 0.2, "w")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("Gather", ["table", "other"], ["o"], name="embed_other"),
             helper.make_node("Gather", ["segments", "seg"], ["s"], name="segment"),
             helper.make_node("Add", ["e", "s"], ["es"], name="add"),
             helper.make_node("Add", ["es", "o"], ["h"], name="add_other"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, [2, 6]) for n in ("ids", "other", "seg")]
    return make_model(nodes, ids, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 8]),
                                   helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 6, WIDTH])], inits)


def _feed(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"ids": rng.integers(0, VOCAB, (2, 6)),
            "other": rng.integers(-VOCAB, VOCAB, (2, 6)),  # negative indices count from the end
            "seg": rng.integers(0, 4, (2, 6))}


def _table(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)  # rows of unlike norms: one scale per row keeps each row's resolution
    return (rng.standard_normal((VOCAB, WIDTH)) * rng.uniform(0.01, 1.0, (VOCAB, 1))).astype(np.float32)


def _quantized(proto: onnx.ModelProto, rules=RULES, **options) -> tuple[ir.Model, InsertQDQPass]:
    model = ir.serde.deserialize_model(proto)
    insert = InsertQDQPass(rules, {}, **options)
    insert(model)
    return model, insert


def test_an_embedding_table_is_stored_int8_with_one_scale_per_row():
    table = _table()
    proto = _text_model(table)
    model, insert = _quantized(proto)
    embed = insert.decisions["embed"]
    assert (embed.quantized, embed.reason, embed.precision) == (True, EMBEDDING, "int8")
    assert insert.decisions["embed_other"].quantized  # the same table, stored once
    assert not insert.decisions["segment"].quantized and "MiB" in insert.decisions["segment"].reason
    stored = {v.name: v.const_value for v in model.graph.initializers.values()}
    int8 = [t for t in stored.values() if t.dtype == ir.DataType.INT8]
    assert [tuple(t.shape) for t in int8] == [(VOCAB, WIDTH)] and "table" not in stored
    assert [o.name for o in model.graph.outputs] == ["y", "e"]
    assert {n.op_type for n in model.graph if insert.owners.get(n.name) == "embed"} == {"Gather", "Cast", "Mul"}

    quantized = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    original = ort.InferenceSession(proto.SerializeToString())
    for seed in range(3):
        feed = _feed(seed)
        (y_ref, e_ref), (y, e) = original.run(None, feed), quantized.run(None, feed)
        rows = np.abs(table[feed["ids"]]).max(axis=-1, keepdims=True)
        assert np.all(np.abs(e - e_ref) <= rows / 254 * 1.001)  # half a step of each row's own scale
        assert 10 * np.log10(np.sum(y_ref ** 2) / np.sum((y - y_ref) ** 2)) > 40


def test_an_embedding_stays_float_where_asked_or_where_the_target_gathers_no_integers():
    proto = _text_model(_table())
    _, kept = _quantized(proto, keep_float={"embed"})
    assert not kept.decisions["embed"].quantized and "measured choice" in kept.decisions["embed"].reason
    _, allocated = _quantized(proto, precisions={"embed": "float", "embed_other": "float"})
    assert "mixed-precision" in allocated.decisions["embed"].reason
    gpu = load_target("gpu-ampere").quantization
    assert "Gather" not in gpu.passthrough_ops
    model, other = _quantized(proto, gpu)
    assert "embed" not in other.decisions and "table" in model.graph.initializers


def test_gathers_of_one_table_are_one_group_of_int8_rows():
    proto = _text_model(_table())
    model, insert = _quantized(proto)
    groups = layer_groups(ir.serde.deserialize_model(proto), insert.decisions,
                          ("float", "int8", "int16", "int4", "fp16"), RULES.activation_fusions, 32)
    (group,) = [g for g in groups if "embed" in g.nodes]
    assert set(group.nodes) == {"embed", "embed_other"} and group.precisions == ("float", "int8")
    assert group.bytes == {"float": VOCAB * WIDTH * 4, "int8": VOCAB * WIDTH + 4 * VOCAB}


def _guarded_model(table: np.ndarray) -> onnx.ModelProto:
    """ids → Gather(table) → MatMul(w, row 0 zero: the table's column 0 is ignored) → y; x → MatMul → z."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((WIDTH, 8)).astype(np.float32)
    w[0] = 0.0
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "v")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj"),
             helper.make_node("MatMul", ["x", "v"], ["z"], name="side")]
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 6]),
                              helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 16])],
                      [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 6, 8]) for n in ("y", "z")], inits)


def test_the_guard_returns_a_harmful_embedding_to_float_and_keeps_a_harmless_one(tmp_path):
    """One huge value per row (a column the projection ignores) leaves the rest of each row a zero in int8:
    the guard measures the table as a group of its own (built, not gated) and returns it to float. A table
    without it is delivered int8, the file smaller by three quarters of the table. (The projection is kept
    float: its int8 input would lose the same resolution to the huge column.)"""
    feeds = tmp_path / "feeds"
    feeds.mkdir()
    rng = np.random.default_rng(2)
    for i in range(24):
        np.savez(feeds / f"feed_{i:02d}.npz", ids=rng.integers(0, VOCAB, (2, 6)),
                 x=rng.standard_normal((2, 6, 16)).astype(np.float32))
    outlier = _table()
    outlier[:, 0] = 50.0
    delivered = {}
    for name, table in (("plain", _table()), ("outlier", outlier)):
        onnx.save(_guarded_model(table), tmp_path / f"{name}.onnx")
        result = CliRunner().invoke(main, ["compile", str(tmp_path / f"{name}.onnx"), "-t", HOST_X86, "--calib",
                                           str(feeds), "--keep-float", "proj", "--no-measure",
                                           "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        delivered[name] = json.loads((tmp_path / name / "manifest.json").read_text())
    plain, harmed = delivered["plain"], delivered["outlier"]
    assert plain["quantization"]["decisions"]["embed"]["precision"] == "int8"
    assert plain["delivered"]["bytes"] < plain["delivered"]["float_bytes"] - 0.7 * VOCAB * WIDTH * 4
    assert set(harmed["guard"]["sensitivity"]) == {"embed", "side"} and harmed["guard"]["float_groups"] == ["embed"]
    assert harmed["guard"]["sensitivity_gated_trials"] == 1  # side; the table has no Q/DQ site to gate
    assert not harmed["quantization"]["decisions"]["embed"]["quantized"]
    assert harmed["fidelity"]["guard"]["met"] and harmed["quantization"]["decisions"]["side"]["quantized"]


def _tied_model(table: np.ndarray) -> onnx.ModelProto:
    """ids → Gather(table) → h → MatMul(h, Transpose(table)) → logits: the output layer shares the table, as
    torch's exporters write a tied embedding."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["table"], ["table_t"], name="tie", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
    return onnx.shape_inference.infer_shapes(make_model(
        nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 6, VOCAB])],
        [numpy_helper.from_array(table, "table")]))  # h is a float activation


def test_a_tied_output_layer_reads_the_table_transposed_as_a_weight_of_its_own():
    """Both users of the table store it int8 (rows for the Gather, columns for the product), the float table
    and its run-time Transpose go; an output layer kept float still reads the float table."""
    table = _table()
    proto = _tied_model(table)
    feed = {"ids": _feed(0)["ids"]}
    reference = ort.InferenceSession(proto.SerializeToString()).run(None, feed)[0]
    h = table[feed["ids"]]
    ranges = {"h": (float(h.min()), float(h.max())), "logits": (float(reference.min()), float(reference.max()))}
    model = ir.serde.deserialize_model(proto)
    insert = InsertQDQPass(RULES, ranges)
    insert(model)
    assert insert.decisions["lm_head"].quantized and insert.decisions["embed"].reason == EMBEDDING
    assert {v.const_value.dtype for v in model.graph.initializers.values() if v.const_value.size >= VOCAB * WIDTH} \
        == {ir.DataType.INT8}
    assert "Transpose" not in [n.op_type for n in model.graph]
    weight = [n for n in model.graph if n.op_type == "DequantizeLinear" and insert.owners[n.name] == "lm_head"
              and n.inputs[0].const_value is not None]
    assert [tuple(n.inputs[0].const_value.shape) for n in weight] == [(WIDTH, VOCAB)]
    assert weight[0].inputs[1].const_value.size == VOCAB  # per column of the product: per row of the table
    quantized = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(None, feed)[0]
    # the logits' own 8-bit output bounds it (27.6 dB); a wrongly laid out weight would be near 0 dB
    assert 10 * np.log10(np.sum(reference ** 2) / np.sum((quantized - reference) ** 2)) > 24

    model = ir.serde.deserialize_model(proto)
    InsertQDQPass(RULES, ranges, keep_float={"lm_head"})(model)
    assert "Transpose" in [n.op_type for n in model.graph] and "table" in model.graph.initializers

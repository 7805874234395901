"""What the fold keeps: names, metadata, opsets, doc strings, the caller's model; and idempotence,
determinism, the full checker and strict shape inference on its output."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold import check_onnx, fold_onnx
from bnfold.report import Status
from tests.onnx.helpers import (
    F16,
    F32,
    assert_equivalent,
    assert_valid,
    bn_inits,
    bn_node,
    bn_stats,
    conv_bn,
    gemm_bn,
    init,
    make_model,
    matmul_bn,
    rand,
)


def _rich_model() -> onnx.ModelProto:
    """Conv → BN → Relu → ConvTranspose(g=2) → BN, MatMul → Add → BN head, with metadata everywhere."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="stem_conv", pads=[1, 1, 1, 1], doc_string="stem"),
        bn_node("c1", "n1", "bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="stem_relu", doc_string="keep me"),
        helper.make_node("ConvTranspose", ["r1", "w2"], ["c2"], name="up", group=2, strides=[2, 2]),
        bn_node("c2", "features", "bn2"),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc.w"], ["fc"], name="fc"),
        helper.make_node("Add", ["fc", "fc.b"], ["fcb"], name="fc_bias"),
        bn_node("fcb", "logits", "bn3"),
    ]
    inits = [
        init("w1", rand((4, 3, 3, 3), rng, F32, 0.5)),
        init("b1", rand(4, rng)),
        init("w2", rand((4, 3, 3, 3), rng, F32, 0.5)),
        init("fc.w", rand((6, 5), rng, F32, 0.5)),
        init("fc.b", rand(5, rng)),
        *bn_inits("bn1", bn_stats(4, rng)),
        *bn_inits("bn2", bn_stats(6, rng)),
        *bn_inits("bn3", bn_stats(5, rng)),
    ]
    m = make_model(nodes, [("input", [2, 3, 6, 6], F32)], [("logits", F32), ("features", F32)], inits)
    m.producer_name, m.producer_version, m.domain, m.model_version = "unit-test", "9.9", "org.example", 42
    m.doc_string = "model doc"
    m.graph.doc_string = "graph doc"
    m.graph.name = "rich_graph"
    helper.set_model_props(m, {"author": "tests", "license": "MIT"})
    m.opset_import.append(helper.make_opsetid("com.example.unused", 3))
    m.graph.input[0].doc_string = "the image"
    m.graph.output[0].doc_string = "the logits"
    m.graph.value_info.append(helper.make_tensor_value_info("r1", onnx.TensorProto.FLOAT, [2, 4, 6, 6]))
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.fixture(scope="module")
def rich():
    m = _rich_model()
    out, report = fold_onnx(m)
    return m, out, report


def test_rich_model_folds_all_and_agrees(rich):
    m, out, report = rich
    assert report.found == 3 and report.folded == 3 and report.left == 0
    assert [n.op_type for n in out.graph.node if n.op_type == "BatchNormalization"] == []
    assert_valid(out)
    assert_equivalent(m, out, np.random.default_rng(0))


def test_names_and_metadata_kept(rich):
    m, out, _ = rich
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string", "ir_version"):
        assert getattr(out, field) == getattr(m, field), field
    assert out.graph.name == m.graph.name and out.graph.doc_string == m.graph.doc_string
    assert [(p.key, p.value) for p in out.metadata_props] == [(p.key, p.value) for p in m.metadata_props]
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in m.opset_import]
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    assert [o.type for o in out.graph.output] == [o.type for o in m.graph.output]
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]
    kept = {n.name: n for n in m.graph.node if n.op_type not in ("BatchNormalization", "Add")}
    got = {n.name: n for n in out.graph.node}
    assert set(kept) <= set(got), f"nodes that stay keep their names: {set(kept) - set(got)}"
    assert [(a.name, a.SerializeToString()) for a in got["stem_relu"].attribute] == []
    assert list(got["stem_relu"].input) == ["n1"] and list(got["stem_relu"].output) == ["r1"]
    assert [v.name for v in out.graph.value_info] == ["r1"]



def test_graph_input_and_output_doc_strings_kept(rich):
    m, out, _ = rich
    assert [o.SerializeToString() for o in out.graph.output] == [o.SerializeToString() for o in m.graph.output]
    assert [i.SerializeToString() for i in out.graph.input] == [i.SerializeToString() for i in m.graph.input]



def test_node_doc_strings_kept(rich):
    m, out, _ = rich
    got = {n.name: n for n in out.graph.node}
    assert got["stem_conv"].doc_string == "stem"
    assert got["stem_relu"].SerializeToString() == [n for n in m.graph.node if n.name == "stem_relu"][0].SerializeToString()


def test_caller_model_not_mutated():
    m = _rich_model()
    before = m.SerializeToString()
    snapshot = copy.deepcopy(m)
    fold_onnx(m)
    check_onnx(m)
    assert m.SerializeToString() == before and m == snapshot


@pytest.mark.parametrize(
    "build",
    [
        _rich_model,
        lambda: conv_bn(np.random.default_rng(1), transpose=True, groups=2),
        lambda: gemm_bn(np.random.default_rng(2), beta=2.0, trans_b=1, c_shape=(1, 4)),
        lambda: matmul_bn(np.random.default_rng(3), bias_add=True, dtype=F16),
        lambda: conv_bn(np.random.default_rng(4), opset=6, pads=[1, 1, 1, 1]),
    ],
    ids=["rich", "convT", "gemm", "matmul-f16", "ir3"],
)
def test_idempotent_and_deterministic(build, tmp_path):
    m = build()
    out1, r1 = fold_onnx(m)
    assert r1.folded >= 1
    out2, r2 = fold_onnx(onnx.load_from_string(m.SerializeToString()))
    assert out1.SerializeToString() == out2.SerializeToString(), "same input → byte-identical output"
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    out3, _ = fold_onnx(path)
    assert out3.SerializeToString() == out1.SerializeToString(), "from a path too"
    again, r3 = fold_onnx(out1)
    assert r3.folded == 0 and r3.found == 0
    assert again.SerializeToString() == out1.SerializeToString(), "folding the output changes nothing"
    assert_valid(out1)


def test_dry_run_agrees_with_fold_and_writes_nothing(rich):
    m, out, report = rich
    dry_model, dry = fold_onnx(m, dry_run=True)
    assert dry_model.SerializeToString() == m.SerializeToString()
    assert dry.foldable == report.folded and dry.folded == 0
    assert [(c.node, c.target, c.direction) for c in dry.candidates] == [
        (c.node, c.target, c.direction) for c in report.candidates
    ]
    assert all(c.status is Status.FOLDABLE for c in dry.candidates)
    assert check_onnx(m).to_dict()["candidates"] == dry.to_dict()["candidates"]


def test_report_targets_and_direction(rich):
    _, _, report = rich
    assert [(c.node, c.target, c.target_op, c.direction) for c in report.candidates] == [
        ("bn1", "stem_conv", "Conv", "into-producer"),
        ("bn2", "up", "ConvTranspose", "into-producer"),
        ("bn3", "fc", "MatMul", "into-producer"),
    ]
